"""Weights on an integer grid, stored as compressed-tensors' ``pack-quantized`` format.

Signed codes ``q`` packed into int32 words, one ``(scale, zero)`` per output row and group of
input columns (:mod:`presso.compressors.quant.primitives` holds the grid arithmetic), so Presso's
artifacts load in compressed-tensors too. AdaDim's input-channel grouping is stored as the record
of the transposed weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.linear import QuantizedLinear, RecordLinear
from presso.compressors.quant.primitives import dequantize
from presso.compressors.registry import register_format
from presso.kernels.packing import pack_int32, unpack_int32


@register_format
@dataclass
class QuantizedWeight:
    """One linear layer's weight on an integer grid; the unit every quantizer returns.

    ``scale`` is stored in ``scale_dtype`` (fp16 by default, as compressed-tensors stores
    it for fp16 models) and the codes are computed against that rounded scale, so what is
    saved is exactly what was evaluated.
    """

    q: torch.Tensor  # int8 [N, K], signed codes
    scale: torch.Tensor  # [N, K // group_size]
    zero: torch.Tensor  # int32 [N, K // group_size]; all zero when symmetric
    bits: int
    group_size: int
    symmetric: bool

    format = "pack-quantized"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored in the artifact, named as compressed-tensors names them."""
        offset = 1 << (self.bits - 1)
        out = {
            "weight_packed": pack_int32(self.q.to(torch.int32) + offset, self.bits),
            "weight_scale": self.scale,
            "weight_shape": torch.tensor(self.shape, dtype=torch.int64),
        }
        if not self.symmetric:
            out["weight_zero_point"] = pack_int32(self.zero + offset, self.bits, dim=0)
        return out

    def scheme(self) -> dict:
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": "group" if self.group_size < self.shape[1] else "channel",
            "group_size": self.group_size if self.group_size < self.shape[1] else None,
            "dynamic": False,
            "actorder": None,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict) -> QuantizedWeight:
        bits = scheme["num_bits"]
        n, k = (int(v) for v in t["weight_shape"])
        offset = 1 << (bits - 1)
        q = unpack_int32(t["weight_packed"], bits, k).to(torch.int32) - offset
        scale = t["weight_scale"]
        if "weight_zero_point" in t:
            zero = unpack_int32(t["weight_zero_point"], bits, n, dim=0).to(torch.int32) - offset
        else:
            zero = torch.zeros(scale.shape, dtype=torch.int32)
        return cls(
            q=q.to(torch.int8),
            scale=scale,
            zero=zero,
            bits=bits,
            group_size=scheme.get("group_size") or k,
            symmetric=scheme["symmetric"],
        )

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return QuantizedLinear(self.tensors(), self.bits, self.group_size, bias)


@register_format
@dataclass
class InputChannelQuantizedWeight:
    """A weight quantized with groups along its output rows, kept as its transpose's record."""

    transposed: QuantizedWeight  # the record of Wᵀ [K, N]

    format = "presso-pack-quantized-ic"

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.transposed.shape
        return n, k

    def dequantize(self) -> torch.Tensor:
        return self.transposed.dequantize().T

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.transposed.tensors()

    def scheme(self) -> dict:
        return {**self.transposed.scheme(), "grouping": "input_channel"}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict):
        return cls(QuantizedWeight.from_tensors(t, scheme))

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return RecordLinear(self, bias)
