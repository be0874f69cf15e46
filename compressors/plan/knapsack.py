"""Per-layer choice under a global budget: a multiple-choice knapsack, solved exactly on a grid.

Every layer ``l`` offers candidates ``k`` (a rank, a density, a bit width...), each with a size in
bytes ``b[l][k]`` and an error ``e[l][k] >= 0``; a plan takes exactly one candidate per layer. Two
questions are asked of the same table:

* :func:`min_bytes_within_error` — the smallest plan whose total error is at most ``max_error``
  (L-GreCo's question for gradients);
* :func:`min_error_within_bytes` — the most accurate plan whose total size is at most ``max_bytes``
  (the weight-budget planner's question).

Both run one dynamic program over layers in which the *constrained* quantity is cut into cells.
Each layer's cheapest candidate is subtracted first, so the grid only has to cover the slack
``budget - sum_l min_k c[l][k]``; every candidate's excess over its layer's minimum is then
rounded *up* to whole cells and the capacity *down*. A plan that fits the grid therefore always
fits the real budget, and the cheapest-per-layer plan always fits the grid, so a feasible problem
never comes back empty. The result is exactly optimal whenever every excess is a multiple of the
cell (integers with ``cell=1``; byte budgets whose slack is at most ``max_cells``); otherwise it
is optimal among plans whose rounded-up excess fits, which can only cost a little objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from presso import UnsupportedError

MAX_CELLS = 10_000  # default grid: 200 layers x 8 candidates x 10k cells solves in ~0.1 s


@dataclass(frozen=True)
class KnapsackSolution:
    """One chosen candidate index per layer, and the plan's real totals."""

    choice: list[int]
    total_bytes: int
    total_error: float


def min_bytes_within_error(
    sizes: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    max_error: float,
    cell: float | None = None,
    max_cells: int = MAX_CELLS,
) -> KnapsackSolution:
    """The plan with the fewest total bytes whose total error is at most ``max_error``.

    ``sizes[l][k]`` and ``errors[l][k]`` describe candidate ``k`` of layer ``l`` (layers may offer
    different numbers of candidates). ``cell`` is the grid step on the error axis (default: the
    slack divided by ``max_cells``). Exact when every error's excess over its layer's minimum is
    a multiple of ``cell``; the returned plan always satisfies the constraint.
    """
    size_arr, err_arr = _table(sizes, errors)
    choice = _knapsack(
        objective=size_arr,
        cost=err_arr,
        budget=max_error,
        cell=cell,
        max_cells=max_cells,
        what="total error",
    )
    return _plan(choice, size_arr, err_arr)


def min_error_within_bytes(
    sizes: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    max_bytes: int,
    cell: float | None = None,
    max_cells: int = MAX_CELLS,
) -> KnapsackSolution:
    """The plan with the least total error whose total size is at most ``max_bytes``.

    ``cell`` is the grid step in bytes (default: 1 byte, or slack / ``max_cells`` when the slack
    is larger), so the result is exact whenever the slack is at most ``max_cells`` bytes or every
    size's excess over its layer's minimum is a multiple of ``cell``.
    """
    size_arr, err_arr = _table(sizes, errors)
    choice = _knapsack(
        objective=err_arr,
        cost=size_arr,
        budget=max_bytes,
        cell=cell,
        max_cells=max_cells,
        what="total bytes",
        min_cell=1.0,
    )
    return _plan(choice, size_arr, err_arr)


def _table(sizes, errors) -> tuple[np.ndarray, np.ndarray]:
    """Pad a ragged per-layer table into ``[layers, candidates]`` arrays; padding is +inf."""
    if len(sizes) != len(errors) or not len(sizes):
        raise ValueError(
            f"need the same non-zero number of layers, got {len(sizes)} and {len(errors)}"
        )
    width = max(len(row) for row in sizes)
    size_arr = np.full((len(sizes), width), np.inf)
    err_arr = np.full((len(sizes), width), np.inf)
    for layer, (s_row, e_row) in enumerate(zip(sizes, errors, strict=True)):
        if len(s_row) != len(e_row) or not len(s_row):
            raise ValueError(f"layer {layer}: need the same non-zero number of sizes and errors")
        size_arr[layer, : len(s_row)] = s_row
        err_arr[layer, : len(e_row)] = e_row
    if np.isnan(err_arr).any() or (err_arr < 0).any():
        raise ValueError("errors must be >= 0 and not NaN")
    return size_arr, err_arr


def _knapsack(objective, cost, budget, cell, max_cells, what, min_cell=0.0) -> np.ndarray:
    """Minimise ``sum objective`` subject to ``sum cost <= budget``, one candidate per layer."""
    floor_cost = cost.min(axis=1)
    slack = budget - floor_cost.sum()
    if not math.isfinite(slack) or slack < 0:
        raise UnsupportedError(
            f"no plan meets {what} <= {budget:g}: even the cheapest candidate of every layer "
            f"gives {floor_cost.sum():g}; raise the budget or offer cheaper candidates"
        )
    excess = cost - floor_cost[:, None]  # >= 0, exactly 0 at each layer's cheapest candidate
    if cell is None:
        cell = max(slack / max_cells, min_cell)
    if cell <= 0:  # zero slack: only each layer's cheapest candidates fit
        units = np.where(excess > 0, 1, 0)
        capacity = 0
    else:
        units = np.ceil(excess / cell)
        units[units * cell < excess] += 1  # guard the division's rounding: never round down
        capacity = math.floor(slack / cell)
        while capacity > 0 and capacity * cell > slack:
            capacity -= 1
        if capacity > 50 * max_cells:
            raise ValueError(f"grid of {capacity} cells is too fine; pass a larger cell")
    over = ~np.isfinite(units) | (units > capacity)
    units = np.where(over, capacity + 1, units).astype(np.int64)

    layers, width = objective.shape
    best = np.zeros(capacity + 1)  # best[c]: least objective so far using exactly c cells
    best[1:] = np.inf
    picks = np.zeros((layers, capacity + 1), dtype=np.int16)
    trial = np.empty((width, capacity + 1))
    for layer in range(layers):
        trial.fill(np.inf)
        for k in range(width):
            u = units[layer, k]
            if u <= capacity and np.isfinite(objective[layer, k]):
                trial[k, u:] = best[: capacity + 1 - u] + objective[layer, k]
        picks[layer] = trial.argmin(axis=0)
        best = trial[picks[layer], np.arange(capacity + 1)]

    used = int(np.argmin(best))  # ties go to the fewest cells
    choice = np.empty(layers, dtype=np.int64)
    for layer in range(layers - 1, -1, -1):
        choice[layer] = picks[layer, used]
        used -= units[layer, choice[layer]]
    return choice


def _plan(choice: np.ndarray, size_arr: np.ndarray, err_arr: np.ndarray) -> KnapsackSolution:
    rows = np.arange(len(choice))
    return KnapsackSolution(
        choice=[int(k) for k in choice],
        total_bytes=int(size_arr[rows, choice].sum()),
        total_error=math.fsum(err_arr[rows, choice]),
    )
