"""The compress stage: calibration and solving spread over a pool of Ray actors.

The block loop is :func:`presso.compressors.ptq.blocks.compress_blocks`, the same one that runs in
one process; this module supplies how its steps run on the pool (:class:`RaySteps`). A recipe that
needs no data (RTN, magnitude) solves every layer at once, layer-parallel. A calibrated recipe
goes block by block, the inputs of block ``i`` coming from blocks ``< i`` already compressed:

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
from presso.compressors.ptq.architectures import Architecture
from presso.compressors.ptq.blocks import (
    BlockInputs,
    BlockLayers,
    InProcess,
    LayerReport,
    block_outputs,
    compress_blocks,
    select_layers,
)
from presso.compressors.ptq.calibration import sum_shards
from presso.compressors.ptq.recipe import Recipe
from presso.orchestrator.data import with_bos
from presso.orchestrator.pool import Task, WorkerPool


@dataclass
class CompressResult:
    records: dict  # layer name → stored record, in model order
    model: torch.nn.Module  # a copy of the model, weights dequantized (and AWQ-folded)
    layers: list[LayerReport] = field(default_factory=list)
    worker_s: list[float] = field(default_factory=list)  # busy seconds of each worker
    reassigned: int = 0  # tasks moved to another worker after theirs died
    wall_s: float = 0.0


def plan_layers(
    model: torch.nn.Module,
    recipe: Recipe,
    ignore: Iterable[str],
    architecture: Architecture | None = None,
) -> BlockLayers:
    """Every layer checked against every recipe step before any work starts (e.g. a group size
    that does not divide a layer's width); weighted modules of other types are listed once.
    ``architecture``: the model type's registered description unless given."""
    plan = select_layers(model, recipe, ignore, architecture)
    if not plan.names and recipe.embedding is None:
        raise UnsupportedError(
            f"compress.ignore {list(ignore)} leaves no nn.Linear layer to compress in this model"
        )
    if recipe.embedding is not None:
        recipe.embedding.check_shapes(model)
        overlap = set(recipe.embedding.embedding_layers(model)) & set(plan.names)
        if overlap:
            raise UnsupportedError(
                f"compress.recipe: {sorted(overlap)} would be quantized by the solver and by the "
                "embedding entry; keep lm_head in compress.ignore"
            )
    return plan


def calibration_batches(
    tokens: torch.Tensor,
    samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    bos: int | None = None,
) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets, in batches; with
    ``bos``, each window is ``bos`` and ``seq_len - 1`` tokens."""
    body = seq_len - (bos is not None)
    span = tokens.numel() - body
    if span <= 0:
        raise DataError(
            f"compress.calibration.seq_len {seq_len}: the train split has only "
            f"{tokens.numel()} tokens; lower it"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, span, (samples,), generator=gen).tolist()
    rows = torch.stack([tokens[s : s + body] for s in starts])
    return list(with_bos(rows, bos).split(batch_size))


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
    return InProcess().stats(block, prefix, inputs, make_stats, names)


def shard_outputs(block, inputs: BlockInputs) -> list[torch.Tensor]:
    return block_outputs(block, inputs).hidden


def solve_task(algo, name: str, weight: torch.Tensor, stats) -> tuple:
    """One layer's record, its relative error and the seconds the solve took."""
    records, (report,) = InProcess().solve({name: (algo, weight, stats)}, -1)
    return records[name], report.rel_error, report.seconds


# Driver side.


def spread_over(pool: WorkerPool, count: int) -> list[int]:
    """Worker of each of ``count`` equal tasks: round-robin over the live workers."""
    live = pool.live()
    return [live[i % len(live)] for i in range(count)]


class RaySteps:
    """The block loop's steps on a pool of Ray actors: statistics and next-block outputs one
    task per data shard (``shards`` contiguous shards of whole batches, summed in shard order),
    solves one task per layer, assigned to the live workers by estimated cost."""

    def __init__(self, pool: WorkerPool, shards: int, on_layer: Callable[[], None] | None = None):
        self.pool, self.shards, self.on_layer = pool, shards, on_layer
        self._inputs, self._shard_refs = None, []

    def _shipped(self, inputs: BlockInputs) -> list:
        """The shards of ``inputs`` in the object store, shipped once per block."""
        import ray

        if inputs is not self._inputs:
            count = min(self.shards, len(inputs.hidden))
            self._inputs = inputs
            self._shard_refs = [ray.put(inputs.shard(s, count)) for s in range(count)]
        return self._shard_refs

    def _per_shard(self, fn, block, inputs: BlockInputs, *args) -> list:
        import ray

        block_ref, shard_refs = ray.put(block), self._shipped(inputs)
        workers = spread_over(self.pool, len(shard_refs))
        tasks = [Task(w, fn, (block_ref, ref, *args)) for w, ref in zip(workers, shard_refs)]
        return self.pool.run(tasks)

    def stats(self, block, prefix, inputs, make_stats, names):
        return sum_shards(self._per_shard(shard_stats, block, inputs, make_stats, prefix, names))

    def outputs(self, block, inputs):
        parts = self._per_shard(shard_outputs, block, inputs)
        return BlockInputs([h for part in parts for h in part], inputs.kwargs)

    def solve(self, jobs, block):
        import ray

        refs: dict[int, object] = {}  # each distinct algorithm and statistic shipped once

        def ref(obj):
            if obj is None:
                return None
            return refs.setdefault(id(obj), ray.put(obj))

        live = self.pool.live()
        costs = {n: layer_cost(w, s is not None) for n, (_, w, s) in jobs.items()}
        tasks = []
        for w, chunk in zip(live, assign(costs, len(live))):
            for name in chunk:
                algo, weight, stats = jobs[name]
                args = (ref(algo), name, weight.detach().float(), ref(stats))
                tasks.append(Task(w, solve_task, args))
        on_result = lambda i, r: self.on_layer and self.on_layer()  # noqa: E731
        solved = self.pool.run(tasks, on_result=on_result)
        records, reports = {}, {}
        for task, (record, error, seconds) in zip(tasks, solved):
            name = task.args[1]
            records[name] = record
            reports[name] = LayerReport(name, block, task.worker, seconds, error)
        return {n: records[n] for n in jobs}, [reports[n] for n in jobs]


def compress_layers(
    model: torch.nn.Module,
    plan: BlockLayers,
    recipe: Recipe,
    pool: WorkerPool,
    calibration: list | None = None,
    shards: int = 8,
    solvers: dict | None = None,
    on_layer: Callable[[], None] | None = None,
    on_block: Callable[[str], None] | None = None,
) -> tuple[dict, list[LayerReport]]:
    """Compress ``plan``'s layers of ``model`` in place on ``pool``; ``(records, reports)``.
    ``solvers``, ``on_block``: as in :func:`~presso.compressors.ptq.blocks.compress_blocks`;
    ``on_layer()`` follows each solved layer."""
    steps = RaySteps(pool, shards, on_layer)
    return compress_blocks(model, plan, recipe, steps, calibration, solvers, on_block)


def run_compression(
    model: torch.nn.Module,
    recipe,
    workers: int,
    ignore: list[str],
    progress=None,
    calibration: list | None = None,
    shards: int = 8,
    threads: int = 1,
    plan: BlockLayers | None = None,
) -> CompressResult:
    """The compress stage on a copy of ``model`` (left untouched) with ``workers`` actors, or
    in this process with ``workers=0`` (the same block loop, :class:`InProcess` steps).

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

    pool = WorkerPool(workers, threads) if workers else None
    try:
        work = copy.deepcopy(model)  # while the actors start
        on_layer = lambda *_: bar and bar.update(1)  # noqa: E731
        if pool:
            records, layers = compress_layers(
                work, plan, recipe, pool, calibration, shards, None, on_layer, block_line
            )
        else:
            steps = InProcess(on_layer, shards)  # the pool's sums: the same records
            records, layers = compress_blocks(
                work, plan, recipe, steps, calibration, None, block_line
            )
    finally:
        if pool:
            pool.close()
        if bar:
            bar.close()
    names = list(plan.names)
    if recipe.embedding is not None:  # data-free and quick: on the driver
        embedded = recipe.embedding.compress_embeddings(work)
        records.update(embedded)
        names += list(embedded)
    return CompressResult(
        records={n: records[n] for n in names},
        model=work,
        layers=layers,
        worker_s=pool.busy_s if pool else [time.perf_counter() - start],
        reassigned=pool.reassigned if pool else 0,
        wall_s=time.perf_counter() - start,
    )
