"""The Optimal Brain Surgeon column sweep shared by GPTQ, SpQR and SparseGPT.

All three minimise the layer's output error ``‖(W - Ŵ) X‖²`` by fixing ``Ŵ`` one input column
at a time and moving the error of each fixed column onto the columns not yet fixed. With
``U`` the upper Cholesky factor of ``H⁻¹`` (``H = XᵀX``), column ``j``'s error
``e = (w_j - ŵ_j) / U[j, j]`` is compensated exactly by ``W[:, j:] -= e ⊗ U[j, j:]``.
The algorithms differ only in how they fix a column (round it to a grid, zero it, keep it),
which they pass in as ``fix_column``.

Updates are applied lazily: inside a block of columns they touch only the block, and the
block's accumulated error reaches the later columns in one matrix product (GPTQ's "lazy
batch" trick; mathematically identical, far fewer memory passes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from presso import UnsupportedError

log = logging.getLogger(__name__)

MAX_DAMP = 1e4  # relative dampening beyond which a Hessian is treated as unusable


def inverse_cholesky(h: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, in fp64.

    A Hessian that is not positive definite at ``damp`` (too few tokens, duplicated inputs,
    numerical loss) gets ten times the dampening until it is, with a warning naming the layer.
    Inputs that were never active (zero diagonal) get a unit diagonal so they stay solvable;
    callers zero their weights (see :func:`dead_columns`).
    """
    h = h.double().clone()
    h.diagonal()[dead_columns(h)] = 1  # a zero diagonal means a zero row and column (H = XᵀX)
    mean_diag = float(h.diagonal().abs().mean())
    rel = damp
    while True:
        damped = h + rel * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(damped)
        if not info:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if not info:
                return u
        next_rel = max(rel * 10, 1e-3)
        if next_rel > MAX_DAMP:
            raise UnsupportedError(
                f"{name}: Hessian is not positive definite even with relative dampening "
                f"{rel:g}; its calibration inputs are degenerate (check them for constant "
                "or duplicated features)"
            )
        log.warning(
            "%s: Hessian not positive definite with relative dampening %g; retrying with %g",
            name,
            rel,
            next_rel,
        )
        rel = next_rel


def dead_columns(h: torch.Tensor) -> torch.Tensor:
    """Boolean mask of inputs that were zero on every calibration token."""
    return h.diagonal() == 0


FixColumn = Callable[[int, torch.Tensor, int, torch.Tensor], torch.Tensor]


def obs_sweep(
    w: torch.Tensor, u: torch.Tensor, fix_column: FixColumn, blocksize: int = 128
) -> torch.Tensor:
    """Fix the columns of ``w`` left to right, compensating each one's error; returns ``Ŵ``.

    ``fix_column(j, w_block, i, u_block)`` returns the fixed values of column ``j`` (the
    ``i``-th of the current block). ``w_block[:, i:]`` holds the block's current, compensated
    values and ``u_block`` the matching part of ``U``, so a rule may look ahead inside the block
    (SparseGPT picks each block's mask at its first column; SpQR fits a group's grid at the
    group's first column). Blocks start at multiples of ``blocksize``: callers choose it as a
    multiple of their group width so that a group never straddles two blocks.
    """
    w = w.float().clone()
    u = u.float()
    out = torch.empty_like(w)
    k = w.shape[1]
    for b0 in range(0, k, blocksize):
        b1 = min(b0 + blocksize, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            fixed = fix_column(b0 + i, wb, i, ub)
            e = (wb[:, i] - fixed).div_(ub[i, i])
            wb[:, i:].addr_(e, ub[i, i:], alpha=-1)
            out[:, b0 + i] = fixed
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return out


def aligned_blocksize(width: int, blocksize: int = 128) -> int:
    """The largest multiple of ``width`` not above ``blocksize`` (or ``width`` itself)."""
    return max(width, blocksize // width * width)
