"""Magnitude pruning: remove the smallest ``|w|`` of each layer; the data-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.sparse import SparseWeight, sparse_record
from presso.compressors.prune.masks import PruneSettings, prune_mask
from presso.compressors.registry import register


@register("magnitude", "drop the smallest weights (unstructured or N:M); no data needed")
@dataclass
class Magnitude(PruneSettings):
    needs_calibration = False

    def compress(self, weight: torch.Tensor, stats=None, name: str = "layer") -> SparseWeight:
        """Prune one ``[out, in]`` weight; the unstructured budget is spread over the layer."""
        mask = prune_mask(weight.abs(), self.sparsity, self.nm, per_row=False)
        return sparse_record(weight, mask, self.nm, self.value_dtype)
