"""Round-to-nearest (RTN): the min-max grid of each group, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.quant.primitives import GridSettings, fit_grid, quantize, resolve_group_size
from presso.compressors.registry import register


@register("rtn", "round each weight group to its min-max grid; no data needed, the baseline")
@dataclass
class RTN(GridSettings):
    needs_calibration = False

    def compress(self, weight: torch.Tensor, stats=None, name: str = "layer") -> QuantizedWeight:
        """Quantize one ``[out, in]`` weight; ``stats`` is unused (RTN needs no data)."""
        g = resolve_group_size(weight.shape[1], self.group_size, name)
        scale, zero = fit_grid(weight, self.bits, g, self.symmetric, self.scale_torch_dtype)
        q = quantize(weight, scale, zero, self.bits, g)
        return QuantizedWeight(q, scale, zero, self.bits, g, self.symmetric)
