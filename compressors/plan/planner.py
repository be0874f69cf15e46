"""Compress a model to a budget: per-layer bits, sparsity or rank, chosen by the shared solver.

The weight-side twin of L-GreCo: measure every layer's error for every candidate setting, then
let :mod:`presso.compressors.plan.knapsack` (the same knapsack the gradient controller uses) pick one
candidate per layer. Errors are weighted by the loss's sensitivity to each layer output
(:func:`output_sensitivity`), so their sum estimates the loss increase of the whole plan::

    options = measure_model(model, calib_batches, CandidateGrid())  # one pass, dense model
    planner = Planner(model, options, tokenizer)
    plan = planner.for_bytes(parse_bytes("40MB"))          # or for_avg_bits(3.5), for_error(E)
    records = compress_model(model, [plan.solver()], calib_batches, ["lm_head", *plan.ignore])
    save_compressed(model, records, "out/", tokenizer)     # == plan.artifact_bytes, <= 40 MB

Statistics and measurements are made once; any number of budgets can then be planned from them
(the any-size sweep). The chosen settings are solved properly (GPTQ, SparseGPT, output-optimal
low rank) with sequential calibration, like any uniform recipe.

**Whole-artifact byte budgets.** Tensor bytes are exact per candidate; metadata (safetensors
header, config.json, manifest, tokenizer files) is rendered exactly by
:class:`~presso.compressors.formats.artifact_size.ArtifactSizer`. A candidate's cost is its tensor bytes
plus its own header entries; the rest is held back as a reserve. If the exact size of the plan
still exceeds the budget (schemes differ in length), the reserve grows by the excess and the
knapsack runs again, so the result never exceeds the budget and its size is known to the byte.

**Perplexity budgets** (:meth:`Planner.search_ppl`): bisection over the total-error budget ``E``
on a log scale. Each step plans the fewest bytes with error ``<= E``, has the caller solve and
measure it, and keeps the smallest plan within the allowed increase; ``steps`` evaluations in all.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from decimal import Decimal

import torch

from presso import ConfigError, DataError, UnsupportedError
from presso.compressors.formats.artifact_size import ArtifactSizer, LayerRecord, entry_bytes
from presso.compressors.plan.candidates import (
    Candidate,
    CandidateGrid,
    EmbeddingSensitivity,
    Option,
    measure_embedding,
    measure_layer,
    spec_bytes,
)
from presso.compressors.plan.knapsack import min_bytes_within_error, min_error_within_bytes
from presso.compressors.ptq.blocks import compress_model, model_inputs, select_layers
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.ptq.recipe import Recipe
from presso.compressors.quant.embedding import EmbeddingQuant
from presso.compressors.registry import check_range

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str, key: str = "compress.budget.bytes") -> int:
    """Bytes from an int or a string: ``"40MB"`` is 40·10⁶ bytes, ``"40MiB"`` 40·2²⁰."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in UNITS:
        raise ConfigError(
            f"{key}: expected a byte count such as 40000000, '40MB' (10^6 bytes) or '40MiB' "
            f"(2^20 bytes); units B, kB, MB, GB, KiB, MiB, GiB; got {value!r}"
        )
    return int(Decimal(m.group(1)) * UNITS[m.group(2).lower()])


@dataclass
class BudgetConfig:
    """What the compressed model may cost; set exactly one of the three budgets."""

    bytes: str | None = None  # whole artifact at most: 40000000, "40MB" (10^6) or "40MiB" (2^20)
    avg_bits: float | None = None  # stored bits per planned weight, scales and masks included
    max_ppl_increase_pct: float | None = None  # allowed perplexity rise on held-out text (%)
    search_steps: int = 6  # perplexity evaluations spent by the max_ppl_increase_pct search
    search_tokens: int = 8192  # held-out tokens each of those evaluations reads

    def validate(self, prefix: str) -> None:
        kinds = ("bytes", "avg_bits", "max_ppl_increase_pct")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{prefix}: set exactly one of bytes, avg_bits, max_ppl_increase_pct; got "
                f"{given or 'none'}"
            )
        if self.bytes is not None:
            parse_bytes(self.bytes, f"{prefix}.bytes")
        if self.avg_bits is not None:
            check_range(f"{prefix}.avg_bits", self.avg_bits, 0.01, 32)
        if self.max_ppl_increase_pct is not None:
            check_range(f"{prefix}.max_ppl_increase_pct", self.max_ppl_increase_pct, 1e-6, 1e6)
        check_range(f"{prefix}.search_steps", self.search_steps, 1, 100)
        check_range(f"{prefix}.search_tokens", self.search_tokens, 2, 1 << 40)


