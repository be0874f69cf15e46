"""Post-training compression of a decoder model, block by block, in one process.

The reference pipeline, built from steps that a distributed runner can spread over workers::

    recipe = [build("gptq", {"bits": 4, "group_size": 64})]
    records = compress_model(model, recipe, calib_batches, ignore=["lm_head"])
    save_compressed(model, records, "out/")

For each decoder block ``i`` in turn (the inputs of block ``i`` come from blocks ``< i`` already
compressed, so later blocks calibrate against the errors of earlier ones):

1. :func:`accumulate_stats` — feed the block's calibration inputs through it and sum each
   linear's input statistics. Data-parallel: workers take shards of the inputs; their results
   add up (``+``) to the whole set's (see :mod:`presso.compressors.ptq.calibration`).
2. Block transforms (AWQ scaling), each with its own statistics; deterministic given them.
3. :func:`solve_layer` for every linear — independent per layer, so layer-parallel.
4. :func:`apply_records` — the block's weights become their dequantized values.
5. :func:`block_outputs` — the next block's inputs (per shard, on each worker).

**Recipes.** A recipe is a list of algorithms: zero or more *transforms* (entries with a
``transform_block`` method: ``awq``) followed by exactly one *solver* (any entry with
``compress``: ``rtn``, ``gptq``, ``spqr``, ``adadim``, ``magnitude``, ``wanda``, ``sparsegpt``).
Transforms run in order on each block, then the last entry solves every layer. A transform that
is also the last entry (``[awq]``) solves with its own data-free rounding. Joint prune +
quantize is one solver (``sparsegpt`` with ``bits``), not a pruner followed by a quantizer: only
inside one sweep can the quantization error be compensated together with the pruning error.

Layers: every ``nn.Linear`` inside the decoder blocks (``model.model.layers`` for Hugging Face
Llama-style models), except those matching ``ignore``. Other weighted leaf modules in the blocks
are skipped and listed once in the log. Every layer's shape is checked against the recipe before
any work starts.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from presso import ConfigError, DataError, UnsupportedError
from presso.compressors.ptq.calibration import weight_error
from presso.compressors.registry import build

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    transforms: list  # block transforms, applied in order (AWQ)
    solver: object  # the algorithm that turns each layer into a stored record

    @classmethod
    def parse(cls, entries: Sequence, prefix: str = "compress.recipe") -> Recipe:
        """Entries are algorithm objects or ``{name: {setting: value}}`` mappings (YAML)."""
        algos = []
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping):  # a dict, or an OmegaConf DictConfig
                if len(entry) != 1:
                    raise ConfigError(f"{prefix}[{i}]: expected one {{algorithm: settings}} pair")
                ((name, params),) = entry.items()
                entry = build(name, dict(params or {}), f"{prefix}[{i}]")
            algos.append(entry)
        if not algos:
            raise ConfigError(f"{prefix}: empty; give at least one algorithm, e.g. [{{rtn: {{}}}}]")
        for i, algo in enumerate(algos[:-1]):
            if not hasattr(algo, "transform_block"):
                raise ConfigError(
                    f"{prefix}[{i}]: {getattr(algo, 'name', algo)} solves layers, so it must be "
                    "the last entry; only block transforms (awq) may come before the solver"
                )
        if not hasattr(algos[-1], "compress"):
            raise ConfigError(f"{prefix}[{len(algos) - 1}]: the last entry must solve layers")
        return cls([a for a in algos if hasattr(a, "transform_block")], algos[-1])

    def solver_stats(self):
        """The solver's statistic factory, or ``None`` when it solves without data."""
        if hasattr(self.solver, "transform_block"):  # a transform solves data-free (AWQ → RTN)
            return None
        return getattr(self.solver, "make_stats", None)

    @property
    def needs_data(self) -> bool:
        return bool(self.transforms) or self.solver_stats() is not None


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
class LayerResult:
    """Progress report for one solved layer."""

    name: str
    block: int  # index of its decoder block
    blocks: int  # number of decoder blocks
    seconds: float  # wall time of solve_layer
    rel_error: float  # output error relative to the layer's output (weight error without data)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers: ``model.model.layers`` (HF Llama-style), else the first ModuleList."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return "model.layers", inner.layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return name, module
    raise UnsupportedError(
        f"{type(model).__name__}: no list of decoder blocks found; compress_model needs a "
        "model whose layers sit in an nn.ModuleList (e.g. model.model.layers)"
    )


