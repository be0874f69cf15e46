"""Post-training compression of a decoder model, block by block: the one block loop.

    records = compress_model(model, [{"gptq": {"bits": 4, "group_size": 64}}], calib_batches)
    save_compressed(model, records, "out/")

For each decoder block ``i`` in turn (the inputs of block ``i`` come from blocks ``< i`` already
compressed, so later blocks calibrate against the errors of earlier ones):

1. **stats** — feed the block's calibration inputs through it and sum each linear's input
   statistics, once per transform (AWQ), then once for the solver;
2. the transforms rewrite the block from their statistics (deterministic given them);
3. **solve** every linear — independent per layer;
4. the block's weights become their records' dequantized values;
5. **outputs** — the next block's inputs.

:func:`compress_blocks` is that loop, and the only one: *how* stats, solve and outputs run is
a :class:`Steps` object. :class:`InProcess` runs them here; the orchestrator's Ray steps spread
statistics over data shards (their sums, ``+``, equal the whole set's: see
:mod:`presso.compressors.ptq.calibration`) and solves over workers. A recipe that needs no data
solves every layer at once.

Layers: every ``nn.Linear`` inside the decoder blocks, except those matching ``ignore``. Where
the blocks are (and what AWQ may fold) comes from the model's declared architecture
(:mod:`presso.compressors.ptq.architectures`); a model type without one is refused up front.
Other weighted leaf modules in the blocks are skipped and listed once in the log. Every layer's
shape is checked against the recipe before any work starts.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from presso import DataError
from presso.compressors.ptq.architectures import Architecture, architecture_of
from presso.compressors.ptq.calibration import sum_shards, weight_error
from presso.compressors.ptq.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    """One block's calibration inputs: per batch, the hidden states and the keyword arguments
    (attention mask, rotary embeddings, position ids) the model called its layers with."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def shard(self, index: int, count: int) -> BlockInputs:
        """The ``index``-th of ``count`` contiguous shards of the batches (data parallelism)."""
        n = len(self.hidden)
        lo, hi = n * index // count, n * (index + 1) // count
        return BlockInputs(self.hidden[lo:hi], self.kwargs[lo:hi])


@dataclass
class BlockLayers:
    """The layers a recipe compresses, per decoder block: ``(block prefix, linear names)``, and
    the architecture they were found by."""

    blocks: list[tuple[str, list[str]]]
    architecture: Architecture

    @property
    def names(self) -> list[str]:
        return [name for _, names in self.blocks for name in names]


@dataclass
class LayerReport:
    """What solving one layer took and gave."""

    name: str
    block: int  # decoder block index; -1 when solved without calibration
    worker: int  # the worker that solved it (0 in one process)
    seconds: float  # wall time of the solve
    rel_error: float  # output error relative to the layer's output (weight error without data)


