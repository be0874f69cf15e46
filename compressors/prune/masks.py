"""Sparsity patterns and the settings every pruner shares.

A pruner keeps the weights with the highest *score* (its own importance measure) under one of
two patterns: ``unstructured`` (exactly ``round(sparsity · count)`` weights removed) or ``N:M``
(exactly ``N`` kept in every ``M`` consecutive inputs of a row; ``2:4`` is what sparse tensor
cores accelerate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.registry import check_range

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_pattern(pattern: str, prefix: str = "pattern") -> tuple[int, int] | None:
    """``"unstructured"`` → ``None``; ``"N:M"`` → ``(N, M)`` with ``0 < N < M``."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ConfigError(
            f"{prefix}: expected 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), "
            f"got {pattern!r}"
        )
    return n, m


def keep_top(score: torch.Tensor, prune: int) -> torch.Tensor:
    """Bool mask over ``score``'s last dim keeping all but its ``prune`` lowest entries."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if prune > 0:
        mask.scatter_(-1, score.topk(prune, dim=-1, largest=False).indices, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row."""
    rows, k = score.shape
    return keep_top(score.reshape(rows, k // m, m), m - n).reshape(rows, k)


def prune_mask(score: torch.Tensor, sparsity: float, nm, per_row: bool) -> torch.Tensor:
    """The kept-weight mask for ``score`` under the pattern (``nm``) or the sparsity."""
    if nm is not None:
        return nm_mask(score, *nm)
    if per_row:
        return keep_top(score, round(sparsity * score.shape[1]))
    return keep_top(score.flatten(), round(sparsity * score.numel())).reshape(score.shape)


@dataclass
class PruneSettings:
    """Settings shared by the pruners; pruner dataclasses extend it."""

    sparsity: float = 0.5  # fraction of weights removed (unstructured pattern only)
    pattern: str = "unstructured"  # or "N:M": keep N of every M consecutive inputs, e.g. "2:4"
    dtype: str = "float16"  # dtype the kept values are stored in: float16, bfloat16, float32

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}.sparsity", self.sparsity, 0.0, 0.99)
        parse_pattern(self.pattern, f"{prefix}.pattern")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"{prefix}.dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def value_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        if self.nm is not None and in_features % self.nm[1]:
            raise UnsupportedError(
                f"{name}: pattern {self.pattern} needs the {in_features} input columns to be a "
                f"multiple of {self.nm[1]}; use 'unstructured' or ignore this layer"
            )
