"""GPTQ: round one input column at a time and let the later columns absorb its error.

The maths is :func:`presso.compressors.ptq.obs.obs_sweep` with a column rule that rounds to the
group's grid. Grids are fitted when the sweep reaches a group's first column, on the weights as
compensated so far. With ``act_order`` the columns are solved in decreasing order of their
Hessian diagonal (the most active inputs first, while the most columns remain to absorb their
error), but every grid is fixed beforehand on the original column groups ("static groups"): the
stored layer is then the plain ``pack-quantized`` layout and inference needs no permutation.

Defaults, and where they come from:

- ``act_order=True`` (static groups): llm-compressor's ``GPTQModifier`` defaults to
  ``actorder="static"`` and GPTQModel's ``QuantizeConfig`` to ``desc_act=True``; the GPTQ
  reference code offers the ordering as ``--act-order``.
- ``damp=0.01``: λ = 1 % of the mean Hessian diagonal, as in the GPTQ paper (Frantar et al.
  2022, its Cholesky step; ``percdamp=.01`` in its code), llm-compressor
  (``dampening_frac=0.01``) and AutoGPTQ (``damp_percent=0.01``; GPTQModel's default has varied
  between 0.005 and 0.01). A Hessian not positive definite at that gets ten times more, with a
  warning (:func:`~presso.compressors.ptq.obs.inverse_cholesky`).
- ``blocksize=128``: the paper's lazy batch of B = 128 columns, llm-compressor's ``block_size``.
  It changes speed, not the result (up to rounding).
- Calibration (the pipeline's ``compress.calibration``): 128 windows, as the paper's 128 random
  segments (of 2,048 C4 tokens there); presso's windows are 512 tokens of the train split by
  default, to keep CPU runs short — raise ``seq_len`` for long-context models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.ptq.obs import aligned_blocksize, dead_columns, inverse_cholesky, obs_sweep
from presso.compressors.quant.primitives import (
    GridSettings,
    code_range,
    dequantize,
    fit_grid,
    quantize,
    resolve_group_size,
)
from presso.compressors.registry import check_range, register


class GridRounder:
    """The column rule of GPTQ: round column ``j`` to its group's grid, remembering the codes.

    With ``input_channel`` the grid instead runs down the column: one scale per column and
    group of ``group_size`` consecutive output rows (AdaDim's per-input-channel grouping),
    fitted when the column is reached.
    """

    def __init__(
        self, w, bits, group_size, symmetric, perm, static, input_channel, scale_dtype=torch.float16
    ):
        n, k = w.shape
        self.bits, self.g, self.sym, self.scale_dtype = bits, group_size, symmetric, scale_dtype
        self.qmin, self.qmax = code_range(bits)
        self.perm, self.static, self.input_channel = perm, static, input_channel
        self.q = torch.empty(n, k, dtype=torch.int8)
        if input_channel:
            self.scale = torch.empty(k, n // group_size, dtype=scale_dtype)
            self.zero = torch.empty(k, n // group_size, dtype=torch.int32)
        elif static:
            self.scale, self.zero = fit_grid(w, bits, group_size, symmetric, scale_dtype)
        else:
            self.scale = torch.empty(n, k // group_size, dtype=scale_dtype)
            self.zero = torch.empty(n, k // group_size, dtype=torch.int32)
        # fp32 copies for the per-column hot path; the arithmetic equals dequantize()'s exactly
        self.scale_f, self.zero_f = self.scale.float(), self.zero.float()

    def __call__(self, j: int, wb: torch.Tensor, i: int, ub: torch.Tensor) -> torch.Tensor:
        return self.round(j, wb[:, i], wb[:, i : i + self.g])

    def round(self, j: int, col: torch.Tensor, ahead: torch.Tensor) -> torch.Tensor:
        """Codes and dequantized values of sweep column ``j``; ``ahead`` starts at ``col``."""
        orig = int(self.perm[j])
        if self.input_channel:
            s, z = fit_grid(col.unsqueeze(0), self.bits, self.g, self.sym, self.scale_dtype)
            q = quantize(col.unsqueeze(0), s, z, self.bits, self.g)
            self.scale[orig], self.zero[orig] = s[0], z[0]
            self.q[:, orig] = q[0]
            return dequantize(q, s, z, self.g)[0]
        grp = orig // self.g
        if not self.static and orig % self.g == 0:
            s, z = fit_grid(ahead[:, : self.g], self.bits, self.g, self.sym, self.scale_dtype)
            self.scale[:, grp], self.zero[:, grp] = s[:, 0], z[:, 0]
            self.scale_f[:, grp], self.zero_f[:, grp] = s[:, 0], z[:, 0]
        s, z = self.scale_f[:, grp], self.zero_f[:, grp]
        q = (col / s).round_().add_(z).clamp_(self.qmin, self.qmax)
        self.q[:, orig] = q.to(torch.int8)
        return q.sub_(z).mul_(s)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    blocksize: int = 128,
    input_channel: bool = False,
    name: str = "layer",
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` int8, scales and zero points of ``w`` solved against Hessian ``h``.

    Grids are ``[N, K // group_size]`` (``[K, N // group_size]`` with ``input_channel``).
    """
    w = w.float().clone()
    w[:, dead_columns(h)] = 0  # inputs never seen: any value is exact, zero is cheapest
    k = w.shape[1]
    perm = torch.arange(k)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    # Grids fixed up front: per-channel (the whole row is one group) and act-order static groups.
    static = not input_channel and (act_order or group_size == k)
    rounder = GridRounder(w, bits, group_size, symmetric, perm, static, input_channel, scale_dtype)
    u = inverse_cholesky(h[perm][:, perm], damp, name)
    if not (static or input_channel):
        blocksize = aligned_blocksize(group_size, blocksize)
    obs_sweep(w[:, perm], u, rounder, blocksize)
    return rounder.q, rounder.scale, rounder.zero


@register(
    "gptq", "round one input column at a time, the later columns absorbing its error (calibrated)"
)
@dataclass
class GPTQ(GridSettings):
    damp: float = 0.01  # dampening added to the Hessian diagonal, relative to its mean
    act_order: bool = True  # solve columns by decreasing Hessian diagonal (static groups)
    blocksize: int = 128  # columns per lazy update batch (rounded to a multiple of group_size)

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)
        check_range(f"{prefix}.blocksize", self.blocksize, 1, 1 << 16)

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(
        self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"
    ) -> QuantizedWeight:
        g = resolve_group_size(weight.shape[1], self.group_size, name)
        q, scale, zero = gptq_quantize(
            weight,
            stats.hessian(),
            self.bits,
            g,
            self.symmetric,
            self.damp,
            self.act_order,
            self.blocksize,
            name=name,
            scale_dtype=self.scale_torch_dtype,
        )
        return QuantizedWeight(q, scale, zero, self.bits, g, self.symmetric)