def _ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(
        name == p or name.endswith(f".{p}") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def select_layers(
    model: torch.nn.Module,
    recipe: Recipe,
    ignore: Iterable[str] = (),
    architecture: Architecture | None = None,
) -> BlockLayers:
    """The linears to compress, per block; raises on any shape the recipe cannot handle first.
    ``architecture`` defaults to the registered description of the model's type."""
    architecture = architecture_of(model, architecture)
    prefix, blocks = architecture.find_blocks(model)
    selected, unsupported = [], []
    for i, block in enumerate(blocks):
        bp = f"{prefix}.{i}"
        names = []
        for rel, module in block.named_modules():
            name = f"{bp}.{rel}"
            if isinstance(module, torch.nn.Linear):
                if not _ignored(name, ignore):
                    names.append(name)
                    for algo in [*recipe.transforms, recipe.solver]:
                        if hasattr(algo, "check_shape"):
                            algo.check_shape(module.out_features, module.in_features, name)
            elif getattr(module, "weight", None) is not None and module.weight.dim() >= 2:
                unsupported.append(f"{name} ({type(module).__name__})")
        selected.append((bp, names))
    if unsupported:
        log.warning("skipping %d layers of unsupported types: %s", len(unsupported), unsupported)
    return BlockLayers(selected, architecture)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs."""


def model_inputs(batch) -> dict:
    """A calibration batch as model keyword arguments (token ids alone, or a dict)."""
    return dict(batch) if isinstance(batch, dict) else {"input_ids": batch}


@torch.no_grad()
def capture_inputs(
    model: torch.nn.Module, calib_batches: Iterable, architecture: Architecture | None = None
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first block's hidden states per batch, and every block's keyword arguments per batch.

    Blocks may be called with different arguments (Gemma's sliding-window and global layers get
    different masks and rotary tables), so each block's own are kept. While capturing, every
    block passes its input through unchanged and the last one stops the forward pass: one
    embedding pass per batch, no block computed.
    """
    _, blocks = architecture_of(model, architecture).find_blocks(model)
    hidden, kwargs = [], [[] for _ in blocks]

    def recorder(i):
        def record(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            kwargs[i].append(kw)
            if i == len(blocks) - 1:
                raise _Captured
            return h

        return record

    model.eval()
    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: shadows the class's forward
    try:
        for batch in calib_batches:
            try:
                model(**model_inputs(batch), use_cache=False)
            except _Captured:
                pass
    finally:
        for block in blocks:
            del block.forward
    if not hidden:
        raise DataError("calibration: no batches given, but the recipe needs calibration data")
    return hidden, kwargs


def capture_block_inputs(
    model: torch.nn.Module, calib_batches: Iterable, architecture: Architecture | None = None
) -> BlockInputs:
    """The first block's calibration inputs (batches of ``input_ids`` or dicts of model inputs)."""
    hidden, kwargs = capture_inputs(model, calib_batches, architecture)
    return BlockInputs(hidden, kwargs[0])


def _run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return tuples


@torch.no_grad()
def accumulate_stats(
    block: torch.nn.Module,
    inputs: BlockInputs,
    make_stats: Callable,
    linears: dict[str, torch.nn.Linear],
) -> dict:
    """Each linear's input statistics (``make_stats(in_features)``) over ``inputs``."""
    stats = {name: make_stats(lin.in_features) for name, lin in linears.items()}
    # Linears fed the very same tensor as the one before (q/k/v, gate/up) share its statistic:
    # one accumulation instead of three (the model's code feeds them the same way every batch).
    last, alias = [None, None], {}

    def feeder(name):
        def feed(module, args):
            if args[0] is last[0]:
                alias[name] = last[1]
            else:
                stats[name].update(args[0], name)
                last[:] = [args[0], name]

        return feed

    handles = [lin.register_forward_pre_hook(feeder(n)) for n, lin in linears.items()]
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            _run_block(block, hidden, kwargs)
            last[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
    return {name: stats[alias.get(name, name)] for name in stats}


def solve_layer(algo, weight: torch.Tensor, stats, name: str):
    """One layer's stored record; independent of every other layer."""
    return algo.compress(weight.detach().float(), stats, name)


@torch.no_grad()
def apply_records(root: torch.nn.Module, records: dict, prefix: str = "") -> None:
    """Replace each recorded layer's weight by its dequantized value (names relative to
    ``root`` once ``prefix`` is stripped; the full model and ``prefix=""`` also work)."""
    cut = len(prefix) + 1 if prefix else 0
    for name, record in records.items():
        weight = root.get_submodule(name[cut:]).weight
        weight.copy_(record.dequantize().to(weight.dtype))


@torch.no_grad()
def block_outputs(block: torch.nn.Module, inputs: BlockInputs) -> BlockInputs:
    hidden = [_run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    return BlockInputs(hidden, inputs.kwargs)


def relative_error(weight: torch.Tensor, record, stats) -> float:
    w = weight.detach().float()
    return weight_error(record.dequantize() - w, stats) / max(weight_error(w, stats), 1e-30)


class Steps(Protocol):
    """How the block loop's steps run: in this process, or spread over workers."""

    def stats(self, block, prefix: str, inputs: BlockInputs, make_stats, names: list[str]) -> dict:
        """Each named linear's input statistics over all of ``inputs`` (names in full, the
        block's own name ``prefix``)."""

    def solve(self, jobs: dict[str, tuple], block: int) -> tuple[dict, list[LayerReport]]:
        """``{name: (algorithm, weight, stats or None)}`` → ``({name: record}, reports)``,
        both in ``jobs`` order."""

    def outputs(self, block, inputs: BlockInputs) -> BlockInputs:
        """The block's outputs: the next block's inputs."""


@dataclass
class InProcess:
    """The steps run here, one after the other; ``progress`` sees each solved layer. With
    ``shards`` the statistics are summed per shard as the Ray steps sum them, so that the
    records equal a pool's with as many shards."""

    progress: Callable[[LayerReport], None] | None = None
    shards: int = 1

    def stats(self, block, prefix, inputs, make_stats, names):
        linears = {n: block.get_submodule(n[len(prefix) + 1 :]) for n in names}
        count = min(self.shards, len(inputs.hidden))
        if count <= 1:
            return accumulate_stats(block, inputs, make_stats, linears)
        parts = [accumulate_stats(block, inputs.shard(i, count), make_stats, linears)
                 for i in range(count)]  # fmt: skip
        return sum_shards(parts)

    def solve(self, jobs, block):
        records, reports = {}, []
        for name, (algo, weight, stats) in jobs.items():
            tick = time.perf_counter()
            records[name] = solve_layer(algo, weight, stats, name)
            seconds = time.perf_counter() - tick
            error = relative_error(weight, records[name], stats)
            reports.append(LayerReport(name, block, 0, seconds, error))
            if self.progress is not None:
                self.progress(reports[-1])
        return records, reports

    def outputs(self, block, inputs):
        return block_outputs(block, inputs)


@torch.no_grad()
def compress_blocks(
    model: torch.nn.Module,
    layers: BlockLayers,
    recipe: Recipe,
    steps: Steps,
    calib_batches: Iterable | None = None,
    solvers: dict | None = None,
    on_block: Callable[[str], None] | None = None,
) -> tuple[dict, list[LayerReport]]:
    """Compress ``layers`` of ``model`` in place; returns ``({name: record}, reports)``.

    ``solvers`` maps layer names to the algorithm that solves them instead of the recipe's
    solver (a per-layer assignment, e.g. bits chosen by a budget); they must accept the recipe
    solver's statistics. ``on_block(text)`` follows each finished block with its timings.
    """
    if not layers.names:  # e.g. a budget plan that only packs the embedding
        return {}, []
    solvers = solvers or {}
    modules = dict(model.named_modules())

    def jobs(names: list[str], stats: dict) -> dict[str, tuple]:
        return {n: (solvers.get(n, recipe.solver), modules[n].weight, stats.get(n)) for n in names}

    if not recipe.needs_data:
        tick = time.perf_counter()
        records, reports = steps.solve(jobs(layers.names, {}), -1)
        apply_records(model, records)
        if on_block:
            on_block(f"{len(records)} layers in {time.perf_counter() - tick:.1f} s")
        return records, reports

    hidden, block_kwargs = capture_inputs(model, calib_batches or [], layers.architecture)
    inputs = BlockInputs(hidden, block_kwargs[0])
    make_stats = recipe.solver_stats()
    records, reports = {}, []
    for i, (prefix, names) in enumerate(layers.blocks):
        phases = {"stats": time.perf_counter()}  # phase -> its start, then its seconds
        block = modules[prefix]
        for t in recipe.transforms:
            t_stats = steps.stats(block, prefix, inputs, t.make_stats, names)
            t.transform_block(block, t_stats, prefix, layers.architecture)
        stats = steps.stats(block, prefix, inputs, make_stats, names) if make_stats else {}
        phases["solve"] = time.perf_counter()
        done, done_reports = steps.solve(jobs(names, stats), i)
        apply_records(block, done, prefix)
        records.update(done)
        reports += done_reports
        phases["outputs"] = time.perf_counter()
        if i + 1 < len(layers.blocks):
            inputs = BlockInputs(steps.outputs(block, inputs).hidden, block_kwargs[i + 1])
        if on_block:
            marks = [*phases.values(), time.perf_counter()]
            split = ", ".join(f"{p} {b - a:.1f}" for p, a, b in zip(phases, marks, marks[1:]))
            on_block(
                f"block {i + 1}/{len(layers.blocks)}: {len(names)} layers in "
                f"{marks[-1] - marks[0]:.1f} s ({split})"
            )
    return records, reports


def compress_model(
    model: torch.nn.Module,
    recipe,
    calib_batches: Iterable | None = None,
    ignore: Iterable[str] = ("lm_head",),
    progress: Callable[[LayerReport], None] | None = None,
    architecture: Architecture | None = None,
) -> dict:
    """Compress every decoder-block linear of ``model`` in place, in this process; returns
    ``{name: record}``. ``recipe`` is a :class:`Recipe` or a list of entries (see
    :meth:`Recipe.parse`). The model's weights end up dequantized (and AWQ-folded), ready for
    ``save_compressed(model, records)``. ``architecture``: for a model type presso has no
    description of (see :mod:`presso.compressors.ptq.architectures`).
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)
    layers = select_layers(model, recipe, ignore, architecture)
    records = compress_blocks(model, layers, recipe, InProcess(progress), calib_batches)[0]
    if recipe.embedding is not None:  # after the solver, as the pool runs it
        records.update(recipe.embedding.compress_embeddings(model))
    return records
