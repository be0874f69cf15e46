"""AWQ: scale input channels before rounding so that the salient ones lose less, then clip.

A weight column that multiplies a large activation matters more to the output. Scaling column
``j`` of ``W`` up by ``s_j`` and the input down by ``s_j`` leaves ``W x`` unchanged but makes the
rounding error of that column relatively smaller. The division of the input is folded into the
operation that produces it (an RMSNorm's weight, or the rows of the previous linear), so the
transformed block computes exactly the same function before quantization.

Per group of linears sharing an input, ``s = mean|x|^α`` (normalised to geometric mean 1) with
``α`` searched on a grid in ``[0, 1)`` to minimise the squared error of the group's outputs on a
sample of calibration inputs under round-to-nearest. ``α = 0`` (no scaling) is on the grid, so
the search never does worse than plain RTN on that sample. The loss is measured on the linears'
own outputs (AWQ measures the enclosing attention/MLP block); this needs no attention kwargs and
is what makes the groups independent.

Then each weight group's clipping range ``[-m, m]`` is searched (``m`` from the group's absmax
down to ``(1 - max_shrink)`` of it) to minimise that group's output error. q/k projections are
not clipped: small changes there are amplified by the softmax (as in AWQ).

Which operation feeds which linears, and which are not clipped, is the model's declared
:class:`~presso.compressors.ptq.architectures.Architecture`; a group is left unscaled, and
logged, only when its fold cannot be exact: one of its linears is not compressed (ignored), or
the producer's outputs do not match the linears' inputs (v → o with grouped KV heads).

AWQ is a block transform; as the last recipe entry it also rounds each layer with RTN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.ptq.architectures import Architecture
from presso.compressors.ptq.calibration import ActivationStats
from presso.compressors.quant.primitives import (
    GridSettings,
    dequantize,
    fit_grid,
    quantize,
    resolve_group_size,
)
from presso.compressors.quant.rtn import RTN
from presso.compressors.registry import check_range, register

log = logging.getLogger(__name__)


def fake_quant(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16
) -> torch.Tensor:
    """``w`` rounded to its own min-max grid (what RTN would store), as floats."""
    scale, zero = fit_grid(w, bits, group_size, symmetric, scale_dtype)
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size)


def search_scale(
    x: torch.Tensor, x_absmean: torch.Tensor, weights: list[torch.Tensor], quant, n_grid: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale minimising the group's rounded output error, and its α."""
    refs = [x @ w.T for w in weights]
    base = x_absmean.float().clamp(min=1e-4)
    best = (float("inf"), torch.ones_like(base), 0.0)
    for step in range(n_grid):
        alpha = step / n_grid
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = sum(float(((xs @ quant(w * s).T - r) ** 2).sum()) for w, r in zip(weights, refs))
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]


def search_clip(
    w: torch.Tensor, x: torch.Tensor, quant, group_size: int, n_grid: int, max_shrink: float
) -> torch.Tensor:
    """Per (row, group) clipping bound ``m`` minimising that group's output error ``[N, G]``."""
    n, k = w.shape
    groups = k // group_size
    wg = w.reshape(n, groups, group_size)
    xg = x.reshape(-1, groups, group_size)
    ref = torch.einsum("tgc,ngc->ntg", xg, wg)
    org_max = wg.abs().amax(-1)
    best_err = torch.full((n, groups), float("inf"))
    best_max = org_max.clone()
    for step in range(int(max_shrink * n_grid)):
        m = org_max * (1 - step / n_grid)
        clipped = torch.maximum(torch.minimum(wg, m.unsqueeze(-1)), -m.unsqueeze(-1))
        q = quant(clipped.reshape(n, k)).reshape(n, groups, group_size)
        err = ((torch.einsum("tgc,ngc->ntg", xg, q) - ref) ** 2).mean(1)
        better = err < best_err
        best_err[better], best_max[better] = err[better], m[better]
    return best_max


