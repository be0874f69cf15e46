"""Stochastic-rounding gradient quantization, per bucket, packed into int32 words.

Reference implementation in plain torch. A flat gradient is cut into buckets of ``bucket_size``
values (a multiple of 32, so each bucket packs into whole words); each bucket keeps its own
``(min, scale)`` and its codes ``floor((x - min) / scale + u)`` with ``u ~ U[0, 1)``, which makes
the dequantized value an unbiased estimate of ``x``. :func:`quantize_pack` and :func:`unpack_dequantize` dispatch to
fused Triton kernels (``_grad_quant_triton``) that compute the same function; pass ``noise``
explicitly to compare them bit for bit.
"""

from __future__ import annotations

import torch

from presso.kernels.dispatch import triton_module, use_triton
from presso.kernels.packing import pack_int32, unpack_int32


def _buckets(n: int, bucket_size: int) -> int:
    if bucket_size <= 0 or bucket_size % 32:
        raise ValueError(f"bucket_size must be a positive multiple of 32, got {bucket_size}")
    return max(1, -(-n // bucket_size))


def uniform_noise(n_buckets: int, bucket_size: int, seed: int, device="cpu") -> torch.Tensor:
    """The U[0, 1) draws the reference uses for a given seed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(n_buckets, bucket_size, generator=gen, device=device)


def quantize_pack_reference(
    x: torch.Tensor, bits: int, bucket_size: int, seed: int = 0, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize flat ``x`` to ``bits`` per value. Returns ``(packed, meta)``:
    ``packed`` int32 ``[n_buckets, bits * bucket_size // 32]``, ``meta`` fp32 ``[n_buckets, 2]``
    holding each bucket's ``(min, scale)``."""
    x = x.reshape(-1).float()
    n_buckets = _buckets(x.numel(), bucket_size)
    pad = n_buckets * bucket_size - x.numel()
    # Pad with a value already in the last bucket so padding never widens its range.
    fill = x[-1] if x.numel() else x.new_zeros(())
    xb = torch.cat([x, fill.expand(pad)]).reshape(n_buckets, bucket_size)
    lo = xb.amin(dim=1, keepdim=True)
    levels = (1 << bits) - 1
    # A tensor divisor: CUDA divides by a Python scalar through its reciprocal, which would not
    # be the correctly rounded division the kernels (and the CPU) compute.
    scale = (xb.amax(dim=1, keepdim=True) - lo) / torch.full_like(lo, levels)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant bucket: codes are 0
    if noise is None:
        noise = uniform_noise(n_buckets, bucket_size, seed, device=x.device)
    codes = torch.floor((xb - lo) / scale + noise).clamp_(0, levels)
    return pack_int32(codes, bits), torch.cat([lo, scale], dim=1)


def unpack_dequantize_reference(
    packed: torch.Tensor, meta: torch.Tensor, bits: int, bucket_size: int, n: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_reference` (up to the rounding): the first ``n`` values."""
    codes = unpack_int32(packed, bits, bucket_size).float()
    return (codes * meta[:, 1:2] + meta[:, 0:1]).reshape(-1)[:n]


def _triton_ok(x: torch.Tensor, bits: int, bucket_size: int, *tensors: torch.Tensor) -> bool:
    _buckets(max(x.numel(), 1), bucket_size)  # validates bucket_size on every path
    return 1 <= bits <= 8 and x.numel() > 0 and use_triton(x, *tensors)


def quantize_pack(
    x: torch.Tensor, bits: int, bucket_size: int, seed: int = 0, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_pack_reference` through the fused Triton kernel where available.

    Without ``noise`` the kernel draws its own uniforms (Philox keyed by ``seed`` and position):
    the same distribution as the reference's, not the same numbers. Pass ``noise`` to get the
    reference's output bit for bit."""
    extra = [noise] if noise is not None else []
    if not _triton_ok(x, bits, bucket_size, *extra):
        return quantize_pack_reference(x, bits, bucket_size, seed, noise)
    return triton_module("_grad_quant_triton").quantize_pack_triton(
        x, bits, bucket_size, seed, noise
    )


def unpack_dequantize(
    packed: torch.Tensor, meta: torch.Tensor, bits: int, bucket_size: int, n: int
) -> torch.Tensor:
    """:func:`unpack_dequantize_reference` through the fused Triton kernel where available."""
    if n == 0 or not _triton_ok(packed, bits, bucket_size, meta):
        return unpack_dequantize_reference(packed, meta, bits, bucket_size, n)
    kernels = triton_module("_grad_quant_triton")
    return kernels.unpack_dequantize_triton(packed, meta, bits, bucket_size, n)
