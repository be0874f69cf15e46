"""AdaDim: per layer, group the grid along output rows or along input channels, whichever
rounds with the smaller output error.

The usual grouping shares a scale among ``group_size`` consecutive *input columns* of one output
row. When a few input channels carry much larger weights (typically those facing activation
outliers), those columns stretch every row's grid. Grouping instead ``group_size`` consecutive
*output rows* of one input column gives each input channel its own scales and isolates such
columns. Neither wins everywhere, so each layer is rounded both ways (with RTN or GPTQ) and the
one with the smaller ``tr(ΔW H ΔWᵀ)`` is kept.

An input-channel-grouped layer is stored as ``presso-pack-quantized-ic``: the ``pack-quantized``
tensors of the *transposed* weight ``Wᵀ`` (``[K, N]``, groups along N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.formats.quantized import InputChannelQuantizedWeight, QuantizedWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.quant.gptq import GPTQ, gptq_quantize
from presso.compressors.quant.primitives import PER_CHANNEL, GridSettings
from presso.compressors.quant.rtn import RTN
from presso.compressors.registry import check_range, register


def _fits(width: int, group_size: int) -> bool:
    return group_size == PER_CHANNEL or width % group_size == 0


@register(
    "adadim", "per layer, group along input or output channels, whichever errs less on the data"
)
@dataclass
class AdaDim(GridSettings):
    method: str = "gptq"  # rounding used in both groupings: "rtn" or "gptq"
    damp: float = 0.01  # GPTQ only: Hessian dampening, relative to its mean diagonal
    blocksize: int = 128  # GPTQ only: columns per lazy update batch

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"{prefix}.method: must be 'rtn' or 'gptq', got {self.method!r}")
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        if not (_fits(in_features, self.group_size) or _fits(out_features, self.group_size)):
            raise UnsupportedError(
                f"{name}: group_size {self.group_size} divides neither its {in_features} inputs "
                f"nor its {out_features} outputs; choose a common divisor (e.g. 32, 64) or -1"
            )

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def candidates(self, weight: torch.Tensor, stats: HessianStats, name: str) -> list:
        """The records of both groupings that fit the layer's shape."""
        n, k = weight.shape
        out = []
        if _fits(k, self.group_size):
            if self.method == "rtn":
                out.append(RTN(**self.grid_settings()).compress(weight))
            else:
                gptq = GPTQ(  # in input order, like the input-channel candidate below
                    **self.grid_settings(),
                    damp=self.damp,
                    act_order=False,
                    blocksize=self.blocksize,
                )
                out.append(gptq.compress(weight, stats, name))
        if _fits(n, self.group_size):
            g = n if self.group_size == PER_CHANNEL else self.group_size
            if self.method == "rtn":
                inner = RTN(**self.grid_settings(group_size=g)).compress(weight.T.contiguous())
            else:
                h = stats.hessian()
                q, scale, zero = gptq_quantize(
                    weight,
                    h,
                    self.bits,
                    g,
                    self.symmetric,
                    self.damp,
                    blocksize=self.blocksize,
                    input_channel=True,
                    name=name,
                    scale_dtype=self.scale_torch_dtype,
                )
                inner = QuantizedWeight(q.T.contiguous(), scale, zero, self.bits, g, self.symmetric)
            out.append(InputChannelQuantizedWeight(inner))
        return out

    def compress(self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"):
        self.check_shape(*weight.shape, name)
        cands = self.candidates(weight, stats, name)
        errors = [stats.output_error(c.dequantize() - weight.float()) for c in cands]
        return cands[errors.index(min(errors))]
