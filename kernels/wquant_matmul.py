"""Group-wise weight-only quantized matmul (W4A16 / W8A16 and other widths).

Weights are in compressed-tensors' ``pack-quantized`` layout for a linear layer of ``N`` outputs
and ``K`` inputs quantized to ``bits`` with groups of ``group_size`` input columns:

- ``weight_packed``: int32 ``[N, ceil(K * bits / 32)]``, codes ``q + 2**(bits-1)`` packed along K;
- ``weight_scale``: ``[N, K // group_size]`` (fp16, bf16 or fp32; ``ceil`` when the last group is
  ragged);
- ``weight_zero_point``: ``None`` for symmetric, else int32 ``[ceil(N * bits / 32), K // group_size]``,
  codes ``zp + 2**(bits-1)`` packed along N;

and ``W[n, k] = (q[n, k] - zp[n, k // group_size]) * scale[n, k // group_size]``; the result is
``x @ W.T + bias`` in ``x``'s dtype, accumulated in fp32. Optional SpQR outliers
(:mod:`presso.kernels.outliers`) add a sparse fp16 correction to ``W``.

:func:`dequant_matmul` runs the Triton kernels (``_wquant_triton``) for 2, 4 and 8 bits when the
group size is a multiple of ``32 // bits`` and (on a GPU) they were measured faster than cuBLAS
there, and dequantizes the weight for a dense matmul otherwise. Layers that run
many times may call :func:`prepare_weight` once at load: it transposes the packed words and scales
so N is the contiguous dimension, which the kernels read with wider loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from presso import UnsupportedError
from presso.kernels.dispatch import triton_module, triton_pays, use_triton
from presso.kernels.outliers import Outliers, outliers_to_dense
from presso.kernels.packing import packed_length, unpack_int32

TRITON_BITS = (2, 4, 8)  # widths whose codes never straddle an int32 word
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PreparedWeight(NamedTuple):
    """A layer's packed tensors laid out once at load for the kernels: N is contiguous in all."""

    words: torch.Tensor  # int32 [ceil(K * bits / 32), N]: weight_packed transposed
    scale: torch.Tensor  # [groups, N]: weight_scale transposed
    zero: torch.Tensor | None  # fp16 [groups, N] zero codes (exact integers); None if symmetric


def prepare_weight(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
) -> PreparedWeight:
    """The one-time repack the kernels prefer; pass it as ``dequant_matmul(..., prepared=)``.

    With N contiguous in the words, scales and zero points, every load of the GEMV kernel shares
    one register layout (no shuffles) and its words load as 16-byte vectors. Unpacked fp16 zero
    points cost 2 bytes per group and output instead of ``bits / 8`` (about 1.5 % more bytes than
    the packed layer at 4 bits and groups of 128); the original tensors are not needed by it.
    """
    zero = None
    if weight_zero_point is not None:
        n = weight_packed.shape[0]
        zero = unpack_int32(weight_zero_point, bits, n, dim=0).t().to(torch.float16).contiguous()
    return PreparedWeight(weight_packed.t().contiguous(), weight_scale.t().contiguous(), zero)


def dequantize_weight(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The dense fp32 ``[N, K]`` weight the packed tensors stand for."""
    codes = unpack_int32(weight_packed, bits, in_features)
    return dequantize_codes(codes, weight_scale, weight_zero_point, bits, group_size)


def dequantize_codes(
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """The dense fp32 weight of unpacked ``codes`` ``[N, K]`` (``q + 2**(bits-1)``)."""
    offset = 1 << (bits - 1)
    n, in_features = codes.shape
    q = codes.to(torch.int32) - offset
    if weight_zero_point is None:
        zp = torch.zeros_like(weight_scale, dtype=torch.int32)
    else:
        zp = unpack_int32(weight_zero_point, bits, n, dim=0).to(torch.int32) - offset
    zp = zp.repeat_interleave(group_size, dim=1)[:, :in_features]
    scale = weight_scale.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    return (q - zp).float() * scale


def dequant_matmul_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    outliers: Outliers | None = None,
) -> torch.Tensor:
    w = dequantize_weight(
        weight_packed, weight_scale, weight_zero_point, bits, group_size, x.shape[-1]
    )
    if outliers is not None:
        w = w + outliers_to_dense(outliers, x.shape[-1])
    return fp32_matmul(x, w, bias)


def fp32_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + bias`` in fp32, returned in ``x``'s dtype: the references' exact product."""
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dense_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fallback for a dequantized fp32 ``w``: on a GPU in ``x``'s dtype (the half-precision
    cuBLAS GEMM a dense layer runs), on the CPU the fp32 reference product."""
    if not x.is_cuda:
        return fp32_matmul(x, w, bias)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_shapes(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bits: int,
    group_size: int,
) -> None:
    """Raise :class:`UnsupportedError` when ``x`` and the packed tensors do not fit together."""
    k = x.shape[-1]
    if weight_packed.shape[-1] != packed_length(k, bits):
        raise UnsupportedError(
            f"dequant_matmul: input has {k} features but weight_packed has "
            f"{weight_packed.shape[-1]} words per row ({packed_length(k, bits)} expected for "
            f"{bits}-bit codes); check bits and the layer's in_features"
        )
    groups = -(-k // group_size)
    if weight_scale.shape != (weight_packed.shape[0], groups):
        raise UnsupportedError(
            f"dequant_matmul: weight_scale has shape {tuple(weight_scale.shape)}, expected "
            f"{(weight_packed.shape[0], groups)} for group_size {group_size}"
        )


def dequant_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    outliers: Outliers | None = None,
    prepared: PreparedWeight | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` for packed ``W``: the Triton kernel, or the weight dequantized and a
    dense matmul (cuBLAS on a GPU; the fp32 reference on the CPU).

    ``backend="auto"`` takes the kernel where it runs (CUDA, or the CPU interpreter) and, on a
    GPU, was measured faster there (``presso.kernels.dispatch``); ``"triton"`` and ``"torch"``
    force one (benchmarks, tests). When ``prepared`` (from :func:`prepare_weight`) is given, the
    Triton path reads it instead of the packed tensors.
    """
    check_shapes(x, weight_packed, weight_scale, bits, group_size)
    extra = [t for t in (weight_zero_point, bias) if t is not None]
    if outliers is not None:
        extra += list(outliers)
    supported = bits in TRITON_BITS and group_size % (32 // bits) == 0 and x.dtype in TRITON_DTYPES
    kernel = f"w{bits}a16" if prepared is not None else f"w{bits}a16_ct"
    n, k = weight_packed.shape[0], x.shape[-1]
    if not (
        backend != "torch"
        and supported
        and use_triton(x, weight_packed, weight_scale, *extra)
        and (backend == "triton" or triton_pays(kernel, x, k, n))
    ):
        w = dequantize_weight(weight_packed, weight_scale, weight_zero_point, bits, group_size, k)
        if outliers is not None:
            w = w + outliers_to_dense(outliers, k)
        return dense_matmul(x, w, bias)
    kernels = triton_module("_wquant_triton")
    if prepared is not None:
        return kernels.dequant_matmul_triton(x, *prepared, bits, group_size, bias, outliers)
    # The kernels take strides, so compressed-tensors' layout works as it is (more slowly).
    return kernels.dequant_matmul_triton(
        x, weight_packed.t(), weight_scale.t(), weight_zero_point, bits, group_size, bias,
        outliers, zero_packed=True,
    )  # fmt: skip
