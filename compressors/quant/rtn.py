"""Round-to-nearest (RTN): the min-max grid of each group, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import ConfigError
from presso.compressors.quant.base import (
    PER_CHANNEL,
    QuantizedWeight,
    fit_grid,
    quantize,
    resolve_group_size,
)
from presso.compressors.registry import check_range, register


@register("rtn")
@dataclass
class RTN:
    bits: int = 4  # code width, 2..8
    group_size: int = 128  # input columns sharing a scale; -1 for one scale per output row
    symmetric: bool = True  # zero point fixed at 0 (else a per-group zero point is stored)

    needs_calibration = False

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}.bits", self.bits, 2, 8)
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ConfigError(f"{prefix}.group_size: must be positive or -1, got {self.group_size}")

    def compress(self, weight: torch.Tensor, stats=None, name: str = "layer") -> QuantizedWeight:
        """Quantize one ``[out, in]`` weight; ``stats`` is unused (RTN needs no data)."""
        g = resolve_group_size(weight.shape[1], self.group_size, name)
        scale, zero = fit_grid(weight, self.bits, g, self.symmetric)
        q = quantize(weight, scale, zero, self.bits, g)
        return QuantizedWeight(q, scale, zero, self.bits, g, self.symmetric)