def planned_layers(model: torch.nn.Module, ignore: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The decoder-block linears a plan covers, in the order the pipeline solves them."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name in select_layers(model, Recipe([], None), ignore).names}


def tied_embedding(model: torch.nn.Module) -> str | None:
    """The input embedding's name when ``lm_head`` shares its weight (one stored matrix)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return None
    return next(n for n, m in model.named_modules() if m is inputs)


def planned_embedding(
    model: torch.nn.Module, grid: CandidateGrid, ignore: Iterable[str]
) -> str | None:
    """The tied embedding's name if the plan decides it too: the grid offers it widths, errors
    are weighted by the loss (which prices both of its uses) and no layer plan covers lm_head.
    Untied heads are not planned (yet): the embedding entry would give them the same grid."""
    name = tied_embedding(model)
    if name is None or not grid.embedding_bits or grid.error != "loss":
        return None
    head = model.get_output_embeddings()
    return None if any(m is head for m in planned_layers(model, ignore).values()) else name


@dataclass
class Measured:
    """A layer's measured options, standing in for its record while measuring: it dequantizes
    to the unchanged weight, so later blocks calibrate on the dense model's activations."""

    weight: torch.Tensor
    options: list[Option]

    def dequantize(self) -> torch.Tensor:
        return self.weight


def output_sensitivity(
    model: torch.nn.Module,
    calib_batches: Iterable,
    ignore: Iterable[str] = ("lm_head",),
    embedding: bool = False,
) -> dict:
    """How much the loss cares about each output of each planned layer: the mean over
    calibration tokens of ``(∂L/∂yᵢ)²``, ``L`` the summed next-token loss (a diagonal Fisher).

    Weighting a layer's output errors by it turns ``tr(Δ H Δᵀ)`` into a second-order estimate of
    the loss increase, ``Δ(mean loss) ≈ ½ Σᵢ fᵢ (Δ H Δᵀ)ᵢᵢ``, comparable across layers: an error in
    an early block's small outputs, which every later block reads, is no longer taken as cheap.
    One forward and backward pass of the dense model per batch; weights are left untouched.
    With ``embedding`` (and a tied embedding), the same pass also prices the embedding's error
    in both its uses: an :class:`~presso.compressors.plan.candidates.EmbeddingSensitivity`
    under its name. Data-parallel: :func:`sensitivity_sums` per shard, then :func:`sensitivity_of`.
    """
    return sensitivity_of([sensitivity_sums(model, calib_batches, ignore, embedding)])


def sensitivity_sums(
    model: torch.nn.Module,
    calib_batches: Iterable,
    ignore: Iterable[str] = ("lm_head",),
    embedding: bool = False,
) -> tuple[dict, int]:
    """``({layer: Σ (∂L/∂y)² per output, fp64}, tokens)`` over ``calib_batches`` (with
    ``embedding``, the tied embedding's :class:`EmbeddingSensitivity` sums too)."""
    layers = planned_layers(model, ignore)
    sums: dict = {
        name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in layers.items()
    }
    tokens = 0
    tied = tied_embedding(model) if embedding else None
    handles = []
    if tied is not None:
        lookup, head = model.get_input_embeddings(), model.get_output_embeddings()
        v, d = lookup.weight.shape
        f64 = torch.float64
        sums[tied] = priced = EmbeddingSensitivity(
            torch.zeros(v, d, dtype=f64), torch.zeros(v, dtype=f64), torch.zeros(d, d, dtype=f64),
            float(getattr(lookup, "embed_scale", 1.0)),
        )  # fmt: skip

        def head_inputs(module, args):
            x = args[0].detach().reshape(-1, d).double()
            priced.head_hessian += x.T @ x

        def head_grads(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, v)
            priced.head += g.float().square().sum(0, dtype=f64)

        handles += [head.register_forward_pre_hook(head_inputs)]
        handles += [head.register_full_backward_hook(head_grads)]

    def hook(name):
        def record(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).double()
            sums[name] += g.square().sum(0)

        return record

    handles += [lin.register_full_backward_hook(hook(name)) for name, lin in layers.items()]
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)  # gradients reach the layer outputs without any weight's
    try:
        for batch in calib_batches:
            inputs = model_inputs(batch)
            ids = inputs["input_ids"]
            predicted = ids[:, 1:].numel()
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}
            out = model(inputs_embeds=embeds, labels=ids, use_cache=False, **rest)
            (out.loss * predicted).backward()
            tokens += ids.numel()
            if tied is not None:  # each token's (∂L/∂e)² onto the vocabulary row it looked up
                g = embeds.grad.reshape(-1, embeds.shape[-1]).double().square()
                priced.rows.index_add_(0, ids.reshape(-1), g)
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    return sums, tokens


