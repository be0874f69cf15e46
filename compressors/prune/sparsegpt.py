"""SparseGPT: prune with Optimal Brain Surgeon updates, optionally quantizing in the same sweep.

The sweep is :func:`presso.compressors.ptq.obs.obs_sweep`: each pruned (or rounded) column's error
is moved onto the columns not yet fixed, so the surviving weights compensate for the removed
ones. Which weights to remove is chosen lazily, from the compensated weights: for unstructured
sparsity once per block of columns, by the OBS saliency ``w² / [H⁻¹]ⱼⱼ`` (ranked as
``(w / U[j, j])²``) over the whole block; for ``N:M`` every ``M`` columns, per row.

The unstructured budget is exact for the layer: block ``[b0, b1)`` removes
``round(s·N·b1) - round(s·N·b0)`` weights, which adds up to ``round(s·N·K)``.

Joint prune + quantize is this same algorithm with ``bits > 0``: the kept weights are rounded to
a GPTQ grid inside the sweep, so quantization error is compensated together with pruning error
(one pass, rather than a pruner followed by a quantizer that cannot see the mask). The result
is stored as ``presso-sparse24-quantized`` (2:4) or ``presso-sparse-quantized``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.formats.sparse import (
    Sparse24QuantizedWeight,
    SparseQuantizedWeight,
    SparseWeight,
    sparse_record,
)
from presso.compressors.prune.masks import PruneSettings, keep_top, nm_mask
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.ptq.obs import aligned_blocksize, dead_columns, inverse_cholesky, obs_sweep
from presso.compressors.quant.gptq import GridRounder
from presso.compressors.quant.primitives import GridSettings, resolve_group_size
from presso.compressors.registry import check_range, register


class _PruneRule:
    """Column rule: choose masks ahead from the compensated weights, zero what is pruned."""

    def __init__(self, shape, sparsity, nm, dtype, grid: GridRounder | None):
        self.mask = torch.ones(shape, dtype=torch.bool)
        self.sparsity, self.nm, self.dtype, self.grid = sparsity, nm, dtype, grid

    def __call__(self, j: int, wb: torch.Tensor, i: int, ub: torch.Tensor) -> torch.Tensor:
        rows, width = wb.shape
        if self.nm is None and i == 0:
            saliency = (wb / ub.diagonal()) ** 2
            prune = round(self.sparsity * rows * (j + width)) - round(self.sparsity * rows * j)
            self.mask[:, j : j + width] = keep_top(saliency.flatten(), prune).reshape(wb.shape)
        elif self.nm is not None and j % self.nm[1] == 0:
            m = self.nm[1]
            saliency = (wb[:, i : i + m] / ub.diagonal()[i : i + m]) ** 2
            self.mask[:, j : j + m] = nm_mask(saliency, *self.nm)
        col = wb[:, i] * self.mask[:, j]
        if self.grid is None:  # kept values are stored in `dtype`: compensate that rounding too
            return col.to(self.dtype).float()
        return self.grid.round(j, col, wb[:, i:])


@register(
    "sparsegpt",
    "prune column by column, the rest compensating; optionally quantize in the same sweep",
)
@dataclass
class SparseGPT(PruneSettings):
    damp: float = 0.01  # dampening added to the Hessian diagonal, relative to its mean
    blocksize: int = 128  # columns per lazy batch and per unstructured mask choice
    bits: int = 0  # 0: keep values in `dtype`; 2..8: quantize them in the sweep (joint)
    group_size: int = 128  # with bits > 0: input columns sharing a scale; -1 per row
    symmetric: bool = True  # with bits > 0: zero point fixed at 0

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)
        check_range(f"{prefix}.blocksize", self.blocksize, 1, 1 << 16)
        if self.bits:
            self._grid().validate(prefix)

    def _grid(self) -> GridSettings:
        return GridSettings(self.bits, self.group_size, self.symmetric)

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        super().check_shape(out_features, in_features, name)
        if self.bits:
            self._grid().check_shape(out_features, in_features, name)

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(
        self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"
    ) -> SparseWeight | SparseQuantizedWeight:
        h = stats.hessian()
        w = weight.float().clone()
        w[:, dead_columns(h)] = 0
        n, k = w.shape
        width = self.nm[1] if self.nm else 1
        grid = None
        if self.bits:
            g = resolve_group_size(k, self.group_size, name)
            perm = torch.arange(k)
            grid = GridRounder(w, self.bits, g, self.symmetric, perm, g == k, False)
            width = math.lcm(width, g) if g < k else width
        rule = _PruneRule(w.shape, self.sparsity, self.nm, self.value_dtype, grid)
        u = inverse_cholesky(h, self.damp, name)
        w_hat = obs_sweep(w, u, rule, aligned_blocksize(width, self.blocksize))
        if grid is None:
            return sparse_record(w_hat, rule.mask, self.nm, self.value_dtype)
        qw = QuantizedWeight(grid.q, grid.scale, grid.zero, self.bits, grid.g, self.symmetric)
        cls = Sparse24QuantizedWeight if self.nm == (2, 4) else SparseQuantizedWeight
        return cls(rule.mask, qw)
