"""Triton kernels behind :func:`presso.kernels.grad_quant.quantize_pack` / ``unpack_dequantize``.

One program per bucket, walking it in chunks of ``FRAMES`` frames of 32 values (32 codes of ``b``
bits fill exactly ``b`` words, so frames pack independently). Word ``w`` of a frame receives code
``i`` shifted by ``i * b - 32 * w`` bits (right when negative), which covers widths whose codes
straddle words (3, 5, 6, 7 bits) with the same arithmetic as 2, 4 and 8.

The arithmetic mirrors the torch reference step by step (IEEE division, no fused multiply-add), so
with the same ``noise`` the outputs are bit-identical. Without ``noise`` the kernel draws its own
U[0, 1) with Philox (``tl.rand``) keyed by ``seed`` and the element's index: deterministic and
unbiased, but not the reference's draws.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.kernels.dispatch import interpreting

INTERPRETED = interpreting()


@triton.jit
def _quantize_pack_kernel(
    x_ptr, noise_ptr, packed_ptr, meta_ptr, n, seed,
    BITS: tl.constexpr, WORDS: tl.constexpr, BUCKET: tl.constexpr, FRAMES: tl.constexpr,
    HAS_NOISE: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = BUCKET // 32
    LEVELS: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(0)
    lane = tl.arange(0, 32)
    fill = tl.load(x_ptr + n - 1).to(tl.float32)  # the reference pads with the last value

    lo = tl.full((FRAMES, 32), float("inf"), tl.float32)
    hi = tl.full((FRAMES, 32), float("-inf"), tl.float32)
    for c in range(0, F, FRAMES):
        f = c + tl.arange(0, FRAMES)
        idx = b * BUCKET + f[:, None] * 32 + lane[None, :]
        xv = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        xv = tl.where(idx < n, xv, fill)
        ok = (f < F)[:, None]
        lo = tl.minimum(lo, tl.where(ok, xv, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, xv, float("-inf")))
    lo_b = tl.min(tl.min(lo, axis=1), axis=0)
    scale = tl.math.div_rn(tl.max(tl.max(hi, axis=1), axis=0) - lo_b, LEVELS * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)  # constant bucket: all codes 0
    tl.store(meta_ptr + 2 * b, lo_b)
    tl.store(meta_ptr + 2 * b + 1, scale)

    word = tl.arange(0, WORDS)  # a frame's BITS words, padded to a power of two
    shift = lane[None, :] * BITS - 32 * word[:, None]  # [W, 32]: where code i lands in word w
    lands = (shift > -BITS) & (shift < 32) & (word < BITS)[:, None]
    for c in range(0, F, FRAMES):
        f = c + tl.arange(0, FRAMES)
        idx = b * BUCKET + f[:, None] * 32 + lane[None, :]
        xv = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        xv = tl.where(idx < n, xv, fill)
        if HAS_NOISE:
            u = tl.load(noise_ptr + idx, mask=(f < F)[:, None], other=0.0)
        else:
            u = tl.rand(seed, idx)
        q = tl.floor(tl.math.div_rn(xv - lo_b, scale) + u)
        code = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0).to(tl.int64)[:, None, :]
        s = shift[None, :, :]
        moved = tl.where(s >= 0, code << tl.maximum(s, 0), code >> tl.maximum(-s, 0))
        words = tl.sum(tl.where(lands[None, :, :], moved & 0xFFFFFFFF, 0), axis=2)
        out = packed_ptr + b * F * BITS + f[:, None] * BITS + word[None, :]
        tl.store(out, words.to(tl.int32), mask=(f < F)[:, None] & (word < BITS)[None, :])


@triton.jit
def _unpack_dequantize_kernel(
    packed_ptr, meta_ptr, y_ptr, n,
    BITS: tl.constexpr, BUCKET: tl.constexpr, FRAMES: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = BUCKET // 32
    b = tl.program_id(0)
    lo = tl.load(meta_ptr + 2 * b)
    scale = tl.load(meta_ptr + 2 * b + 1)
    bit = tl.arange(0, 32) * BITS
    first, shift = bit // 32, bit % 32  # code i starts in word `first` of its frame
    for c in range(0, F, FRAMES):
        f = c + tl.arange(0, FRAMES)
        ok = (f < F)[:, None]
        base = packed_ptr + b * F * BITS + f[:, None] * BITS
        w0 = tl.load(base + first[None, :], mask=ok, other=0).to(tl.int64) & 0xFFFFFFFF
        spill = ok & (first + 1 < BITS)[None, :]
        w1 = tl.load(base + first[None, :] + 1, mask=spill, other=0).to(tl.int64) & 0xFFFFFFFF
        code = ((w0 >> shift[None, :]) | (w1 << (32 - shift)[None, :])) & ((1 << BITS) - 1)
        idx = b * BUCKET + f[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(y_ptr + idx, code.to(tl.float32) * scale + lo, mask=idx < n)


def _frames(bucket_size: int) -> int:
    return min(triton.next_power_of_2(bucket_size // 32), 8)


def quantize_pack_triton(x, bits, bucket_size, seed=0, noise=None):
    x = x.reshape(-1).contiguous()
    n_buckets = max(1, -(-x.numel() // bucket_size))
    packed = torch.empty(n_buckets, bits * bucket_size // 32, dtype=torch.int32, device=x.device)
    meta = torch.empty(n_buckets, 2, dtype=torch.float32, device=x.device)
    if noise is not None:
        noise = noise.to(torch.float32).contiguous()
    _quantize_pack_kernel[(n_buckets,)](
        x, noise if noise is not None else x, packed, meta, x.numel(), seed,
        BITS=bits, WORDS=triton.next_power_of_2(bits), BUCKET=bucket_size,
        FRAMES=_frames(bucket_size), HAS_NOISE=noise is not None, enable_fp_fusion=False,
    )  # fmt: skip
    return packed, meta


def unpack_dequantize_triton(packed, meta, bits, bucket_size, n):
    y = torch.empty(n, dtype=torch.float32, device=packed.device)
    _unpack_dequantize_kernel[(packed.shape[0],)](
        packed.contiguous(), meta.contiguous(), y, n,
        BITS=bits, BUCKET=bucket_size, FRAMES=_frames(bucket_size), enable_fp_fusion=False,
    )  # fmt: skip
    return y