def sensitivity_of(parts: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The loss weights from shards' :func:`sensitivity_sums`, summed in the order given."""
    tokens = sum(t for _, t in parts)
    if not tokens:
        raise DataError("output_sensitivity: no calibration batches given")
    sums = {name: sum(p[0][name] for p in parts) for name in parts[0][0]}
    return {
        name: s.normalized(tokens)
        if isinstance(s, EmbeddingSensitivity)
        else (s / (2 * tokens)).float()
        for name, s in sums.items()
    }


@dataclass
class CandidateMeasurer:
    """A recipe solver that measures instead of compressing: the PTQ pipeline (one process, or
    distributed over workers) then runs one calibration pass with the measurement spread over
    layers like any solve."""

    grid: CandidateGrid  # the candidates offered to every layer
    sensitivity: dict[str, torch.Tensor] | None = None  # per-output loss weights by layer name

    name = "budget-measure"
    needs_calibration = True

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(self, weight: torch.Tensor, stats: HessianStats, name: str = "layer") -> Measured:
        weights = None if self.sensitivity is None else self.sensitivity[name]
        return Measured(weight, measure_layer(weight, stats, self.grid, name, weights))


def measure_model(
    model: torch.nn.Module,
    calib_batches: Iterable,
    grid: CandidateGrid,
    ignore: Iterable[str] = ("lm_head",),
    progress: Callable | None = None,
    sensitivity: dict[str, torch.Tensor] | None = None,
) -> dict[str, list[Option]]:
    """Each planned layer's measured candidates, in one process (the model is left as it was).
    ``sensitivity``: :func:`output_sensitivity`'s result when the caller has it already."""
    calib_batches = list(calib_batches)  # read twice when weighting by the loss
    embedding = planned_embedding(model, grid, ignore)
    if sensitivity is None and grid.error == "loss":
        sensitivity = output_sensitivity(model, calib_batches, ignore, embedding is not None)
    solver = CandidateMeasurer(grid, layer_weights(sensitivity))
    records = compress_model(model, [solver], calib_batches, ignore, progress)
    options = {name: record.options for name, record in records.items()}
    return with_embedding(options, model, grid, sensitivity, embedding)


def layer_weights(sensitivity: dict | None) -> dict | None:
    """The per-output weights of the layers alone: what the measuring pass ships to workers
    (the embedding's pricing is a vocabulary-sized matrix, used on the driver)."""
    if sensitivity is None:
        return None
    return {n: s for n, s in sensitivity.items() if not isinstance(s, EmbeddingSensitivity)}


def with_embedding(
    options: dict[str, list[Option]],
    model: torch.nn.Module,
    grid: CandidateGrid,
    sensitivity: dict | None,
    embedding: str | None,
) -> dict[str, list[Option]]:
    """``options`` plus the tied embedding's (last: it is solved after the layers), when it is
    planned and priced by ``sensitivity``."""
    if embedding is None or sensitivity is None or embedding not in sensitivity:
        return options
    weight = model.get_submodule(embedding).weight
    return {**options, embedding: measure_embedding(weight, sensitivity[embedding], grid)}


def min_artifact_bytes(
    model: torch.nn.Module, grid: CandidateGrid, ignore: Iterable[str], tokenizer=None, dtype="auto"
) -> int:
    """The exact artifact size with every layer at its cheapest quantized or pruned setting.

    Needs shapes only, no calibration, so a budget below it is refused before any work. (Low-rank
    candidates are not counted: their ranks are known only once the layers are measured.)
    """
    layers: dict[str, LayerRecord] = {}
    sizer = ArtifactSizer(model, tokenizer, dtype)
    for name, lin in planned_layers(model, ignore).items():
        n, k = lin.weight.shape
        c = min(grid.candidates(k), key=lambda c: c.nbytes(n, k, sizer.dtype))
        if c.kind != "dense":
            record = c.proxy(torch.zeros(n, k))  # for the format and scheme config.json lists
            layers[name] = (record.format, record.scheme(), c.tensor_specs(n, k))
    if (name := planned_embedding(model, grid, ignore)) is not None:
        n, k = model.get_submodule(name).weight.shape
        c = min(grid.embedding_candidates(k), key=lambda c: c.nbytes(n, k, sizer.dtype))
        if c.kind != "dense":
            record = c.proxy(torch.zeros(n, k))
            layers[name] = (record.format, record.scheme(), c.tensor_specs(n, k))
    return sizer.total(layers)


@dataclass
class PerLayerSolver:
    """A recipe solver giving each layer its planned setting, so the PTQ pipeline (one process
    or distributed) solves a plan like any uniform recipe."""

    choices: dict[str, Candidate]  # layer name → planned setting (layers left dense excluded)
    damp: float = 0.01  # Hessian dampening of GPTQ, SparseGPT and the low-rank fit

    name = "budget-plan"
    needs_calibration = True

    def make_stats(self, in_features: int) -> HessianStats:
        return HessianStats.empty(in_features)

    def compress(self, weight: torch.Tensor, stats: HessianStats, name: str = "layer"):
        return self.choices[name].solver(self.damp).compress(weight, stats, name)


@dataclass
class BudgetPlan:
    """One candidate per planned layer, with the exact size of the artifact it will give."""

    names: list[str]  # planned layers, in pipeline order
    chosen: list[Option]  # the chosen option of each
    artifact_bytes: int  # what save_compressed(model, records, path, tokenizer) will write
    weights: int  # weights in the planned layers
    embedding: str | None = None  # the tied embedding's entry in names, when it is planned

    @property
    def layer_bytes(self) -> int:
        """Stored bytes of the planned layers (a dense layer counts its own weight)."""
        return sum(o.bytes for o in self.chosen)

    @property
    def avg_bits(self) -> float:
        return 8 * self.layer_bytes / max(self.weights, 1)

    @property
    def total_error(self) -> float:
        return math.fsum(o.error for o in self.chosen)

    @property
    def ignore(self) -> list[str]:
        """Planned layers that stay dense: pass them to the pipeline's ``ignore``."""
        return [
            n for n, o in zip(self.names, self.chosen) if o.format is None and n != self.embedding
        ]

    def solver(self, damp: float = 0.01) -> PerLayerSolver:
        choices = {
            n: o.candidate
            for n, o in zip(self.names, self.chosen)
            if o.format and n != self.embedding
        }
        return PerLayerSolver(choices, damp)

    def recipe(self, damp: float = 0.01) -> Recipe:
        """The pipeline's recipe for this plan: the per-layer solver, then the embedding entry
        when the embedding is planned onto a grid."""
        entry = None
        if self.embedding is not None:
            c = self.chosen[self.names.index(self.embedding)].candidate
            if c.bits:
                entry = EmbeddingQuant(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)
        return Recipe([], self.solver(damp), entry)

    def describe(self, top: int | None = None) -> str:
        """``120× W4 g64, 60× W3 g32 asym, ...``: how many layers got each setting (the ``top``
        most common, if given, then how many layers got the others)."""
        counts = Counter(o.candidate.label for o in self.chosen).most_common()
        text = ", ".join(f"{n}× {label}" for label, n in counts[:top])
        if top is not None and len(counts) > top:
            rest = counts[top:]
            text += f", {sum(n for _, n in rest)}× in {len(rest)} other settings"
        return text

    def rows(self) -> list[dict]:
        return [
            {
                "layer": n,
                "choice": o.candidate.label,
                "bytes": o.bytes,
                "bits": 8 * o.bytes / o.weights,
                "error": o.error,
            }
            for n, o in zip(self.names, self.chosen)
        ]

    def table(self) -> str:
        """The plan as text: one line per layer, then the totals."""
        width = max(len(n) for n in self.names)
        lines = [f"{'layer':<{width}}  {'choice':<16} {'bytes':>11} {'pred. error':>12}"]
        for r in self.rows():
            lines.append(
                f"{r['layer']:<{width}}  {r['choice']:<16} {r['bytes']:>11,} {r['error']:>12.4g}"
            )
        lines.append(
            f"{'total':<{width}}  {f'{self.avg_bits:.3f} bits/w':<16} {self.layer_bytes:>11,} "
            f"{self.total_error:>12.4g}   artifact {self.artifact_bytes:,} bytes"
        )
        return "\n".join(lines)


def _stored_as(option: Option, dtype: torch.dtype) -> Option:
    """A layer left dense is stored like the model's other uncompressed tensors, in ``dtype``."""
    if option.format:
        return option
    specs = {
        s: (dtype if d.is_floating_point else d, shape) for s, (d, shape) in option.specs.items()
    }
    return replace(option, specs=specs, bytes=spec_bytes(specs))


class Planner:
    """Plans for any budget from one table of measured options (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, options: dict[str, list[Option]], tokenizer=None, dtype="auto"
    ):
        self.names = list(options)
        tied = tied_embedding(model)
        self.embedding = tied if tied in options else None
        self.sizer = ArtifactSizer(model, tokenizer, dtype)  # dtype: save_compressed's
        self.options = [[_stored_as(o, self.sizer.dtype) for o in options[n]] for n in self.names]
        self.weights = sum(opts[0].weights for opts in self.options)
        digits = len(str(self.sizer.total({})))  # offsets in the header have about this many
        self.cost = [
            [o.bytes + sum(entry_bytes(f"{n}.{s}", *spec, digits) for s, spec in o.specs.items())
             for o in opts]
            for n, opts in zip(self.names, self.options)
        ]  # fmt: skip
        self.errors = [[o.error for o in opts] for opts in self.options]

    def plan(self, choice: list[int]) -> BudgetPlan:
        chosen = [opts[k] for opts, k in zip(self.options, choice)]
        layers: dict[str, LayerRecord] = {
            n: (o.format, o.scheme, o.specs) for n, o in zip(self.names, chosen) if o.format
        }
        total = self.sizer.total(layers)
        return BudgetPlan(self.names, chosen, total, self.weights, self.embedding)

    def uniform(self, candidate: Candidate) -> BudgetPlan | None:
        """Every planned layer at ``candidate`` and the embedding as stored (a uniform recipe,
        predicted from the same table); None if some layer is not offered it."""
        choice = []
        for name, opts in zip(self.names, self.options):
            want = Candidate() if name == self.embedding else candidate
            k = next((i for i, o in enumerate(opts) if o.candidate == want), None)
            if k is None:
                return None
            choice.append(k)
        return self.plan(choice)

    def smallest(self) -> BudgetPlan:
        return self.plan([min(range(len(c)), key=c.__getitem__) for c in self.cost])

    def largest(self) -> BudgetPlan:
        return self.plan([max(range(len(c)), key=c.__getitem__) for c in self.cost])

    def for_bytes(self, max_bytes: int) -> BudgetPlan:
        """The least-error plan whose whole artifact is at most ``max_bytes``."""
        floor = self.smallest()
        if floor.artifact_bytes > max_bytes:
            raise UnsupportedError(
                f"budget {max_bytes:,} bytes is below the smallest artifact this model and "
                f"candidate grid allow ({floor.artifact_bytes:,} bytes, every layer at its "
                "cheapest candidate); raise the budget or offer cheaper candidates"
            )
        floor_cost = sum(min(c) for c in self.cost)
        reserve = floor.artifact_bytes - floor_cost
        while max_bytes - reserve >= floor_cost:
            best = min_error_within_bytes(self.cost, self.errors, max_bytes - reserve)
            plan = self.plan(best.choice)
            if plan.artifact_bytes <= max_bytes:
                return plan
            reserve += plan.artifact_bytes - max_bytes
        return floor

    def for_avg_bits(self, avg_bits: float) -> BudgetPlan:
        """The least-error plan storing at most ``avg_bits`` per planned weight."""
        sizes = [[o.bytes for o in opts] for opts in self.options]
        max_bytes = math.floor(avg_bits * self.weights / 8)
        return self.plan(min_error_within_bytes(sizes, self.errors, max_bytes).choice)

    def for_error(self, max_error: float) -> BudgetPlan:
        """The smallest plan whose predicted total error is at most ``max_error``."""
        return self.plan(min_bytes_within_error(self.cost, self.errors, max_error).choice)

    def search_ppl(
        self,
        ppl_of: Callable[[BudgetPlan], float],
        base_ppl: float,
        max_increase_pct: float,
        steps: int = 6,
        first: float | None = None,
    ) -> tuple[BudgetPlan, list[dict]]:
        """The smallest plan found whose perplexity (``ppl_of``, measured by the caller on
        held-out data) is within ``max_increase_pct`` of ``base_ppl``, and the search history.

        Bisection on a log scale of the error budget, between the smallest plan's error and
        ``1e-6`` of it (or the least error the candidates allow, if larger). ``first``: an error
        budget to try first instead of the midpoint; loss-weighted errors estimate the rise of
        the mean loss, so ``ln(1 + max_increase_pct / 100)`` is a good guess for them.
        """
        target = base_ppl * (1 + max_increase_pct / 100)
        bad = self.smallest().total_error  # more error than this buys no fewer bytes
        ok = max(sum(min(e) for e in self.errors), bad * 1e-6)
        best, history, measured = None, [], {}
        for step in range(steps):
            budget = math.sqrt(ok * bad) if ok > 0 else bad / 1e3
            if step == 0 and first is not None and ok < first < bad:
                budget = first
            plan = self.for_error(budget)
            key = tuple(o.candidate for o in plan.chosen)
            if key not in measured:  # nearby budgets often give the very same plan
                measured[key] = ppl_of(plan)
            ppl = measured[key]
            history.append({"max_error": budget, "artifact_bytes": plan.artifact_bytes, "ppl": ppl})
            if ppl <= target:
                ok = budget
                if best is None or plan.artifact_bytes < best.artifact_bytes:
                    best = plan
            else:
                bad = budget
        if best is None:
            raise UnsupportedError(
                f"no plan tried in {steps} evaluations kept perplexity within "
                f"{max_increase_pct}% of {base_ppl:.4g} (best {min(h['ppl'] for h in history):.4g}); "
                "allow a larger increase or more search_steps"
            )
        return best, history