def fold_scale(
    prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor, norm_offset: float = 0
) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' inputs by it; a norm
    scaling by ``(norm_offset + weight)`` (Gemma: 1) keeps that form."""
    with torch.no_grad():
        if prev.weight.dim() == 1:  # a norm's elementwise weight
            w = prev.weight.double()
            prev.weight.copy_((w + norm_offset) / s.double() - norm_offset)
        else:  # a linear's output rows
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


@register(
    "awq",
    "scale salient input channels before rounding, fold the scale back, clip (calibrated)",
)
@dataclass
class AWQ(GridSettings):
    grid: int = 20  # scale exponents α tried, evenly in [0, 1)
    clip: bool = True  # also search each weight group's clipping range
    clip_grid: int = 20  # clipping steps per unit shrink
    max_shrink: float = 0.5  # smallest clip tried: (1 - max_shrink) · absmax
    max_tokens: int = 1024  # input rows sampled per layer for the scale search
    clip_tokens: int = 256  # of those, rows used by the (costlier) clip search

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_range(f"{prefix}.grid", self.grid, 1, 1000)
        check_range(f"{prefix}.clip_grid", self.clip_grid, 1, 1000)
        check_range(f"{prefix}.max_shrink", self.max_shrink, 0.0, 0.99)
        check_range(f"{prefix}.max_tokens", self.max_tokens, 1, 1 << 24)
        check_range(f"{prefix}.clip_tokens", self.clip_tokens, 1, 1 << 24)

    def make_stats(self, in_features: int) -> ActivationStats:
        return ActivationStats.empty(in_features, self.max_tokens)

    def _quant(self, k: int, name: str):
        g = resolve_group_size(k, self.group_size, name)
        return g, lambda w: fake_quant(w, self.bits, g, self.symmetric, self.scale_torch_dtype)

    def transform_block(
        self,
        block: torch.nn.Module,
        stats: dict[str, ActivationStats],
        prefix: str,
        architecture: Architecture,
    ) -> dict[str, float]:
        """Scale (and clip) ``block``'s linears in place, by the groups ``architecture``
        declares; returns the chosen α per group (keyed by the producing module)."""
        modules = dict(block.named_modules())
        alphas, input_scale = {}, {}
        for prev_name, names in architecture.groups:
            prev, lins = modules[prev_name], [modules[n] for n in names]
            full = [f"{prefix}.{n}" for n in names]
            if any(f not in stats for f in full):
                log.info(
                    "%s.%s: a linear it feeds is not compressed; not scaled", prefix, prev_name
                )
                continue
            if prev.weight.shape[0] != lins[0].in_features:  # e.g. v → o with grouped KV heads
                log.debug("%s.%s: outputs do not match its linears' inputs", prefix, prev_name)
                continue
            st = stats[full[0]]
            _, quant = self._quant(lins[0].in_features, full[0])
            weights = [lin.weight.detach().float() for lin in lins]
            s, alphas[prev_name] = search_scale(st.sample, st.abs_mean(), weights, quant, self.grid)
            fold_scale(prev, lins, s, architecture.norm_offset)
            input_scale.update(dict.fromkeys(full, s))
        if self.clip:
            no_clip = {f"{prefix}.{n}" for n in architecture.no_clip}
            self._clip(modules, stats, prefix, input_scale, no_clip)
        return alphas

    def _clip(self, modules, stats, prefix: str, input_scale: dict, no_clip: set) -> None:
        for rel, lin in modules.items():
            full = f"{prefix}.{rel}"
            if not isinstance(lin, torch.nn.Linear) or full not in stats or full in no_clip:
                continue
            x = stats[full].sample[: self.clip_tokens]
            if full in input_scale:
                x = x / input_scale[full]  # the input the folded block now feeds this layer
            g, quant = self._quant(lin.in_features, full)
            w = lin.weight.detach().float()
            m = search_clip(w, x, quant, g, self.clip_grid, self.max_shrink)
            m = m.repeat_interleave(g, dim=1)
            with torch.no_grad():
                lin.weight.copy_(torch.maximum(torch.minimum(w, m), -m))

    def compress(self, weight: torch.Tensor, stats=None, name: str = "layer") -> QuantizedWeight:
        """As the recipe's solver: round the transformed weight with RTN on AWQ's grid."""
        return RTN(**self.grid_settings()).compress(weight, None, name)
