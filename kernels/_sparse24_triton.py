"""Triton kernel behind :func:`presso.kernels.sparse24.sparse24_matmul`.

A program owns a ``BLOCK_M x BLOCK_N`` output tile and walks K in tiles of ``BLOCK_G`` runs of four
columns. Per run it decodes both slots' codes and positions from their int32 words, dequantizes
them, and scatters them into the dense ``[4 * BLOCK_G, BLOCK_N]`` weight tile (zeros where no slot
names a column), which meets the activation tile in one dense ``tl.dot`` with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.kernels.dispatch import interpreting, triton_module

INTERPRETED = interpreting()
_dense = triton_module("_wquant_triton")  # built in the same mode as this module
_epilogue = _dense._epilogue
_word_meta = _dense._word_meta

INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_G": 16}


@triton.jit(do_not_specialize=["M_BUCKET"])
def _sparse24_kernel(
    x_ptr, v_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, s_xm, s_vn, s_pn, s_sn, s_zn, magic, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    PW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    j = tl.arange(0, 4)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(0, tl.cdiv(K // 4, BLOCK_G)):
        run = t * BLOCK_G + tl.arange(0, BLOCK_G)
        mask = (run < K // 4)[:, None] & n_ok[None, :]
        slot = 2 * run  # both slots of a run share one word: 2 * run is even, PW and 16 are even
        vw = tl.load(v_ptr + offs_n[None, :] * s_vn + (slot // PW)[:, None], mask=mask, other=0)
        pw = tl.load(p_ptr + offs_n[None, :] * s_pn + (slot // 16)[:, None], mask=mask, other=0)
        v_shift = ((slot % PW) * BITS)[:, None]
        p_shift = ((slot % 16) * 2)[:, None]
        # Codes to exact fp32 through the mantissa of 2**23, as in the dense kernels.
        c0 = (((vw >> v_shift) & MASK) | magic).to(tl.float32, bitcast=True) - 8388608.0
        c1 = (((vw >> (v_shift + BITS)) & MASK) | magic).to(tl.float32, bitcast=True) - 8388608.0
        p0 = (pw >> p_shift) & 3
        p1 = (pw >> (p_shift + 2)) & 3
        g = (4 * run // GROUP)[:, None]  # group_size is a multiple of 4: a run lies in one group
        scale, zero = _word_meta(
            s_ptr, z_ptr, g, offs_n[None, :], mask, 1, s_sn, 1, s_zn, BITS, HAS_ZP, True
        )
        # Slot 0 counts when p0 <= p1, slot 1 when p0 < p1 (see the format in sparse24); a slot
        # that does not count is zero, so two selects scatter both into [BLOCK_G, 4, BLOCK_N]
        # (column 4 * run + j, in column order).
        w0 = tl.where(p0 <= p1, (c0 - zero) * scale, 0.0)[:, None, :]
        w1 = tl.where(p0 < p1, (c1 - zero) * scale, 0.0)[:, None, :]
        w = tl.where(p0[:, None, :] == j, w0, tl.where(p1[:, None, :] == j, w1, 0.0))
        w = tl.reshape(w.to(DOT_DTYPE), (4 * BLOCK_G, BLOCK_N))
        k = 4 * t * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
        xt = tl.load(
            x_ptr + offs_m[:, None] * s_xm + k[None, :],
            mask=m_ok[:, None] & (k < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(xt.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    _epilogue(
        acc, offs_m, offs_n, m_ok, n_ok, x_ptr, s_xm, b_ptr, y_ptr, N, y_ptr, y_ptr, y_ptr,
        HAS_BIAS, False,
    )  # fmt: skip


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": bg}, num_warps=w, num_stages=s)
    for bm, bn, bg, w, s in [
        (16, 64, 16, 4, 3), (16, 128, 16, 8, 3), (32, 128, 16, 8, 3), (64, 64, 16, 4, 3),
        (64, 128, 16, 8, 3), (128, 128, 16, 8, 3),
    ]
]  # fmt: skip
_tuned = triton.autotune(
    _CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "BITS", "HAS_ZP", "DOT_DTYPE"]
)(_sparse24_kernel)


def sparse24_matmul_triton(
    x, values, positions, weight_scale, weight_zero_point, bits, group_size, bias=None, config=None
) -> torch.Tensor:
    """The kernel's launcher; ``config`` fixes the tile sizes (tests) instead of autotuning."""
    n = values.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    values, positions, weight_scale = (t.contiguous() for t in (values, positions, weight_scale))
    zp = weight_zero_point.contiguous() if weight_zero_point is not None else None
    dot_dtype = _dense._dot_dtype(x.dtype)
    if config is None and INTERPRETED:
        config = INTERPRET_CONFIG
    kernel = _tuned if config is None else _sparse24_kernel
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](
        x2, values, positions, weight_scale, zp if zp is not None else values,
        bias if bias is not None else y, y,
        m, n, k, x2.stride(0), values.stride(0), positions.stride(0), weight_scale.stride(0),
        zp.stride(0) if zp is not None else 0, _dense.MAGIC, _dense.m_bucket(m),
        BITS=bits, GROUP=group_size, HAS_ZP=zp is not None, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype,
        PRECISION="ieee" if dot_dtype == tl.float32 else "tf32", **(config or {}),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
