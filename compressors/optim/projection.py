"""GaLore's gradient subspace: fitting it from an SVD, projecting into it and back, and carrying
Adam moments from one subspace to the next.

For a gradient ``G`` (m x n) a projection keeps ``L`` (m x r, orthonormal columns) and/or ``R``
(n x r): ``down(G) = L^T G R`` with a missing side left out, ``up(X) = L X R^T``. Both are linear,
which is what lets workers all-reduce ``down(G)`` in place of ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Extra columns of the randomized range finder and its power iterations (Halko et al. 2011):
# enough for the top-r singular vectors of a gradient to be accurate to a few digits.
_OVERSAMPLE = 8
_POWER_ITERS = 2


@dataclass
class Projection:
    """A rank-r subspace of m x n matrices: ``left`` (m x r) and/or ``right`` (n x r)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def down(self, g: torch.Tensor) -> torch.Tensor:
        """Coordinates of ``g`` in the subspace (r x n, m x r, or r x r)."""
        if self.left is not None:
            g = self.left.T @ g
        if self.right is not None:
            g = g @ self.right
        return g

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """The m x n matrix whose coordinates are ``x``."""
        if self.left is not None:
            x = self.left @ x
        if self.right is not None:
            x = x @ self.right.T
        return x

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored matrices by state key (``proj_left``, ``proj_right``)."""
        out = {"proj_left": self.left, "proj_right": self.right}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict) -> Projection:
        """The projection kept in an optimizer state, as fp32 whatever dtype it is stored in."""
        left, right = state.get("proj_left"), state.get("proj_right")
        return cls(
            left=None if left is None else left.float(),
            right=None if right is None else right.float(),
        )


def projection_sides(shape: torch.Size | tuple[int, int], proj_type: str) -> tuple[bool, bool]:
    """Which of ``(left, right)`` a ``proj_type`` uses for an m x n weight. ``std`` projects the
    smaller side (as in the GaLore paper): Adam moments are then r x max(m, n)."""
    m, n = shape
    if proj_type == "std":
        return (m <= n, m > n)
    if proj_type == "reverse_std":
        return (m > n, m <= n)
    return (proj_type in ("left", "full"), proj_type in ("right", "full"))


def _randomized_svd(
    g: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular vectors ``(U, Vh)`` of ``g`` from a seeded Gaussian range finder."""
    m, n = g.shape
    width = min(k + _OVERSAMPLE, m, n)
    omega = torch.randn(n, width, generator=generator, device=g.device, dtype=g.dtype)
    basis = torch.linalg.qr(g @ omega).Q
    for _ in range(_POWER_ITERS):
        # Re-orthonormalize between multiplications so small singular values are not lost.
        basis = torch.linalg.qr(g @ torch.linalg.qr(g.T @ basis).Q).Q
    u_small, _, vh = torch.linalg.svd(basis.T @ g, full_matrices=False)
    return (basis @ u_small)[:, :k], vh[:k]


def fit_projection(
    grad: torch.Tensor,
    rank: int,
    proj_type: str,
    svd: str = "exact",
    generator: torch.Generator | None = None,
) -> Projection:
    """The rank-``rank`` projection onto ``grad``'s top singular vectors (rank clamped to
    ``min(m, n)``). ``svd="randomized"`` needs a ``generator``, so that every worker and a
    resumed run draw the same test matrix."""
    g = grad.float()
    k = min(rank, *g.shape)
    if svd == "randomized":
        if generator is None:
            raise ValueError("randomized SVD needs a seeded torch.Generator")
        u, vh = _randomized_svd(g, k, generator)
    else:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        u, vh = u[:, :k], vh[:k]
    use_left, use_right = projection_sides(g.shape, proj_type)
    return Projection(
        left=u.contiguous() if use_left else None,
        right=vh.T.contiguous() if use_right else None,
    )


def transport_moments(
    old: Projection, new: Projection, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express low-rank Adam moments from ``old``'s coordinates in ``new``'s.

    The first moment is linear in the gradient, so it maps exactly through ``Q = new^T old`` on
    each side (what leaves the new subspace is dropped). The second moment is a per-coordinate
    mean square; assuming the old coordinates uncorrelated, the new ones have mean square
    ``(Q * Q) v`` -- exact when the switch only permutes or flips basis vectors.
    """
    m, v = exp_avg, exp_avg_sq
    if new.left is not None:
        q = new.left.T @ old.left
        m, v = q @ m, (q * q) @ v
    if new.right is not None:
        q = new.right.T @ old.right
        m, v = m @ q.T, v @ (q * q).T
    return m, v
