"""Calibration statistics of one linear layer's inputs, summable across data shards.

Every statistic is a plain sum over calibration batches plus a token count, so data-parallel
workers can each accumulate their shard (whole batches) and the shards' statistics added with
``+`` equal the statistics of the whole set. Sums are kept in fp64: two workers add the same
per-batch terms in a different order, and fp64 keeps that difference near 1e-16 relative, far
below the fp32 the solvers work in. The stated tolerance on the statistics is 1e-12 relative;
the solved weights come out bit-identical in practice (see the tests).

An algorithm that needs data has a ``make_stats(in_features)`` method returning an empty
statistic; the pipeline makes one per linear layer and feeds it that layer's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso import DataError


def flat_inputs(x: torch.Tensor, name: str) -> torch.Tensor:
    """The ``[tokens, in_features]`` view of a layer input; NaN/Inf fail naming the layer."""
    x = x.detach().reshape(-1, x.shape[-1])
    if not torch.isfinite(x).all():
        raise DataError(
            f"{name}: calibration inputs contain NaN or Inf; check the model's weights "
            "(earlier layers) and the calibration data, or calibrate in float32"
        )
    return x


@dataclass
class HessianStats:
    """``sum xᵀx`` over calibration tokens: the layer-wise Hessian of GPTQ, SparseGPT, SpQR."""

    xtx: torch.Tensor  # fp64 [in, in]
    count: int = 0  # tokens seen

    @classmethod
    def empty(cls, in_features: int) -> HessianStats:
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64))

    def update(self, x: torch.Tensor, name: str = "layer") -> None:
        # One batch's product in fp32 (fast, ~1e-6 relative), summed over batches in fp64: a
        # shard boundary falls between batches, so shards add exactly the same per-batch terms.
        x = flat_inputs(x, name).float()
        self.xtx += (x.T @ x).double()
        self.count += x.shape[0]

    def __add__(self, other: HessianStats) -> HessianStats:
        return HessianStats(self.xtx + other.xtx, self.count + other.count)

    def hessian(self) -> torch.Tensor:
        """The mean ``xᵀx`` (fp64); its scale is irrelevant to the solvers, its shape is not."""
        return self.xtx / max(self.count, 1)

    def col_sq_norms(self) -> torch.Tensor:
        """``‖X_j‖²`` per input column (fp64)."""
        return self.xtx.diagonal().clone()

    def output_error(self, delta: torch.Tensor) -> float:
        """Mean squared output error per token of a weight change ``delta``: ``tr(Δ H Δᵀ)``."""
        d = delta.double()
        return float(((d @ self.hessian()) * d).sum())


@dataclass
class NormStats:
    """Per-input-column ``sum x²``: what Wanda needs, at a fraction of a Hessian's cost."""

    sq_sum: torch.Tensor  # fp64 [in]
    count: int = 0  # tokens seen

    @classmethod
    def empty(cls, in_features: int) -> NormStats:
        return cls(torch.zeros(in_features, dtype=torch.float64))

    def update(self, x: torch.Tensor, name: str = "layer") -> None:
        x = flat_inputs(x, name).double()
        self.sq_sum += (x * x).sum(0)
        self.count += x.shape[0]

    def __add__(self, other: NormStats) -> NormStats:
        return NormStats(self.sq_sum + other.sq_sum, self.count + other.count)

    def col_sq_norms(self) -> torch.Tensor:
        return self.sq_sum.clone()

    def output_error(self, delta: torch.Tensor) -> float:
        """The diagonal-Hessian estimate of the mean squared output error per token."""
        return float((delta.double() ** 2 @ self.sq_sum).sum()) / max(self.count, 1)


@dataclass
class ActivationStats:
    """Mean ``|x|`` per input column plus a bounded sample of input rows (AWQ's search data).

    The sample is the first ``max_tokens`` rows seen; adding shards in shard order keeps the
    first ``max_tokens`` rows of the whole set, so 1 and 2 workers sample the same rows.
    """

    abs_sum: torch.Tensor  # fp64 [in]
    sq_sum: torch.Tensor  # fp64 [in]
    sample: torch.Tensor  # fp32 [<= max_tokens, in]
    count: int = 0  # tokens seen
    max_tokens: int = 2048  # rows kept in the sample

    @classmethod
    def empty(cls, in_features: int, max_tokens: int = 2048) -> ActivationStats:
        z = torch.zeros(in_features, dtype=torch.float64)
        return cls(z, z.clone(), torch.zeros(0, in_features), max_tokens=max_tokens)

    def update(self, x: torch.Tensor, name: str = "layer") -> None:
        x = flat_inputs(x, name)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.sq_sum += (x.double() ** 2).sum(0)
        self.count += x.shape[0]
        room = self.max_tokens - self.sample.shape[0]
        if room > 0:
            self.sample = torch.cat([self.sample, x[:room].float()])

    def __add__(self, other: ActivationStats) -> ActivationStats:
        sample = torch.cat([self.sample, other.sample])[: self.max_tokens]
        return ActivationStats(
            self.abs_sum + other.abs_sum,
            self.sq_sum + other.sq_sum,
            sample,
            self.count + other.count,
            self.max_tokens,
        )

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def col_sq_norms(self) -> torch.Tensor:
        return self.sq_sum.clone()

    def output_error(self, delta: torch.Tensor) -> float:
        return float((delta.double() ** 2 @ self.sq_sum).sum()) / max(self.count, 1)


def weight_error(delta: torch.Tensor, stats=None) -> float:
    """Output error of a weight change when statistics exist, else its squared Frobenius norm."""
    if stats is not None:
        return stats.output_error(delta)
    return float((delta.double() ** 2).sum())


def sum_shards(parts: list[dict]) -> dict:
    """Per-layer statistics of data shards summed in shard order. Layers that shared one
    statistic in a shard (q/k/v see the same input) share one sum."""
    total, sums = {}, {}
    for name, first in parts[0].items():
        if id(first) not in sums:
            s = first
            for part in parts[1:]:
                s = s + part[name]
            sums[id(first)] = s
        total[name] = sums[id(first)]
    return total
