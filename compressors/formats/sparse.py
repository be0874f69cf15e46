"""Stored formats of pruned layers: a bitmask of kept weights plus the kept values.

- ``sparse-bitmask`` (compressed-tensors' layout): ``shape`` (int64 ``[2]``), ``compressed``
  (the kept values in row-major order, 1-D), ``bitmask`` (uint8 ``[N, ceil(K / 8)]``, bit ``c % 8``
  of byte ``c // 8`` set when column ``c`` is kept: numpy's ``packbits(bitorder="little")``) and
  ``row_offsets`` (int64 ``[N]``, index in ``compressed`` where each row starts).
- ``sparse-24-bitmask`` (compressed-tensors' 2:4 layout): ``shape`` (int64 ``[2, 1]``),
  ``compressed`` (``[N, K / 2]``: every row keeps exactly half its values) and ``bitmask``.
- ``presso-sparse24-quantized`` (joint 2:4 + quantize): :mod:`presso.kernels.sparse24`'s layout,
  which its Triton kernel runs;
- ``presso-sparse-quantized`` (Presso's own; joint prune + quantize, other patterns): the ``pack-quantized``
  tensors (``weight_scale``, ``weight_shape``, ``weight_zero_point``) of a grid, but
  ``weight_packed`` holds only the kept weights' codes, row-major, packed into one int32 row;
  ``bitmask`` as above says where they go. A pruned weight is exactly 0.

The layers compute through :class:`~presso.compressors.formats.linear.RecordLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from presso.compressors.formats.linear import RecordLinear, Sparse24Linear
from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.registry import register_format
from presso.kernels.packing import pack_int32, packed_length, unpack_int32
from presso.kernels.sparse24 import compress_24, decompress_24


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bool → uint8 ``[N, ceil(K / 8)]``, little-endian bits within each byte."""
    n, k = mask.shape
    m = F.pad(mask.to(torch.int32), (0, (-k) % 8)).reshape(n, -1, 8)
    return (m << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bitmask(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: the ``[N, K]`` bool mask."""
    b = (bits.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return b.flatten(1)[:, :k].bool()


@register_format
@dataclass
class SparseWeight:
    """A pruned weight: which entries are kept and their values (in the stored dtype)."""

    mask: torch.Tensor  # bool [N, K], True where kept
    values: torch.Tensor  # [nnz] kept values, row-major

    format = "sparse-bitmask"

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor, dtype=torch.float16):
        return cls(mask.bool(), w[mask.bool()].to(dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def sparsity(self) -> float:
        return 1.0 - self.mask.sum().item() / self.mask.numel()

    def dequantize(self) -> torch.Tensor:
        w = torch.zeros(self.shape, dtype=torch.float32)
        w[self.mask] = self.values.float()
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        counts = self.mask.sum(1)
        return {
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "compressed": self.values,
            "bitmask": pack_bitmask(self.mask),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }

    def scheme(self) -> dict:
        return {"format": self.format, "sparsity": round(self.sparsity(), 6)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict):
        k = int(t["shape"].flatten()[1])
        return cls(unpack_bitmask(t["bitmask"], k), t["compressed"].flatten())

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return RecordLinear(self, bias)


@register_format
@dataclass
class Sparse24Weight(SparseWeight):
    """A 2:4 pruned weight: every row keeps exactly ``K / 2`` values, so they form a matrix."""

    format = "sparse-24-bitmask"

    def tensors(self) -> dict[str, torch.Tensor]:
        n, k = self.shape
        return {
            "shape": torch.tensor(self.shape, dtype=torch.int64).reshape(-1, 1),
            "compressed": self.values.reshape(n, k // 2),
            "bitmask": pack_bitmask(self.mask),
        }


def sparse_record(w: torch.Tensor, mask: torch.Tensor, nm, dtype) -> SparseWeight:
    """The stored record of a pruned weight: the 2:4 layout for 2:4, the general one otherwise."""
    cls = Sparse24Weight if nm == (2, 4) else SparseWeight
    return cls.from_dense(w, mask, dtype)


@register_format
@dataclass
class SparseQuantizedWeight:
    """A pruned weight whose kept values are on an integer grid (joint prune + quantize).

    ``grid.q`` holds codes for every position; pruned positions hold the zero point, so the
    dense dequantization is exactly 0 there. Only the kept codes are stored.
    """

    mask: torch.Tensor  # bool [N, K], True where kept
    grid: QuantizedWeight  # codes and grid; pruned positions carry the zero point

    format = "presso-sparse-quantized"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def dequantize(self) -> torch.Tensor:
        return self.grid.dequantize()

    def tensors(self) -> dict[str, torch.Tensor]:
        g = self.grid
        offset = 1 << (g.bits - 1)
        out = {k: v for k, v in g.tensors().items() if k != "weight_packed"}
        kept = g.q[self.mask].to(torch.int32) + offset
        out["weight_packed"] = pack_int32(kept.unsqueeze(0), g.bits)
        out["bitmask"] = pack_bitmask(self.mask)
        return out

    def scheme(self) -> dict:
        sparsity = 1.0 - self.mask.sum().item() / self.mask.numel()
        return {**self.grid.scheme(), "sparsity": round(sparsity, 6)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict):
        k = int(t["weight_shape"][1])
        mask = unpack_bitmask(t["bitmask"], k)
        kept = unpack_int32(t["weight_packed"], scheme["num_bits"], int(mask.sum()))[0]
        return cls.with_kept_codes(t, scheme, mask, kept)

    @classmethod
    def with_kept_codes(cls, t: dict, scheme: dict, mask: torch.Tensor, kept: torch.Tensor):
        """The record from the grid tensors, the mask and the kept (unsigned) codes."""
        n, k = (int(v) for v in t["weight_shape"])
        bits = scheme["num_bits"]
        # Read the grid through the dense format, with placeholder codes filled in below.
        placeholder = torch.zeros(n, packed_length(k, bits), dtype=torch.int32)
        grid = QuantizedWeight.from_tensors({**t, "weight_packed": placeholder}, scheme)
        grid.q = grid.zero.repeat_interleave(grid.group_size, dim=1).to(torch.int8)
        grid.q[mask] = (kept.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
        return cls(mask, grid)

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return RecordLinear(self, bias)


@register_format
@dataclass
class Sparse24QuantizedWeight(SparseQuantizedWeight):
    """Joint 2:4 + quantized, in :mod:`presso.kernels.sparse24`'s layout (``weight_values``:
    two code slots per run of four inputs, ``weight_positions``: their 2-bit positions) plus the
    ``pack-quantized`` grid tensors; computes through ``sparse24_matmul``."""

    format = "presso-sparse24-quantized"

    def tensors(self) -> dict[str, torch.Tensor]:
        g = self.grid
        out = {k: v for k, v in g.tensors().items() if k != "weight_packed"}
        codes = g.q.to(torch.int32) + (1 << (g.bits - 1))
        out["weight_values"], out["weight_positions"] = compress_24(codes, self.mask, g.bits)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict):
        k = int(t["weight_shape"][1])
        codes, mask = decompress_24(
            t["weight_values"], t["weight_positions"], k, scheme["num_bits"]
        )
        return cls.with_kept_codes(t, scheme, mask, codes[mask])

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return Sparse24Linear(self.tensors(), self.grid.bits, self.grid.group_size, bias)
