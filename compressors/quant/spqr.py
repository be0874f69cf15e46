"""SpQR-style quantization: GPTQ with small groups, quantized grids and fp16 outliers.

The sweep is GPTQ's (:func:`presso.compressors.ptq.obs.obs_sweep`). When it reaches a group of
``group_size`` columns (16 by default) it

1. picks that group's outliers: the weights whose keeping in fp16 lowers the group's
   Hessian-weighted rounding error ``Σ ((w - ŵ) / U[j, j])²`` the most. Keeping a weight both
   removes its own error and may shrink its row's min-max range, so each weight's gain is
   measured leave-one-out (the row's grid refitted without it). Every group keeps the same share,
   ``round(outlier_fraction · N · group_size)``, so the layer's outlier count is known up front;
2. fits each row's grid on the non-outliers, then rounds the scales (and zero points) themselves
   to ``stat_bits`` bits, sharing one second-level fp16 grid per ``stat_group`` rows; the
   codes are computed against those rounded statistics, so what is stored is what was solved.

Outliers are stored as fp16 values; the rounding to fp16 is compensated like any other error.
Zero points are rounded on an integer second-level grid, so the stored layer is a plain
``pack-quantized`` weight plus a sparse outlier list (see :mod:`presso.compressors.formats.spqr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.formats.spqr import SpQRWeight, quantize_stats
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.ptq.obs import aligned_blocksize, dead_columns, inverse_cholesky, obs_sweep
from presso.compressors.quant.primitives import GridSettings, code_range, grid_from_range
from presso.compressors.registry import check_range, register
from presso.kernels.outliers import outliers_from_dense


def round_to_grid(w, scale, zero, bits):
    """Codes of ``w`` (as floats) and their values on the grid ``(q - zero) · scale``."""
    qmin, qmax = code_range(bits)
    q = (w / scale + zero).round().clamp(qmin, qmax)
    return q, (q - zero) * scale


def outlier_gain(wg: torch.Tensor, d: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Drop in the group's weighted rounding error from keeping each weight exactly ``[N, g]``."""
    n, g = wg.shape
    eye = torch.eye(g, dtype=torch.bool)
    # Row r, variant j: the row with weight j left out of the grid fit and of the error.
    others = wg.unsqueeze(1).expand(n, g, g)
    lo = others.masked_fill(eye, float("inf")).amin(-1)
    hi = others.masked_fill(eye, float("-inf")).amax(-1)
    scale, zero = grid_from_range(lo, hi, bits, symmetric)
    _, deq = round_to_grid(others, scale.unsqueeze(-1), zero.unsqueeze(-1).float(), bits)
    loo = (((others - deq) / d) ** 2).masked_fill(eye, 0).sum(-1)
    scale, zero = grid_from_range(wg.amin(-1), wg.amax(-1), bits, symmetric)
    _, deq = round_to_grid(wg, scale.unsqueeze(-1), zero.unsqueeze(-1).float(), bits)
    full = (((wg - deq) / d) ** 2).sum(-1, keepdim=True)
    return full - loo


