"""2:4 sparse weights with int4 (or int8) group-wise codes, stored compactly.

In every run of four consecutive input columns at most two weights are kept. A layer of ``N``
outputs and ``K`` inputs (``K`` a multiple of 4) is stored as:

- ``values``: int32 ``[N, ceil((K / 2) * bits / 32)]``: the codes of the kept weights, two slots per
  run of four columns in column order, packed along K with :func:`pack_int32`; codes are
  ``q + 2**(bits-1)`` as in the dense layout of :mod:`presso.kernels.wquant_matmul`;
- ``positions``: int32 ``[N, ceil(K / 32)]``: each slot's position in its run (0..3) as a 2-bit
  code, packed the same way. A run with two kept weights at ``a < b`` stores ``(a, b)``; with one
  kept weight at ``p``, ``(p, p)`` and the second slot is ignored; with none, ``(1, 0)`` and both are
  ignored. So slot 0 counts when ``p0 <= p1`` and slot 1 when ``p0 < p1``, and a pruned weight is
  exactly zero whatever the zero point;
- ``weight_scale`` / ``weight_zero_point``: exactly as the dense layout, groups counted in original
  input columns.

``W[n, k] = (q - zp) * scale`` where a slot names column ``k``, else 0. At 4 bits that is
``(4 + 2) / 2 = 3`` bits per weight instead of 4 (plus the scales), so the memory-bound kernel
moves about 25 % fewer weight bytes than dense int4; it decodes the positions in registers and
runs a dense ``tl.dot`` (no sparse tensor cores), so the saving is bandwidth, not FLOPs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from presso import UnsupportedError
from presso.kernels.dispatch import triton_module, triton_pays, use_triton
from presso.kernels.packing import pack_int32, unpack_int32
from presso.kernels.wquant_matmul import (
    TRITON_DTYPES,
    dense_matmul,
    dequantize_codes,
    fp32_matmul,
)


class Sparse24(NamedTuple):
    values: torch.Tensor  # int32 [N, ceil(K/2 * bits / 32)], kept codes, two slots per run of 4
    positions: torch.Tensor  # int32 [N, ceil(K / 32)], 2-bit position of each slot in its run


def _runs(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2 or t.shape[1] % 4:
        raise UnsupportedError(
            f"2:4 {name}: expected [N, K] with K a multiple of 4, got shape {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], -1, 4)


def compress_24(codes: torch.Tensor, mask: torch.Tensor, bits: int = 4) -> Sparse24:
    """Keep ``codes[n, k]`` where ``mask`` is True (at most 2 per run of 4 columns)."""
    runs, keep = _runs(codes, "codes"), _runs(mask.bool(), "mask")
    count = keep.sum(-1)
    if (count > 2).any():
        n, r = (count > 2).nonzero()[0].tolist()
        raise UnsupportedError(
            f"2:4: row {n}, columns {4 * r}..{4 * r + 3} keep {int(count[n, r])} weights; "
            "prune to at most 2 of every 4 consecutive inputs first"
        )
    pos = torch.arange(4, device=codes.device)
    # Kept positions first, ascending: sort by (dropped, position).
    order = torch.argsort((~keep) * 4 + pos, dim=-1)[..., :2]
    p0, p1 = order[..., 0], order[..., 1]
    p1 = torch.where(count == 2, p1, p0)  # one kept: (p, p)
    p0 = torch.where(count == 0, torch.ones_like(p0), p0)  # none kept: (1, 0)
    p1 = torch.where(count == 0, torch.zeros_like(p1), p1)
    v = runs.gather(-1, order).to(torch.int64)
    v[..., 0] *= count >= 1
    v[..., 1] *= count == 2
    slots = torch.stack([p0, p1], dim=-1).flatten(1)
    return Sparse24(pack_int32(v.flatten(1), bits), pack_int32(slots, 2))


def decompress_24(
    values: torch.Tensor, positions: torch.Tensor, in_features: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`compress_24`: ``(codes uint8 [N, K], mask bool [N, K])``, codes 0 where
    pruned."""
    slots = in_features // 2
    v = unpack_int32(values, bits, slots).long().reshape(values.shape[0], -1, 2)
    p = unpack_int32(positions, 2, slots).long().reshape(values.shape[0], -1, 2)
    valid = torch.stack([p[..., 0] <= p[..., 1], p[..., 0] < p[..., 1]], dim=-1)
    codes = torch.zeros(*v.shape[:2], 4, dtype=torch.long, device=values.device)
    codes.scatter_add_(-1, p, v * valid)
    mask = torch.zeros(*v.shape[:2], 4, dtype=torch.long, device=values.device)
    mask.scatter_add_(-1, p, valid.long())
    return codes.flatten(1).to(torch.uint8), mask.flatten(1).bool()


def dequantize_24(
    values: torch.Tensor,
    positions: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The dense fp32 ``[N, K]`` weight, exact zeros where pruned."""
    codes, mask = decompress_24(values, positions, in_features, bits)
    return dequantize_codes(codes, weight_scale, weight_zero_point, bits, group_size) * mask


def sparse24_matmul_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_24(
        values, positions, weight_scale, weight_zero_point, bits, group_size, x.shape[-1]
    )
    return fp32_matmul(x, w, bias)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` for a 2:4 compressed ``W``: the Triton kernel where it runs and (on a
    GPU) was measured faster, else the weight dequantized and a dense matmul; ``backend`` as in
    :func:`presso.kernels.wquant_matmul.dequant_matmul`."""
    k = x.shape[-1]
    if k % 4 or positions.shape[-1] != -(-k // 32):
        raise UnsupportedError(
            f"sparse24_matmul: {k} input features do not match positions of shape "
            f"{tuple(positions.shape)} (K must be a multiple of 4, ceil(K / 32) words per row)"
        )
    extra = [t for t in (weight_zero_point, bias) if t is not None]
    supported = bits in (4, 8) and group_size % 4 == 0 and x.dtype in TRITON_DTYPES
    if not (
        backend != "torch"
        and supported
        and use_triton(x, values, positions, weight_scale, *extra)
        and (backend == "triton" or triton_pays(f"w{bits}a16_2of4", x, k, values.shape[0]))
    ):
        w = dequantize_24(values, positions, weight_scale, weight_zero_point, bits, group_size, k)
        return dense_matmul(x, w, bias)
    kernels = triton_module("_sparse24_triton")
    return kernels.sparse24_matmul_triton(
        x, values, positions, weight_scale, weight_zero_point, bits, group_size, bias
    )