def _ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(
        name == p or name.endswith(f".{p}") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def validate_model(
    model: torch.nn.Module, recipe: Recipe, ignore: Iterable[str] = ()
) -> list[tuple[str, torch.nn.Module, dict[str, torch.nn.Linear]]]:
    """Per block ``(prefix, block, {name: linear})``; raises on any unsupported shape first."""
    prefix, blocks = find_blocks(model)
    plan, unsupported = [], []
    for i, block in enumerate(blocks):
        bp = f"{prefix}.{i}"
        linears = {}
        for rel, module in block.named_modules():
            name = f"{bp}.{rel}"
            if isinstance(module, torch.nn.Linear):
                if not _ignored(name, ignore):
                    linears[name] = module
            elif getattr(module, "weight", None) is not None and module.weight.dim() >= 2:
                unsupported.append(f"{name} ({type(module).__name__})")
        for name, lin in linears.items():
            for algo in [*recipe.transforms, recipe.solver]:
                if hasattr(algo, "check_shape"):
                    algo.check_shape(lin.out_features, lin.in_features, name)
        plan.append((bp, block, linears))
    if unsupported:
        log.warning("skipping %d layers of unsupported types: %s", len(unsupported), unsupported)
    return plan


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs."""


def model_inputs(batch) -> dict:
    """A calibration batch as model keyword arguments (token ids alone, or a dict)."""
    return dict(batch) if isinstance(batch, dict) else {"input_ids": batch}


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, calib_batches: Iterable) -> BlockInputs:
    """Run each batch (``input_ids`` tensors or dicts of model inputs) up to the first block."""
    _, blocks = find_blocks(model)
    inputs = BlockInputs([], [])

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach())
        inputs.kwargs.append(kwargs)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    model.eval()
    try:
        for batch in calib_batches:
            try:
                model(**model_inputs(batch), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not inputs.hidden:
        raise DataError("calibration: no batches given, but the recipe needs calibration data")
    return inputs


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


def merge_stats(parts: Sequence[dict]) -> dict:
    """Sum per-layer statistics of data shards, in shard order."""
    total = dict(parts[0])
    for part in parts[1:]:
        total = {name: total[name] + part[name] for name in total}
    return total


def transform_block(
    recipe: Recipe,
    block: torch.nn.Module,
    inputs: BlockInputs,
    linears: dict[str, torch.nn.Linear],
    prefix: str,
) -> None:
    """Apply the recipe's block transforms in order, each calibrated on the block as it is."""
    for t in recipe.transforms:
        stats = accumulate_stats(block, inputs, t.make_stats, linears)
        t.transform_block(block, stats, prefix)


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


def compress_model(
    model: torch.nn.Module,
    recipe,
    calib_batches: Iterable | None = None,
    ignore: Iterable[str] = ("lm_head",),
    progress: Callable[[LayerResult], None] | None = None,
) -> dict:
    """Compress every decoder-block linear of ``model`` in place; returns ``{name: record}``.

    ``recipe`` is a :class:`Recipe` or a list of entries (see :meth:`Recipe.parse`). The model's
    weights end up dequantized (and AWQ-folded), ready for ``save_compressed(model, records)``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)
    plan = validate_model(model, recipe, ignore)
    inputs = capture_block_inputs(model, calib_batches or []) if recipe.needs_data else None
    make_stats = recipe.solver_stats()
    records = {}
    for i, (prefix, block, linears) in enumerate(plan):
        if recipe.transforms:
            transform_block(recipe, block, inputs, linears, prefix)
        stats = accumulate_stats(block, inputs, make_stats, linears) if make_stats else {}
        done = {}
        for name, lin in linears.items():
            t0 = time.perf_counter()
            done[name] = solve_layer(recipe.solver, lin.weight, stats.get(name), name)
            seconds = time.perf_counter() - t0
            if progress is not None:
                err = relative_error(lin.weight, done[name], stats.get(name))
                progress(LayerResult(name, i, len(plan), seconds, err))
        apply_records(block, done, prefix)
        records.update(done)
        if inputs is not None and i + 1 < len(plan):
            inputs = block_outputs(block, inputs)
    return records
