"""L-GreCo (Alimohammadi, Markov, Frantar, Alistarh, MLSys 2024): per-layer compression levels.

Uniform compression spends bytes where gradients are easy to compress and starves layers where they
are not. Every ``adjust_every`` steps L-GreCo measures, for each layer and candidate parameter, the
squared error of compressing the layer's recent error-compensated gradient, then picks the plan with
the fewest bytes whose total error is at most ``alpha`` times that of the uniform reference
(:mod:`presso.compressors.plan.knapsack`). Squared errors add across layers (they are pieces of one
gradient vector's squared error), which is what makes the per-layer knapsack the right model.
This module holds the schedule and the plan; the communicator does the measuring and broadcasting.
"""

from __future__ import annotations

from dataclasses import dataclass

from presso.compressors.plan.knapsack import min_bytes_within_error


@dataclass(frozen=True)
class Schedule:
    """When L-GreCo measures and re-plans. Steps count finished optimizer steps."""

    warmup_steps: int  # dense steps before compression; the first re-plan closes the warm-up
    adjust_every: int  # steps between re-plans
    measure_steps: int  # gradients summed for the measurement: the last ones before a re-plan

    def due(self, finished: int) -> bool:
        """Re-plan after ``finished`` steps?"""
        return (
            finished >= max(1, self.warmup_steps)
            and (finished - self.warmup_steps) % self.adjust_every == 0
        )

    def measuring(self, step: int) -> bool:
        """Does step ``step`` (0-based, in progress) feed the next re-plan's measurement?"""
        nxt = max(step + 1, self.warmup_steps, 1)
        nxt += -(nxt - self.warmup_steps) % self.adjust_every
        return nxt - step <= self.measure_steps


def plan(
    sizes: list[list[int]], errors: list[list[float]], reference: list[int], alpha: float
) -> list[int]:
    """Candidate index per layer: fewest bytes with total error <= ``alpha`` x the reference's.

    ``reference[l]`` is the index of the uniform default in layer ``l``'s candidates. When the
    reference itself meets the budget (``alpha >= 1``) and is no larger than the solver's plan
    (possible only through the solver's conservative grid), the reference is kept, so a re-plan
    never sends more bytes than uniform compression at no less error.
    """
    ref_error = sum(errors[layer][k] for layer, k in enumerate(reference))
    ref_bytes = sum(sizes[layer][k] for layer, k in enumerate(reference))
    budget = alpha * ref_error
    best = min_bytes_within_error(sizes, errors, budget)
    if ref_error <= budget and ref_bytes <= best.total_bytes:
        return list(reference)
    return best.choice
