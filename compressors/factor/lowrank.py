"""Low-rank factorisation of a linear layer, fitted to its calibration inputs.

A rank-``r`` layer stores ``US`` (``[N, r]``) and ``V`` (``[r, K]``) and computes
``y = x Vᵀ (US)ᵀ``: ``r (N + K)`` values instead of ``N K``. The factors minimise the layer's
output error ``‖X (W - Ŵ)ᵀ‖²`` rather than the weight error: with ``H = XᵀX = M Mᵀ`` the error is
``‖(W - Ŵ) M‖_F``, so the best ``Ŵ`` truncates the SVD of the whitened weight ``W M`` and maps it
back (the idea of SVD-LLM and ASVD). :func:`presso.compressors.ptq.obs.inverse_cholesky` already gives
``U⁻¹ = M`` for ``H⁻¹ = UᵀU``, dampening included, so whitening is one triangular solve and the
way back one product. The whitened singular values give every rank's error at once, which is what
the budget planner reads its rank candidates from (WeLore-style: each layer's own spectrum decides
which ranks are worth offering).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.lowrank import LowRankWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.ptq.obs import inverse_cholesky
from presso.compressors.registry import check_range, register

FACTOR_DTYPE = torch.float16


@dataclass
class WhitenedSVD:
    """The SVD of ``W M`` (``H = M Mᵀ``) and the factor needed to map truncations back."""

    u: torch.Tensor  # [N, m] left singular vectors (fp64)
    s: torch.Tensor  # [m] singular values, descending: rank r leaves sum(s[r:]**2) of error
    vt_whitened: torch.Tensor  # [m, K] right singular vectors of the whitened weight
    unwhiten: torch.Tensor  # [K, K] upper triangular U with M⁻¹ = U

    def record(self, rank: int) -> LowRankWeight:
        """The rank-``rank`` factors. Each component is split evenly between ``US`` and ``V``
        (same norm on both sides), so fp16 holds them however large the activations are."""
        us = self.u[:, :rank] * self.s[:rank]
        v = self.vt_whitened[:rank] @ self.unwhiten
        balance = (v.norm(dim=1) / us.norm(dim=0).clamp_min(1e-300)).sqrt().clamp_min(1e-30)
        return LowRankWeight(
            (us * balance).to(FACTOR_DTYPE), (v / balance[:, None]).to(FACTOR_DTYPE)
        )


def whitened_svd(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, name: str = "layer"
) -> WhitenedSVD:
    """Singular values and vectors of ``weight`` seen through its inputs (``hessian = XᵀX``)."""
    upper = inverse_cholesky(hessian, damp, name)  # H⁻¹ = UᵀU, so H ≈ U⁻¹ U⁻ᵀ and M = U⁻¹
    whitened = torch.linalg.solve_triangular(upper, weight.double(), upper=True, left=False)
    u, s, vt = torch.linalg.svd(whitened, full_matrices=False)
    return WhitenedSVD(u, s, vt, upper)


def spectrum_ranks(s: torch.Tensor, energies: list[float], max_rank: int) -> list[int]:
    """The smallest rank keeping each fraction of ``sum(s²)``, below ``max_rank``, deduplicated."""
    total = float((s.double() ** 2).sum())
    if total == 0:
        return [1]
    kept = torch.cumsum(s.double() ** 2, 0) / total
    ranks = {int(torch.searchsorted(kept, e).clamp_max(len(s) - 1)) + 1 for e in energies}
    return sorted(r for r in ranks if r < max_rank)


@register(
    "lowrank", "replace the weight by a rank-r product fitted to the layer's inputs (whitened SVD)"
)
@dataclass
class LowRank:
    rank: int = 64  # kept components; the layer stores rank * (in + out) fp16 values
    damp: float = 0.01  # dampening added to the Hessian diagonal, relative to its mean

    needs_calibration = True

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}.rank", self.rank, 1, 1 << 20)
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(
        self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"
    ) -> LowRankWeight:
        rank = min(self.rank, *weight.shape)
        return whitened_svd(weight, stats.hessian(), self.damp, name).record(rank)