class _SpQRRule:
    """Column rule: at each group's start choose outliers and the quantized grid; then round."""

    def __init__(self, shape, cfg: SpQR) -> None:
        n, k = shape
        self.cfg = cfg
        self.q = torch.empty(n, k, dtype=torch.int8)
        self.outliers = torch.zeros(n, k, dtype=torch.bool)
        self.stats = {"scale": [], "zero": []}  # per group: (codes, lo, step)
        self.budget = round(cfg.outlier_fraction * n * cfg.group_size)
        # The current group's grid (dequantized second-level values) and outliers.
        self.scale = self.zero = self.group_outliers = None

    def _start_group(self, wg: torch.Tensor, d: torch.Tensor) -> None:
        cfg = self.cfg
        n, g = wg.shape
        out = torch.zeros(n * g, dtype=torch.bool)
        if self.budget:
            gain = outlier_gain(wg, d, cfg.bits, cfg.symmetric).flatten()
            out[gain.topk(self.budget).indices] = True
        out = out.reshape(n, g)
        lo = wg.masked_fill(out, float("inf")).amin(-1)
        hi = wg.masked_fill(out, float("-inf")).amax(-1)
        all_out = out.all(-1)  # a row whose whole group is outliers: any grid will do
        lo, hi = lo.masked_fill(all_out, 0.0), hi.masked_fill(all_out, 0.0)
        scale, zero = grid_from_range(lo, hi, cfg.bits, cfg.symmetric)
        *stored, scale = quantize_stats(scale[:, None], cfg.stat_bits, cfg.stat_group, False)
        self.stats["scale"].append(stored)
        self.scale, self.zero = scale[:, 0], torch.zeros(n)
        if not cfg.symmetric:
            *stored, zero = quantize_stats(zero[:, None], cfg.stat_bits, cfg.stat_group, True)
            self.stats["zero"].append(stored)
            self.zero = zero[:, 0]
        self.group_outliers = out

    def __call__(self, j: int, wb: torch.Tensor, i: int, ub: torch.Tensor) -> torch.Tensor:
        g = self.cfg.group_size
        if j % g == 0:
            self._start_group(wb[:, i : i + g], ub.diagonal()[i : i + g])
        w = wb[:, i]
        q, deq = round_to_grid(w, self.scale, self.zero, self.cfg.bits)
        out = self.group_outliers[:, j % g]
        self.q[:, j] = torch.where(out, self.zero, q).to(torch.int8)  # dense part 0 under outliers
        self.outliers[:, j] = out
        return torch.where(out, w.half().float(), deq)

    def joined(self, kind: str):
        """The per-group second-level statistics joined along the group axis (or Nones)."""
        parts = self.stats[kind]
        if not parts:
            return None, None, None
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))


@register(
    "spqr", "GPTQ on small groups with 3-bit scales, the hardest weights kept in fp16 (calibrated)"
)
@dataclass
class SpQR(GridSettings):
    bits: int = 3  # code width, 2..8
    group_size: int = 16  # input columns sharing a (quantized) scale; small, as in SpQR
    symmetric: bool = False  # zero point fixed at 0 (else zero points are stored, quantized)
    scale_dtype: str = "float16"  # its second-level grids' dtype; only float16
    outlier_fraction: float = 0.01  # share of weights kept in fp16 as a sparse list
    stat_bits: int = 3  # code width of the quantized scales and zero points
    stat_group: int = 16  # consecutive rows sharing one second-level (fp16) grid
    damp: float = 0.01  # dampening added to the Hessian diagonal, relative to its mean
    blocksize: int = 128  # columns per lazy update batch (rounded to a multiple of group_size)

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.scale_dtype != "float16":
            raise ConfigError(
                f"{prefix}.scale_dtype: spqr stores its scales as {self.stat_bits}-bit codes on "
                "float16 grids; only 'float16' applies (use gptq for float32 scales)"
            )
        check_range(f"{prefix}.group_size", self.group_size, 1, 1 << 16)
        check_range(f"{prefix}.outlier_fraction", self.outlier_fraction, 0.0, 0.5)
        check_range(f"{prefix}.stat_bits", self.stat_bits, 1, 8)
        check_range(f"{prefix}.stat_group", self.stat_group, 1, 1 << 16)
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)
        check_range(f"{prefix}.blocksize", self.blocksize, 1, 1 << 16)

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        super().check_shape(out_features, in_features, name)
        if out_features % self.stat_group:
            raise UnsupportedError(
                f"{name}: stat_group {self.stat_group} does not divide its {out_features} "
                "output rows; choose a divisor (e.g. 16)"
            )

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(
        self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"
    ) -> SpQRWeight:
        self.check_shape(*weight.shape, name)
        h = stats.hessian()
        w = weight.float().clone()
        w[:, dead_columns(h)] = 0
        rule = _SpQRRule(w.shape, self)
        u = inverse_cholesky(h, self.damp, name)
        w_hat = obs_sweep(w, u, rule, aligned_blocksize(self.group_size, self.blocksize))
        return SpQRWeight(
            rule.q,
            *rule.joined("scale"),
            *rule.joined("zero"),
            outliers_from_dense(torch.where(rule.outliers, w_hat, 0.0)),
            self.bits,
            self.group_size,
            self.stat_bits,
        )
