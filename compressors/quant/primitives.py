"""Integer weight grids: scales, zero points, quantize and dequantize.

The conventions are compressed-tensors' so that Presso's artifacts load there too:
codes are signed, ``q ∈ [-2**(b-1), 2**(b-1) - 1]``, and ``w ≈ (q - zero) * scale`` with one
``(scale, zero)`` per output row and group of ``group_size`` consecutive input columns.
Symmetric grids have ``zero = 0`` and ``scale = absmax / ((2**b - 1) / 2)``; asymmetric grids
map ``[min, max]`` (widened to include 0) onto the whole code range.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.registry import check_range

PER_CHANNEL = -1  # group_size value meaning "one group spanning the whole row"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def fit_grid(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per group; the scale is rounded to ``scale_dtype`` before use."""
    wg = group_view(w.float(), group_size)
    scale, zero = grid_from_range(wg.amin(-1), wg.amax(-1), bits, symmetric)
    return _nonzero(stored_scale(scale, scale_dtype)), zero


def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype``. Below the dtype's normal range (fp16: 6.1e-5) rounding to
    nearest can shrink a scale by up to half of itself, or to zero, and the grid would no longer
    reach the group's largest weights: there a scale that rounded down is rounded up instead."""
    stored = scale.to(dtype)
    info = torch.finfo(dtype)
    short = (stored.float() < scale) & (stored.float() < info.tiny)
    up = (stored.float() + info.tiny * info.eps).to(dtype)  # one subnormal step up
    return torch.where(short, up, stored)


@dataclass
class GridSettings:
    """The grid settings every weight quantizer shares; quantizer dataclasses extend it."""

    bits: int = 4  # code width, 2..8
    group_size: int = 128  # input columns sharing a scale; -1 for one scale per output row
    symmetric: bool = True  # zero point fixed at 0 (else a per-group zero point is stored)
    scale_dtype: str = "float16"  # stored scales: float16, bfloat16 or float32 (more bytes)

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}.bits", self.bits, 2, 8)
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ConfigError(f"{prefix}.group_size: must be positive or -1, got {self.group_size}")
        if self.scale_dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{prefix}.scale_dtype: must be one of {sorted(FLOAT_DTYPES)}, "
                f"got {self.scale_dtype!r}"
            )

    def grid_settings(self, **changes) -> dict:
        """These grid settings as keywords (with ``changes``), to build another quantizer on the
        same grid: ``RTN(**self.grid_settings())``."""
        return {f.name: getattr(self, f.name) for f in fields(GridSettings)} | changes

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.scale_dtype]

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """Raise ``UnsupportedError`` before any work if the layer's shape cannot be gridded."""
        resolve_group_size(in_features, self.group_size, name)
