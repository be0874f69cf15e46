"""Triton kernels behind :func:`presso.kernels.wquant_matmul.dequant_matmul`.

Both kernels walk K in tiles of ``BLOCK_KW`` int32 words, each holding ``PW = 32 // bits`` codes of
consecutive input columns. Codes become floats by OR-ing them into the mantissa of 2**23 and
subtracting 2**23: exact, and cheaper than an int-to-float conversion (slow on Hopper). Group
sizes are multiples of ``PW``, so a word lies in one group and its scale and zero point are
loaded once per word.

- ``_gemv_kernel`` (any M <= 8; the default for M <= GEMV_MAX_M): a program owns ``BLOCK_N``
  outputs and one of ``SPLIT_K`` slices of K. It walks the word tile in ``PW`` phases (phase ``j``
  is code ``j`` of every word, masked in place: one LOP3 + one FADD per code), multiplies by the
  matching activations, accumulates elementwise in fp32 registers, applies scale and zero point
  once per word and reduces across K once at the end. With ``SPLIT_K > 1`` each program writes an
  fp32 partial; the last one of its column tile to finish (an atomic counter) sums the partials in
  split order, adds bias and outliers, writes the output and resets the counter: one launch, no
  memset, and a result that does not depend on scheduling.
- ``_gemm_kernel``: ``BLOCK_M x BLOCK_N`` output tiles; the word tile is expanded to
  ``[BLOCK_KW, PW, BLOCK_N]`` codes, dequantized to the activation dtype and reshaped to the
  ``[BLOCK_K, BLOCK_N]`` weight tile of one ``tl.dot`` (fp32 accumulation).

Kernels read weights, scales and zero points through strides: they take compressed-tensors'
layout as stored, or the N-contiguous one of :func:`presso.kernels.wquant_matmul.prepare_weight`,
on which every GEMV load shares one register layout (the fast path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.kernels.dispatch import interpreting

INTERPRETED = interpreting()  # the mode these kernels were built in (see dispatch.triton_module)
# The GEMV kernel takes batches up to 8, but its cost grows with the batch (one FMA per row per
# code) while the tl.dot kernel's does not: compiled for sm_90 it issues ~4.8 / 6.5 / 10.4 / 21.7
# instructions per int4 code at batch 1 / 2 / 4 / 8 against ~10 for the GEMM, so GEMV stops at 4.
# bench/kernel_speed.py times both paths at batch 1, 2, 4 and 8 to check the switch on a GPU.
GEMV_MAX_M = 4
# fp32 bits of 2**23, passed as a kernel argument rather than a literal: ptxas then keeps it in
# one register and gives the LOP3 the per-code mask as its immediate, instead of rebuilding the
# masks in registers for every code.
MAGIC = 0x4B000000

# Interpreted programs cost per operation, not per element: one large tile per program.
GEMV_INTERPRET = {"BLOCK_N": 64, "BLOCK_KW": 16, "SPLIT_K": 2}
GEMM_INTERPRET = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_KW": 16}


@triton.jit
def _codes_shifted(words, high, magic, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of every int32 word times ``2**pos``, ``pos`` its offset in its 16-bit half.

    The code is masked in place (no shift) and OR-ed into the mantissa of 2**23; subtracting 2**23
    leaves it as an exact fp32: one LOP3 and one FADD per code, cheaper than an int-to-float
    conversion. ``high`` is ``words >> 16``, so every code sits below bit 16, inside the mantissa.
    """
    src = words if j * BITS < 16 else high
    c = (src & (((1 << BITS) - 1) << ((j * BITS) % 16))) | magic
    return c.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_words(w_ptr, kw, n, n_ok, KW, s_wk, s_wn, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_ptr + kw * s_wk + n * s_wn)
    return tl.load(w_ptr + kw * s_wk + n * s_wn, mask=(kw < KW) & n_ok, other=0)


