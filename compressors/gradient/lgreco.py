"""L-GreCo (Alimohammadi, Markov, Frantar, Alistarh, MLSys 2024): per-layer compression levels.

Uniform compression spends bytes where gradients are easy to compress and starves layers where they
are not. Every ``adjust_every`` steps L-GreCo measures, for each layer and candidate parameter, the
squared error of compressing the layer's recent error-compensated gradient as the compressor will
run (PowerSGD: one power step from the warm-start ``Q`` in force), then picks the plan with
the fewest bytes whose total error is at most ``alpha`` times that of the uniform reference
(:mod:`presso.compressors.plan.knapsack`). Squared errors add across layers (they are pieces of one
gradient vector's squared error), which is what makes the per-layer knapsack the right model.
This module holds all of L-GreCo: the schedule, the measurement (the summed local inputs of each
layer over the last ``measure_steps`` steps, finite ones only) and the re-plan (every worker's
candidate errors summed, rank 0 solves, the plan broadcast). The communicator only exchanges: it
hands this module its inputs while measuring, its candidate errors and its collectives to re-plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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


class LGreCo:
    """L-GreCo's state for one communicator: per-layer candidates and the running measurement."""

    def __init__(self, cfg, family, shapes: dict[str, torch.Size], choice: dict[str, float]):
        self.cfg, self.family, self.shapes = cfg, family, shapes
        self.schedule = Schedule(cfg.warmup_steps, cfg.adjust_every, cfg.measure_steps)
        self.candidates = {
            n: sorted({family.clamp(shapes[n], c) for c in cfg.candidates()} | {value})
            for n, value in choice.items()
        }
        self.acc: dict[str, torch.Tensor] = {}  # summed local inputs since the last re-plan

    def measure(self, inputs: dict[str, torch.Tensor], ok: dict[str, torch.Tensor]) -> None:
        """Add this step's local inputs to the next re-plan's measurement (finite ones only)."""
        for n, x in inputs.items():
            add = torch.where(ok[n], x, torch.zeros_like(x))
            self.acc[n] = self.acc[n] + add if n in self.acc else add

    def replan(
        self,
        choice: dict[str, float],
        errors_of: Callable[[str, torch.Tensor, list], list[float]],
        all_reduce: Callable[[torch.Tensor], torch.Tensor],
        broadcast: Callable[[torch.Tensor], None],
        rank: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Measure every candidate on the summed inputs, let rank 0 solve, broadcast the plan;
        returns the new choice per layer. ``errors_of(name, grad, candidates)`` is the
        communicator's squared error of each candidate as it would run on ``grad`` (warm state
        included); ``all_reduce`` and ``broadcast`` are its byte-counting collectives."""
        layers = list(choice)
        width = max(len(self.candidates[n]) for n in layers)
        table = torch.zeros(len(layers), width + 1, dtype=torch.float64)  # last column: measured
        for i, n in enumerate(layers):
            if n in self.acc and self.acc[n].any():  # all zero: nothing measured, no information
                grad = self.acc[n].view(self.shapes[n]).cpu()
                errors = errors_of(n, grad, self.candidates[n])
                table[i, : len(errors)] = torch.tensor(errors, dtype=torch.float64)
                table[i, -1] = 1
        table = all_reduce(table.to(device)).cpu()  # every worker's errors, summed
        picks = torch.zeros(len(layers), dtype=torch.int64)
        if rank == 0:
            picks = torch.tensor(self._solve(choice, table))
        picks = picks.to(device)
        broadcast(picks)
        self.acc.clear()
        return {n: self.candidates[n][k] for n, k in zip(layers, picks.tolist())}

    def _solve(self, choice: dict[str, float], table: torch.Tensor) -> list[int]:
        """Candidate index per layer; a layer no worker measured keeps its current choice."""
        default = self.cfg.default()
        sizes, errors, reference, pinned = [], [], [], []
        for i, n in enumerate(choice):
            cands = self.candidates[n]
            pinned.append(table[i, -1] == 0)
            if pinned[-1]:
                cands = [choice[n]]
            sizes.append([self.family.payload_bytes(self.shapes[n], c) for c in cands])
            errors.append([0.0] if pinned[-1] else table[i, : len(cands)].tolist())
            ref = self.family.clamp(self.shapes[n], default)
            reference.append(cands.index(ref) if ref in cands else 0)
        best = plan(sizes, errors, reference, self.cfg.alpha)
        return [
            self.candidates[n].index(choice[n]) if pin else k
            for n, pin, k in zip(choice, pinned, best)
        ]
