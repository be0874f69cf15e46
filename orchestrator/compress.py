"""The compress stage: calibration and solving spread over a pool of Ray actors.

The steps are those of :mod:`presso.compressors.ptq.blocks`; this module only decides where they run.
A recipe that needs no data (RTN, magnitude) solves every layer at once, layer-parallel. A
calibrated recipe goes block by block, the inputs of block ``i`` coming from blocks ``< i``
already compressed:

1. the driver holds the block's inputs (hidden states and the layers' keyword arguments), cut
   into ``shards`` contiguous shards of whole batches, and ships the block and the shards to the
   object store;
2. for each transform (AWQ), then for the solver: one statistics task per shard, summed in shard
   order on the driver (data-parallel); transforms run on the driver from the summed statistics;
3. one solve task per layer, layers assigned to workers by estimated cost (layer-parallel);
4. the driver writes the records' dequantized weights into the block, and one task per shard
   computes the next block's inputs.

Tasks are pure functions run in one-thread workers. The shard count comes from the config, not
from the number of workers, so 1, 2 or M workers — or a pool that lost a worker and re-ran its
tasks elsewhere — run the very same tasks on the same data and sum the same terms in the same
order: the records are bit-identical.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from presso import DataError, UnsupportedError
from presso.compressors.ptq.blocks import (
    BlockInputs,
    Recipe,
    accumulate_stats,
    apply_records,
    block_outputs,
    capture_block_inputs,
    relative_error,
    solve_layer,
    validate_model,
)
from presso.orchestrator.pool import Task, WorkerPool


@dataclass
class LayerResult:
    name: str
    block: int  # decoder block index; -1 when solved without calibration
    worker: int
    seconds: float  # wall time of the solve in its worker
    rel_error: float  # output error relative to the layer's output (weight error without data)


@dataclass
class CompressResult:
    records: dict  # layer name → stored record, in model order
    model: torch.nn.Module  # a copy of the model, weights dequantized (and AWQ-folded)
    layers: list[LayerResult] = field(default_factory=list)
    worker_s: list[float] = field(default_factory=list)  # busy seconds of each worker
    reassigned: int = 0  # tasks moved to another worker after theirs died
    wall_s: float = 0.0


@dataclass
class LayerPlan:
    """The layers a recipe compresses, per decoder block: ``(block prefix, linear names)``."""

    blocks: list[tuple[str, list[str]]]

    @property
    def names(self) -> list[str]:
        return [name for _, names in self.blocks for name in names]


def plan_layers(model: torch.nn.Module, recipe: Recipe, ignore: Iterable[str]) -> LayerPlan:
    """Every layer checked against every recipe step before any work starts (e.g. a group size
    that does not divide a layer's width); weighted modules of other types are listed once."""
    plan = LayerPlan([(p, list(lins)) for p, _, lins in validate_model(model, recipe, ignore)])
    if not plan.names:
        raise UnsupportedError(
            f"compress.ignore {list(ignore)} leaves no nn.Linear layer to compress in this model"
        )
    return plan


def calibration_batches(
    tokens: torch.Tensor, samples: int, seq_len: int, batch_size: int, seed: int
) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets, in batches."""
    span = tokens.numel() - seq_len
    if span <= 0:
        raise DataError(
            f"compress.calibration.seq_len {seq_len}: the train split has only "
            f"{tokens.numel()} tokens; lower it"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, span, (samples,), generator=gen).tolist()
    return list(torch.stack([tokens[s : s + seq_len] for s in starts]).split(batch_size))


def layer_cost(weight: torch.Tensor, calibrated: bool) -> int:
    """Estimated solve cost: an OBS sweep is ``out · in²``; data-free rounding ``out · in``."""
    n, k = weight.shape
    return n * k * k if calibrated else n * k


def assign(costs: dict[str, int], workers: int) -> list[list[str]]:
    """Longest-processing-time-first assignment of layers to workers (deterministic)."""
    loads, plan = [0] * workers, [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        w = loads.index(min(loads))
        plan[w].append(name)
        loads[w] += costs[name]
    return plan


# Tasks: module-level functions a pool worker runs; pure functions of their arguments.


def shard_stats(block, inputs: BlockInputs, make_stats, prefix: str, names: list[str]) -> dict:
    """One shard's per-layer statistics of ``block`` (layers named in full)."""
    linears = {n: block.get_submodule(n[len(prefix) + 1 :]) for n in names}
    return accumulate_stats(block, inputs, make_stats, linears)


def shard_outputs(block, inputs: BlockInputs) -> list[torch.Tensor]:
    return block_outputs(block, inputs).hidden


def solve_task(algo, name: str, weight: torch.Tensor, stats) -> tuple:
    """One layer's record, its relative error and the seconds the solve took."""
    tick = time.perf_counter()
    record = solve_layer(algo, weight, stats, name)
    seconds = time.perf_counter() - tick
    return record, relative_error(weight, record, stats), seconds


# Driver side.


def sum_shards(parts: list[dict]) -> dict:
    """Per-layer statistics of the shards summed in shard order. Layers that shared one
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


def _spread(pool: WorkerPool, count: int) -> list[int]:
    """Worker of each of ``count`` equal tasks: round-robin over the live workers."""
    live = pool.live()
    return [live[i % len(live)] for i in range(count)]


def gather_stats(pool, block_ref, shard_refs, make_stats, prefix: str, names: list[str]) -> dict:
    """Statistics of the block's layers over all shards (data-parallel), summed."""
    workers = _spread(pool, len(shard_refs))
    tasks = [
        Task(w, shard_stats, (block_ref, ref, make_stats, prefix, names))
        for w, ref in zip(workers, shard_refs)
    ]
    return sum_shards(pool.run(tasks))


def solve_layers(
    pool: WorkerPool, jobs: dict[str, tuple], block: int = -1, on_layer=None
) -> tuple[dict, list[LayerResult]]:
    """Solve ``{name: (algorithm, weight, stats or None)}`` layer-parallel: layers go to the
    live workers by estimated cost. Returns ``({name: record}, results)`` in ``jobs`` order."""
    import ray

    refs: dict[int, object] = {}  # each distinct algorithm and statistic shipped once

    def ref(obj):
        if obj is None:
            return None
        return refs.setdefault(id(obj), ray.put(obj))

    live = pool.live()
    costs = {n: layer_cost(w, s is not None) for n, (_, w, s) in jobs.items()}
    tasks = []
    for w, chunk in zip(live, assign(costs, len(live))):
        for name in chunk:
            algo, weight, stats = jobs[name]
            tasks.append(
                Task(w, solve_task, (ref(algo), name, weight.detach().float(), ref(stats)))
            )
    solved = pool.run(tasks, on_result=lambda i, r: on_layer and on_layer())
    records, results = {}, {}
    for task, (record, error, seconds) in zip(tasks, solved):
        name = task.args[1]
        records[name] = record
        results[name] = LayerResult(name, block, task.worker, seconds, error)
    return {n: records[n] for n in jobs}, [results[n] for n in jobs]


@torch.no_grad()
def compress_layers(
    model: torch.nn.Module,
    plan: LayerPlan,
    recipe: Recipe,
    pool: WorkerPool,
    calibration: list | None = None,
    shards: int = 8,
    solvers: dict | None = None,
    on_layer: Callable[[], None] | None = None,
    on_block: Callable[[str], None] | None = None,
) -> tuple[dict, list[LayerResult]]:
    """Compress ``plan``'s layers of ``model`` in place on ``pool``; ``(records, results)``.

    ``solvers`` maps layer names to the algorithm that solves them instead of the recipe's
    solver (a per-layer assignment, e.g. bits chosen by a budget); they must accept the recipe
    solver's statistics. ``on_layer()`` follows each solved layer, ``on_block(text)`` each
    finished block. The model's weights end up dequantized, as with ``compress_model``.
    """
    import ray

    solvers = solvers or {}
    modules = dict(model.named_modules())

    def jobs(names, stats):
        return {n: (solvers.get(n, recipe.solver), modules[n].weight, stats.get(n)) for n in names}

    if not recipe.needs_data:
        tick = time.perf_counter()
        records, results = solve_layers(pool, jobs(plan.names, {}), -1, on_layer)
        apply_records(model, records)
        if on_block:
            on_block(f"{len(records)} layers in {time.perf_counter() - tick:.1f} s")
        return records, results

    inputs = capture_block_inputs(model, calibration or [])
    count = min(shards, len(inputs.hidden))
    make_stats = recipe.solver_stats()
    records, results = {}, []
    for i, (prefix, names) in enumerate(plan.blocks):
        phases = {"stats": time.perf_counter()}  # phase -> its start, then its seconds
        block = modules[prefix]
        shard_refs = [ray.put(inputs.shard(s, count)) for s in range(count)]
        for t in recipe.transforms:
            stats = gather_stats(pool, ray.put(block), shard_refs, t.make_stats, prefix, names)
            t.transform_block(block, stats, prefix)
        stats = {}
        if make_stats is not None:
            stats = gather_stats(pool, ray.put(block), shard_refs, make_stats, prefix, names)
        phases["solve"] = time.perf_counter()
        done, res = solve_layers(pool, jobs(names, stats), i, on_layer)
        apply_records(block, done, prefix)
        records.update(done)
        results += res
        phases["outputs"] = time.perf_counter()
        if i + 1 < len(plan.blocks):
            block_ref = ray.put(block)
            workers = _spread(pool, count)
            tasks = [Task(w, shard_outputs, (block_ref, r)) for w, r in zip(workers, shard_refs)]
            hidden = [h for part in pool.run(tasks) for h in part]
            inputs = BlockInputs(hidden, inputs.kwargs)
        if on_block:
            marks = [*phases.values(), time.perf_counter()]
            split = ", ".join(f"{p} {b - a:.1f}" for p, a, b in zip(phases, marks, marks[1:]))
            on_block(
                f"block {i + 1}/{len(plan.blocks)}: {len(names)} layers in "
                f"{marks[-1] - marks[0]:.1f} s ({split})"
            )
    return records, results


def run_compression(
    model: torch.nn.Module,
    recipe,
    workers: int,
    ignore: list[str],
    progress=None,
    calibration: list | None = None,
    shards: int = 8,
    threads: int = 1,
    plan: LayerPlan | None = None,
) -> CompressResult:
    """The compress stage on a copy of ``model`` (left untouched) with ``workers`` actors.

    ``recipe`` is a :class:`Recipe`, a list of recipe entries or one algorithm. ``calibration``
    holds the batches of token ids a calibrated recipe needs; ``plan`` the layers, when the
    caller has checked them already (``plan_layers``). ``progress`` is a tqdm-like class, or
    None for one log line per block.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.parse(recipe if isinstance(recipe, list) else [recipe])
    plan = plan or plan_layers(model, recipe, ignore)
    if recipe.needs_data and not calibration:
        raise DataError("compress: the recipe needs calibration batches, none were given")
    start = time.perf_counter()
    bar = progress(total=len(plan.names), desc="compress") if progress else None

    def block_line(text: str) -> None:
        if bar is None:
            print(f"presso: compressed {text}", flush=True)

    pool = WorkerPool(workers, threads)
    try:
        work = copy.deepcopy(model)  # while the actors start
        records, layers = compress_layers(
            work,
            plan,
            recipe,
            pool,
            calibration,
            shards,
            on_layer=lambda: bar and bar.update(1),
            on_block=block_line,
        )
    finally:
        pool.close()
        if bar:
            bar.close()
    return CompressResult(
        records={n: records[n] for n in plan.names},
        model=work,
        layers=layers,
        worker_s=pool.busy_s,
        reassigned=pool.reassigned,
        wall_s=time.perf_counter() - start,
    )