@triton.jit
def _word_meta(
    s_ptr, z_ptr, g, n, mask, s_sg, s_sn, s_zg, s_zn,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, ZP_PACKED: tl.constexpr,
):  # fmt: skip
    """Scale and zero code (fp32) of group ``g`` for outputs ``n`` (broadcastable tensors)."""
    scale = tl.load(s_ptr + g * s_sg + n * s_sn, mask=mask, other=0.0)
    if not HAS_ZP:  # symmetric: codes are stored as q + 2**(bits-1)
        zero = tl.full(scale.shape, 1 << (BITS - 1), tl.float32)
    elif ZP_PACKED:  # compressed-tensors: zero codes packed along N
        zp_words = tl.load(z_ptr + g * s_zg + (n // (32 // BITS)) * s_zn, mask=mask, other=0)
        zero = ((zp_words >> ((n % (32 // BITS)) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    else:  # prepare_weight: one fp16 per (group, output), loaded like the scales
        zero = tl.load(z_ptr + g * s_zg + n * s_zn, mask=mask, other=0.0).to(tl.float32)
    return scale.to(tl.float32), zero


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, m_ok, n_ok, x_ptr, s_xm, b_ptr, y_ptr, N, rp_ptr, oc_ptr, ov_ptr,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
):  # fmt: skip
    """Add bias and the CSR outliers to the fp32 ``[BLOCK_M, BLOCK_N]`` result and store it."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_OUTLIERS:
        start = tl.load(rp_ptr + offs_n, mask=n_ok, other=0)
        end = tl.load(rp_ptr + offs_n + 1, mask=n_ok, other=0)
        # One entry of every row per step; rows are short (~1 % of K), so the loop is too.
        for i in range(0, tl.max(end - start, axis=0)):
            ok = start + i < end
            col = tl.load(oc_ptr + start + i, mask=ok, other=0).to(tl.int32)
            val = tl.load(ov_ptr + start + i, mask=ok, other=0.0).to(tl.float32)
            xg = tl.load(
                x_ptr + offs_m[:, None] * s_xm + col[None, :],
                mask=m_ok[:, None] & ok[None, :],
                other=0.0,
            )
            acc += xg.to(tl.float32) * val[None, :]
    y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr, rp_ptr, oc_ptr, ov_ptr,
    M, N, K, KW, s_xm, s_wk, s_wn, s_sg, s_sn, s_zg, s_zn, magic,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ZP_PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Everything is a [BLOCK_M, BLOCK_KW, BLOCK_N] broadcast so that all loads share the layout
    # of the weight tile; a [BLOCK_N] scale load would get its own layout and a shuffle per tile.
    PW: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m3 = tl.arange(0, BLOCK_M)[:, None, None]
    n3 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    m_ok = m3 < M
    n_ok = n3 < N
    tiles = tl.cdiv(KW, BLOCK_KW)  # a tile never straddles a group: BLOCK_KW * PW divides GROUP
    per_split = tl.cdiv(tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(tiles, t0 + per_split)
    kw0 = tl.arange(0, BLOCK_KW)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), tl.float32)
    first = tl.minimum(t0, tiles - 1) * BLOCK_KW + kw0  # a split may own no tile at all
    nxt = _load_words(w_ptr, first, n3, n_ok, KW, s_wk, s_wn, EVEN_K and EVEN_N)
    for t in range(t0, t1):
        kw = t * BLOCK_KW + kw0
        # Software prefetch: the next tile's words are in flight while this one is computed
        # (the last iteration reloads its own tile, which is cached, instead of masking).
        words = nxt
        nxt_kw = tl.minimum(t + 1, t1 - 1) * BLOCK_KW + kw0
        nxt = _load_words(w_ptr, nxt_kw, n3, n_ok, KW, s_wk, s_wn, EVEN_K and EVEN_N)
        high = words >> 16
        g = t * (BLOCK_KW * PW) // GROUP
        scale, zero = _word_meta(
            s_ptr, z_ptr, g + 0 * kw, n3, n_ok, s_sg, s_sn, s_zg, s_zn, BITS, HAS_ZP, ZP_PACKED
        )
        # sum_j x_j * (code_j - zero) * scale, with zero and scale taken out of the sum over j
        dot = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), tl.float32)
        xsum = tl.zeros((BLOCK_M, BLOCK_KW, 1), tl.float32)
        for j in tl.static_range(PW):
            k = kw * PW + j
            if EVEN_K and EVEN_M:
                xj = tl.load(x_ptr + m3 * s_xm + k).to(tl.float32)
            else:
                xj = tl.load(x_ptr + m3 * s_xm + k, mask=m_ok & (k < K), other=0.0)
                xj = xj.to(tl.float32)
            dot += (xj * (1.0 / (1 << ((j * BITS) % 16)))) * _codes_shifted(
                words, high, magic, j, BITS
            )
            xsum += xj
        acc += scale * (dot - zero * xsum)
    out = tl.sum(acc, axis=1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    if SPLIT_K == 1:
        _epilogue(
            out, offs_m, offs_n, m_ok, n_ok, x_ptr, s_xm, b_ptr, y_ptr, N, rp_ptr, oc_ptr, ov_ptr,
            HAS_BIAS, HAS_OUTLIERS,
        )  # fmt: skip
    else:
        mn = offs_m[:, None] * N + offs_n[None, :]
        mn_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(part_ptr + pid_k * M * N + mn, out, mask=mn_ok)
        tl.debug_barrier()  # all of this program's partial is written before the counter moves
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in tl.static_range(SPLIT_K):  # fixed order: the sum is deterministic
                # .cg reads from L2, where the other programs' partials are; L1 may be stale.
                total += tl.load(
                    part_ptr + s * M * N + mn, mask=mn_ok, other=0.0, cache_modifier=".cg"
                )
            _epilogue(
                total, offs_m, offs_n, m_ok, n_ok, x_ptr, s_xm, b_ptr, y_ptr, N, rp_ptr, oc_ptr,
                ov_ptr, HAS_BIAS, HAS_OUTLIERS,
            )  # fmt: skip
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, rp_ptr, oc_ptr, ov_ptr,
    M, N, K, KW, s_xm, s_wk, s_wn, s_sg, s_sn, s_zg, s_zn, magic, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ZP_PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    PW: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KW * PW
    # Programs along axis 0 share a weight tile, so neighbours in time reuse it from L2.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    shift = (tl.arange(0, PW) * BITS)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(0, tl.cdiv(KW, BLOCK_KW)):
        kw = t * BLOCK_KW + tl.arange(0, BLOCK_KW)
        mask = (kw < KW)[:, None] & n_ok[None, :]
        words = tl.load(w_ptr + kw[:, None] * s_wk + offs_n[None, :] * s_wn, mask=mask, other=0)
        g = (kw * PW // GROUP)[:, None]  # a tile may span groups (tl.dot needs K >= 16)
        scale, zero = _word_meta(
            s_ptr,
            z_ptr,
            g,
            offs_n[None, :],
            mask,
            s_sg,
            s_sn,
            s_zg,
            s_zn,
            BITS,
            HAS_ZP,
            ZP_PACKED,
        )
        # [BLOCK_KW, PW, BLOCK_N]: code j of word kw is input column kw * PW + j, so merging the
        # first two dims gives the [BLOCK_K, BLOCK_N] weight tile in column order.
        c = ((words[:, None, :] >> shift) & ((1 << BITS) - 1)) | magic
        c = c.to(tl.float32, bitcast=True) - 8388608.0  # exact codes, as in _codes_shifted
        w = (c - zero[:, None, :]) * scale[:, None, :]
        w = tl.reshape(w.to(DOT_DTYPE), (BLOCK_K, BLOCK_N))
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + offs_m[:, None] * s_xm + k[None, :],
            mask=m_ok[:, None] & (k < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(xt.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    _epilogue(
        acc, offs_m, offs_n, m_ok, n_ok, x_ptr, s_xm, b_ptr, y_ptr, N, rp_ptr, oc_ptr, ov_ptr,
        HAS_BIAS, HAS_OUTLIERS,
    )  # fmt: skip


def _fit_kw(block_kw: int, group: int, bits: int) -> int:
    """The largest power of two <= ``block_kw`` dividing the words per group (GEMV tiles must not
    straddle groups)."""
    words = group // (32 // bits)
    return min(block_kw, words & -words)


def _gemv_prune(configs, named_args, **kwargs):
    """Fit tiles to the group size; drop those whose accumulators would spill for this batch.

    The autotuner passes positional arguments as ``named_args`` and keywords as ``kwargs``."""
    args = {**named_args, **kwargs}
    bm, group, bits = args["BLOCK_M"], args["GROUP"], args["BITS"]
    seen, kept = set(), []
    for c in configs:
        kw = dict(c.kwargs, BLOCK_KW=_fit_kw(c.kwargs["BLOCK_KW"], group, bits))
        key = (tuple(sorted(kw.items())), c.num_warps)
        if key in seen or bm * kw["BLOCK_KW"] * kw["BLOCK_N"] > 32 * 32 * c.num_warps:
            continue
        seen.add(key)
        kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return kept or [
        triton.Config({"BLOCK_N": 16, "BLOCK_KW": _fit_kw(4, group, bits), "SPLIT_K": 1})
    ]


_EVEN = {  # whole tiles need no bounds masks
    "EVEN_M": lambda args: args["M"] == args["BLOCK_M"],
    "EVEN_K": lambda args: args["K"] % (args["BLOCK_KW"] * 32 // args["BITS"]) == 0,
    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
}


# Short lists: each config is compiled per (bits, group, zero point, bias, outliers, batch bucket).
# GEMV tiles are N-major (prepare_weight's layout): BLOCK_N wide keeps several outputs per thread,
# so each activation load serves several codes. Batch 1 is latency bound unless ~20 KB per SM are
# in flight: each program keeps two tiles in flight, so SPLIT_K multiplies programs until a
# 4096 x 4096 layer has several hundred (e.g. 64 wide x 8 splits = 512 programs of 2 warps).
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw, "SPLIT_K": sk}, num_warps=w)
    for bn, bkw, sk, w in [
        (128, 16, 1, 4), (128, 16, 2, 4), (128, 16, 4, 4), (256, 16, 2, 4), (256, 16, 4, 8),
        (64, 16, 4, 2), (256, 8, 4, 4), (64, 16, 8, 2), (128, 8, 8, 2), (64, 16, 16, 2),
        (32, 16, 8, 1),
    ]
]  # fmt: skip
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _GEMV_CONFIGS)
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w, num_stages=s)
    for bm, bn, bkw, w, s in [
        (16, 64, 16, 4, 3), (16, 128, 16, 4, 3), (16, 128, 8, 4, 4), (32, 128, 16, 4, 3),
        (64, 128, 16, 8, 3), (64, 128, 8, 4, 4), (128, 128, 16, 8, 3), (128, 128, 8, 8, 4),
    ]
]  # fmt: skip
_KEY = ["N", "K", "GROUP", "BITS", "HAS_ZP", "ZP_PACKED", "s_wn"]  # s_wn: which weight layout
_gemv = triton.heuristics(_EVEN)(_gemv_kernel)
_gemv_tuned = triton.autotune(
    _GEMV_CONFIGS, key=_KEY + ["BLOCK_M"], prune_configs_by={"early_config_prune": _gemv_prune}
)(_gemv)
_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=_KEY + ["M_BUCKET", "DOT_DTYPE"])(_gemm_kernel)


def m_bucket(m: int) -> int:
    """The batch size the GEMM kernels are tuned for (their ``M_BUCKET`` argument, unused in
    the kernel body): one tuning per power of two up to 512, not one per batch size."""
    return min(triton.next_power_of_2(m), 512)


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-device split-K counters; every launch leaves them at zero, so they are zeroed once.

    Shared by all launches on a device: kernels on two streams of one device at once would race.
    """
    counters = _counters.get(device)
    if counters is None or counters.numel() < n:
        counters = _counters[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not INTERPRETED:  # bf16 tl.dot is wrong under the interpreter
        return tl.bfloat16
    return tl.float32


def dequant_matmul_triton(
    x, words, scale, zero, bits, group_size, bias=None, outliers=None,
    zero_packed=False, config=None, gemv=None,
) -> torch.Tensor:  # fmt: skip
    """The kernels' launcher. ``words`` / ``scale`` are [KW, N] / [G, N] (any strides);
    ``zero`` is None, compressed-tensors' packed zero points (``zero_packed``) or prepare_weight's
    fp16 [G, N]. ``config`` fixes the tile sizes instead of autotuning (tests); ``gemv`` forces a
    path (benchmarks), by default GEMV for ``M <= GEMV_MAX_M``."""
    kw_total, n = words.shape
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    z_strides = (0, 0) if zero is None else zero.stride()[::-1] if zero_packed else zero.stride()
    rp, oc, ov = outliers if outliers is not None else (y, y, y)  # unused unless HAS_OUTLIERS
    args = dict(
        x_ptr=x2, w_ptr=words, s_ptr=scale, z_ptr=zero if zero is not None else words,
        b_ptr=bias if bias is not None else y, y_ptr=y, rp_ptr=rp, oc_ptr=oc, ov_ptr=ov,
        M=m, N=n, K=k, KW=kw_total, s_xm=x2.stride(0), magic=MAGIC,
        s_wk=words.stride(0), s_wn=words.stride(1), s_sg=scale.stride(0), s_sn=scale.stride(1),
        s_zg=z_strides[0], s_zn=z_strides[1], BITS=bits, GROUP=group_size,
        HAS_ZP=zero is not None, ZP_PACKED=zero_packed, HAS_BIAS=bias is not None,
        HAS_OUTLIERS=outliers is not None,
    )  # fmt: skip
    use_gemv = m <= GEMV_MAX_M if gemv is None else gemv
    if config is None and INTERPRETED:
        config = GEMV_INTERPRET if use_gemv else GEMM_INTERPRET
    if use_gemv:
        block_m = triton.next_power_of_2(m)
        split = MAX_SPLIT_K if config is None else config["SPLIT_K"]
        part = torch.empty(split * m * n, dtype=torch.float32, device=x.device)
        counters = _split_counters(x.device, n)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        if config is None:
            _gemv_tuned[grid](**args, part_ptr=part, count_ptr=counters, BLOCK_M=block_m)
        else:
            config = dict(config, BLOCK_KW=_fit_kw(config["BLOCK_KW"], group_size, bits))
            _gemv[grid](**args, part_ptr=part, count_ptr=counters, BLOCK_M=block_m, **config)
    else:
        dot_dtype = _dot_dtype(x.dtype)
        args.update(
            M_BUCKET=m_bucket(m), DOT_DTYPE=dot_dtype,
            PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",  # tf32 only matters for fp32
        )  # fmt: skip
        kernel = _gemm_tuned if config is None else _gemm_kernel
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        kernel[grid](**args, **(config or {}))
    return y.reshape(*x.shape[:-1], n)
