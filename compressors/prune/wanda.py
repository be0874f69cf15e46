"""Wanda: prune by ``|w| · ‖x‖`` within each output row, with no weight update.

A weight's share of the output is its magnitude times the size of the input it multiplies, so a
small weight on a large activation channel is kept over a larger one on a quiet channel.
Comparing within a row (not across the layer) keeps every output's share of weights equal,
which the Wanda paper found matters for LLMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.sparse import SparseWeight, sparse_record
from presso.compressors.prune.masks import PruneSettings, prune_mask
from presso.compressors.ptq.calibration import NormStats
from presso.compressors.registry import register


def wanda_score(w: torch.Tensor, col_sq_norms: torch.Tensor) -> torch.Tensor:
    return w.abs().float() * col_sq_norms.sqrt().float().unsqueeze(0)


@register("wanda", "drop the weights with the smallest |weight| x input norm (calibrated)")
@dataclass
class Wanda(PruneSettings):
    needs_calibration = True

    def make_stats(self, in_features: int) -> NormStats:
        return NormStats.empty(in_features)

    def compress(self, weight: torch.Tensor, stats, name: str = "layer") -> SparseWeight:
        score = wanda_score(weight, stats.col_sq_norms())
        mask = prune_mask(score, self.sparsity, self.nm, per_row=True)
        return sparse_record(weight, mask, self.nm, self.value_dtype)
