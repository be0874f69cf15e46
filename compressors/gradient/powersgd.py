"""PowerSGD (Vogels et al., 2019): rank-r gradients from one warm-started power iteration.

Each layer's gradient is viewed as a matrix ``M`` (``[rows, numel / rows]``). With the previous
step's ``Q`` (``[cols, r]``, identical on every rank) each worker forms ``P = M Q``; the ``P``s are
summed over workers and orthonormalised into ``P̂``, then each worker forms ``Q = Mᵀ P̂`` and those
are summed too. The mean gradient is ``P̂ (ΣQ / world)ᵀ`` and this worker's own share is
``P̂ Qᵀ = P̂ P̂ᵀ M``, the projection that error feedback subtracts. Only ``P`` and ``Q`` travel:
``(rows + cols) x r`` fp32 values instead of ``rows x cols``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix view: first dimension against all others."""
    rows = shape[0] if len(shape) else 1
    numel = int(torch.Size(shape).numel())
    return rows, (numel // rows if rows else 0)


class PowerSGD:
    """The low-rank family; the parameter is the rank."""

    least = 1  # strongest compression: a tensor it cannot shrink is sent dense

    def clamp(self, shape: torch.Size, rank: int) -> int:
        """Rank is at most ``min(rows, cols)``; a larger one would only send redundant columns."""
        return max(0, min(int(rank), *matrix_shape(shape)))

    def payload_bytes(self, shape: torch.Size, rank: int) -> int:
        """fp32 bytes this worker hands to the two all-reduces (``P`` then ``Q``)."""
        rows, cols = matrix_shape(shape)
        return 4 * (rows + cols) * self.clamp(shape, rank)

    def errors(
        self, grad: torch.Tensor, ranks: list[int], start_q: Callable[[int], torch.Tensor]
    ) -> list[float]:
        """Squared error of the step PowerSGD would take on ``grad`` at each rank: one power
        iteration from ``start_q(rank)``, the warm-start ``Q`` the communicator would use, and
        what error feedback keeps is ``M - P̂ P̂ᵀ M``. The best rank-r error (the SVD tail)
        understates this, most at low ranks where one step from a stale ``Q`` is far from it."""
        matrix = grad.reshape(matrix_shape(grad.shape)).double()
        out = []
        for rank in ranks:
            if not matrix.numel() or rank == 0:
                out.append(float(matrix.square().sum()))
                continue
            p = orthonormalize(matrix @ start_q(rank).to(matrix))
            out.append(float((matrix - p @ (p.T @ matrix)).square().sum()))
        return out

    def initial_q(self, shape: torch.Size, rank: int, seed: int) -> torch.Tensor:
        """Gaussian ``[cols, rank]`` from ``seed`` on the CPU, so every rank draws the same one."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(matrix_shape(shape)[1], rank, generator=gen)


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p``'s; deterministic, so ranks with equal ``p`` agree.
    Householder QR returns unit columns even for a zero ``p``, where Gram-Schmidt would divide
    by zero."""
    return torch.linalg.qr(p).Q


def power_step(
    matrices: list[torch.Tensor],
    qs: list[torch.Tensor],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One PowerSGD round over several layers, batching each phase into one all-reduce.

    ``all_reduce_sum`` sums a flat tensor over workers (identity on one process). Returns
    ``(p_hats, q_locals, q_sums)``: this worker's share of layer ``i`` is ``p_hats[i] @
    q_locals[i].T`` and the mean over workers is ``p_hats[i] @ q_sums[i].T / world``.
    """
    ps = [m @ q for m, q in zip(matrices, qs)]
    p_sums = _split(all_reduce_sum(_flat(ps)), ps)
    p_hats = [orthonormalize(p) for p in p_sums]
    q_locals = [m.T @ p for m, p in zip(matrices, p_hats)]
    q_sums = _split(all_reduce_sum(_flat(q_locals)), q_locals)
    return p_hats, q_locals, q_sums


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [chunk.view_as(t) for chunk, t in zip(flat.split(sizes), like)]
