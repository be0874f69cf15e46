"""The compress stage: a pool of Ray actors solves the model's linear layers in parallel.

The driver validates every layer first (so a bad group size fails before any work), assigns
layers to workers by estimated cost (largest first, to the least-loaded worker), and gathers one
stored record per layer. Records are independent of which worker produced them, so 1 and M
workers — or a pool that lost a worker and reassigned its layers — give bit-identical artifacts.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch

from presso import UnsupportedError


@dataclass
class LayerResult:
    name: str
    worker: int
    seconds: float
    rel_error: float  # ‖W − Ŵ‖² / ‖W‖²


@dataclass
class CompressResult:
    records: dict  # layer name → stored record
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # modules with weights presso leaves dense
    reassigned: int = 0  # layers moved to another worker after theirs died
    wall_s: float = 0.0


def is_ignored(name: str, patterns: list[str]) -> bool:
    """``lm_head`` matches the module ``lm_head`` and any ``*.lm_head``; globs work too."""
    return any(
        name == p or name.endswith(f".{p}") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def select_layers(model: torch.nn.Module, ignore: list[str]) -> tuple[list[str], list[str]]:
    """Linear layers to compress, and other weight-bearing leaf modules that will stay dense."""
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if not is_ignored(name, ignore):
                chosen.append(name)
        elif (
            not list(module.children())
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() > 1
            and not isinstance(module, torch.nn.Embedding)
        ):
            skipped.append(f"{name} ({type(module).__name__})")
    return chosen, skipped


def check_layers(model: torch.nn.Module, algorithm, ignore: list[str]) -> list[str]:
    """The layers ``algorithm`` will compress, each checked against it before any work starts
    (e.g. a group size that does not divide a layer's width)."""
    names, _ = select_layers(model, ignore)
    if not names:
        raise UnsupportedError(
            f"compress.ignore {ignore} leaves no nn.Linear layer to compress in this model"
        )
    check = getattr(algorithm, "check_shape", None)
    if check is not None:
        modules = dict(model.named_modules())
        for name in names:
            check(*modules[name].weight.shape, name)
    return names


def assign(costs: dict[str, int], workers: int) -> list[list[str]]:
    """Longest-processing-time-first assignment of layers to workers (deterministic)."""
    loads, plan = [0] * workers, [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        w = loads.index(min(loads))
        plan[w].append(name)
        loads[w] += costs[name]
    return plan


def solve_layer(algorithm, name: str, weight: torch.Tensor) -> tuple:
    """One layer's record, its relative error and its wall time (runs inside a worker)."""
    tick = time.perf_counter()
    record = algorithm.compress(weight, None, name=name)
    error = (record.dequantize() - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)
    return record, float(error), time.perf_counter() - tick


def run_compression(
    model: torch.nn.Module, algorithm, workers: int, ignore: list[str], progress=None
) -> CompressResult:
    """Compress every selected linear layer of ``model`` with ``algorithm`` on ``workers`` actors."""
    import ray

    from presso.orchestrator.pool import Task, WorkerPool

    names = check_layers(model, algorithm, ignore)
    _, skipped = select_layers(model, ignore)
    modules = dict(model.named_modules())
    if skipped:
        print(f"presso: leaving {len(skipped)} unsupported modules dense: {', '.join(skipped)}")

    start = time.perf_counter()
    algorithm_ref = ray.put(algorithm)
    tasks = [
        Task(w, solve_layer, (algorithm_ref, name, modules[name].weight.detach().float().cpu()))
        for w, chunk in enumerate(assign({n: modules[n].weight.numel() for n in names}, workers))
        for name in chunk
    ]
    bar = progress(total=len(tasks), desc="compress") if progress else None
    pool = WorkerPool(workers)
    try:
        solved = pool.run(tasks, on_result=lambda i, r: bar and bar.update(1))
    finally:
        pool.close()
        if bar:
            bar.close()
    result = CompressResult(records={}, skipped=skipped, reassigned=pool.reassigned)
    for task, (record, error, seconds) in zip(tasks, solved):
        name = task.args[1]
        result.records[name] = record
        result.layers.append(LayerResult(name, task.worker, seconds, error))
    result.records = {n: result.records[n] for n in names}  # model order
    result.wall_s = time.perf_counter() - start
    return result
