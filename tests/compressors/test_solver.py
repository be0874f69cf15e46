"""The per-layer knapsack solver: exact against brute force, always within budget, and fast."""

import itertools
import math
import time

import numpy as np
import pytest

from presso import UnsupportedError
from presso.compressors.plan.knapsack import (
    MAX_CELLS,
    min_bytes_within_error,
    min_error_within_bytes,
)


def _ragged(rng, layers, max_cands, integer_errors):
    sizes, errors = [], []
    for _ in range(layers):
        k = int(rng.integers(1, max_cands + 1))
        sizes.append([int(s) for s in rng.integers(1, 60, size=k)])
        errs = rng.integers(0, 25, size=k) if integer_errors else rng.random(k) * 10
        errors.append([float(e) for e in errs])
    return sizes, errors


def _brute(sizes, errors, budget, constrain_errors):
    """Best (objective) over every plan that meets the budget, or None when none does."""
    best = None
    for plan in itertools.product(*(range(len(row)) for row in sizes)):
        total_b = sum(sizes[i][k] for i, k in enumerate(plan))
        total_e = math.fsum(errors[i][k] for i, k in enumerate(plan))
        cost, objective = (total_e, total_b) if constrain_errors else (total_b, total_e)
        if cost <= budget and (best is None or objective < best):
            best = objective
    return best


@pytest.mark.parametrize("constrain_errors", [True, False], ids=["min_bytes", "min_error"])
def test_equals_brute_force_on_integer_instances(constrain_errors):
    """With integer data and a unit grid the discretisation is exact, so the DP must find the true
    optimum; a wrong recurrence or backtrack shows up here on some of the 300 instances."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes, errors = _ragged(rng, int(rng.integers(1, 6)), 4, integer_errors=True)
        if constrain_errors:
            lo, hi = sum(min(r) for r in errors), sum(max(r) for r in errors)
            budget = float(rng.integers(lo, hi + 1))
            plan = min_bytes_within_error(sizes, errors, budget, cell=1.0)
            assert plan.total_error <= budget
            assert plan.total_bytes == _brute(sizes, errors, budget, True)
        else:
            lo, hi = sum(min(r) for r in sizes), sum(max(r) for r in sizes)
            budget = int(rng.integers(lo, hi + 1))
            plan = min_error_within_bytes(sizes, errors, budget)  # slack < 10k: 1-byte grid
            assert plan.total_bytes <= budget
            assert plan.total_error == _brute(sizes, errors, budget, False)
        # The reported totals are those of the returned choice.
        assert plan.total_bytes == sum(sizes[i][k] for i, k in enumerate(plan.choice))


@pytest.mark.parametrize("max_cells", [MAX_CELLS, 50, 7])
def test_real_valued_errors_meet_the_budget_within_the_grids_optimality_gap(max_cells):
    """On real-valued errors the solver is exact only on its grid: each layer's error is rounded
    up to whole cells, so its plan always meets the budget, and it is at least as small as the
    true optimum (brute force) for a budget tightened by one cell per layer — every plan that
    fits that tighter budget still fits the grid. The measured gap to the true optimum is
    bounded: zero in almost every instance with the default grid."""
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(300):
        sizes, errors = _ragged(rng, int(rng.integers(1, 6)), 5, integer_errors=False)
        lo, hi = sum(min(r) for r in errors), sum(max(r) for r in errors)
        budget = lo + rng.random() * (hi - lo)
        plan = min_bytes_within_error(sizes, errors, budget, max_cells=max_cells)
        assert plan.total_error <= budget * (1 + 1e-12)
        best = _brute(sizes, errors, budget, True)
        assert plan.total_bytes >= best
        cell = (budget - lo) / max_cells
        tighter = _brute(sizes, errors, budget - len(sizes) * cell * (1 + 1e-9), True)
        if tighter is not None:
            assert plan.total_bytes <= tighter
        gaps.append(plan.total_bytes / best - 1)
    if max_cells == MAX_CELLS:  # coarse grids are held only to the bound above
        exact = sum(g == 0 for g in gaps) / len(gaps)
        assert exact >= 0.95 and max(gaps) < 0.05, (exact, max(gaps))


def test_zero_slack_and_infeasible_budgets():
    """A budget equal to the cheapest plan must return that plan; a smaller one must fail with a
    message, not silently return a plan that breaks the constraint."""
    sizes, errors = [[10, 4], [8, 2]], [[0.5, 2.0], [1.0, 3.0]]
    plan = min_bytes_within_error(sizes, errors, 1.5)
    assert plan.choice == [0, 0]
    with pytest.raises(UnsupportedError, match="raise the budget"):
        min_bytes_within_error(sizes, errors, 1.49)
    with pytest.raises(UnsupportedError, match="total bytes"):
        min_error_within_bytes(sizes, errors, 5)


def test_200_layers_by_8_candidates_solves_in_under_a_second():
    """L-GreCo re-plans during training and the weight planner sweeps budgets: the solve must stay
    cheap at realistic model depth (200 layers x 8 candidates) on the default 10k-cell grid."""
    rng = np.random.default_rng(2)
    ranks = np.array([1, 2, 4, 8, 16, 32, 64, 128])
    sizes = (rng.integers(256, 4096, size=(200, 1)) * ranks * 8).tolist()
    errors = (rng.random((200, 1)) * np.exp(-ranks / rng.uniform(4, 64, size=(200, 1)))).tolist()
    budget = sum(row[3] for row in errors)
    start = time.perf_counter()
    for mode in range(2):
        if mode == 0:
            plan = min_bytes_within_error(sizes, errors, budget)
            assert plan.total_error <= budget * (1 + 1e-12)
        else:
            plan = min_error_within_bytes(sizes, errors, sum(row[3] for row in sizes))
    elapsed = (time.perf_counter() - start) / 2
    print(f"200x8 solve: {elapsed * 1e3:.1f} ms per solve ({1 / elapsed:.0f}x under the 1 s limit)")
    assert elapsed < 1.0
