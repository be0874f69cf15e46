"""Integer weight grids: scales, zero points, quantize and dequantize.

The conventions are compressed-tensors' so that Presso's artifacts load there too:
codes are signed, ``q ∈ [-2**(b-1), 2**(b-1) - 1]``, and ``w ≈ (q - zero) * scale`` with one
``(scale, zero)`` per output row and group of ``group_size`` consecutive input columns.
Symmetric grids have ``zero = 0`` and ``scale = absmax / ((2**b - 1) / 2)``; asymmetric grids
map ``[min, max]`` (widened to include 0) onto the whole code range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.registry import check_range, register_format
from presso.kernels.packing import pack_int32, unpack_int32
from presso.kernels.wquant_matmul import dequant_matmul, prepare_weight

PER_CHANNEL = -1  # group_size value meaning "one group spanning the whole row"


def code_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def resolve_group_size(in_features: int, group_size: int, layer: str = "layer") -> int:
    """The actual group width for a layer, or a clear error when it does not divide the row."""
    if group_size == PER_CHANNEL:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise UnsupportedError(
            f"{layer}: group_size {group_size} does not divide its {in_features} input columns; "
            f"choose a divisor of {in_features} (e.g. 32, 64) or -1 for per-channel scales"
        )
    return group_size


def grid_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for value ranges ``[lo, hi]`` (any shape, elementwise)."""
    qmin, qmax = code_range(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.zeros_like(scale)
        nz = scale > 0
        zero[nz] = (qmin - lo[nz] / scale[nz]).round().clamp(qmin, qmax)
    return _nonzero(scale), zero.to(torch.int32)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group (or one whose scale underflows its dtype) gets scale 1: its codes are 0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` → ``[N, K // group_size, group_size]``."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Signed int8 codes of ``w`` (``[N, K]``) on a per-group grid (``[N, K // group_size]``)."""
    qmin, qmax = code_range(bits)
    wg = group_view(w.float(), group_size)
    q = (wg / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)
    return q.clamp_(qmin, qmax).reshape(w.shape).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    qg = group_view(q.to(torch.int32), group_size)
    w = (qg - zero.unsqueeze(-1)).float() * scale.float().unsqueeze(-1)
    return w.reshape(q.shape)


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


class QuantizedLinear(torch.nn.Module):
    """A linear layer that keeps its weight packed and computes through ``presso.kernels``."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], bits: int, group_size: int, bias=None
    ) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = (int(v) for v in tensors["weight_shape"])
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            self.register_buffer(name, tensors.get(name))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._prepared = None  # the kernels' repacked layout, built on first use on a GPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = None
        if x.is_cuda:
            if self._prepared is None or self._prepared.words.device != x.device:
                self._prepared = prepare_weight(
                    self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits
                )
            prepared = self._prepared
        return dequant_matmul(
            x,
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bits,
            self.group_size,
            self.bias,
            prepared=prepared,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


def fit_grid(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per group; the scale is rounded to ``scale_dtype`` before use."""
    wg = group_view(w.float(), group_size)
    scale, zero = grid_from_range(wg.amin(-1), wg.amax(-1), bits, symmetric)
    return _nonzero(scale.to(scale_dtype)), zero


@dataclass
class GridSettings:
    """The grid settings every weight quantizer shares; quantizer dataclasses extend it."""

    bits: int = 4  # code width, 2..8
    group_size: int = 128  # input columns sharing a scale; -1 for one scale per output row
    symmetric: bool = True  # zero point fixed at 0 (else a per-group zero point is stored)

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}.bits", self.bits, 2, 8)
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ConfigError(f"{prefix}.group_size: must be positive or -1, got {self.group_size}")

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """Raise ``UnsupportedError`` before any work if the layer's shape cannot be gridded."""
        resolve_group_size(in_features, self.group_size, name)
