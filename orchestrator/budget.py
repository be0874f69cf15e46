"""The compress stage under ``compress.budget``: measure on the workers, plan, solve.

1. **Measure** (:func:`measure_candidates`): one forward and backward pass of the dense model
   weighs each layer's outputs by the loss
   (:func:`~presso.compressors.plan.planner.output_sensitivity`, unless
   ``compress.candidates.error: output``), data-parallel over the workers (one task per shard
   of the calibration batches, summed in shard order); then the distributed PTQ pipeline runs with
   :class:`~presso.compressors.plan.planner.CandidateMeasurer` as its solver. That is one calibration pass
   over the dense model (statistics data-parallel over shards, as for any recipe), with every
   layer's candidates measured on the workers, layer-parallel like solves.
2. **Plan** on the driver with the shared knapsack (:class:`~presso.compressors.plan.planner.Planner`):
   ``bytes`` and ``avg_bits`` directly; ``max_ppl_increase_pct`` by bisection over the error
   budget, each step's plan solved on the workers and measured on held-out windows of the
   validation split (never the test split the stage reports).
3. **Solve** the plan: the pipeline again, each layer with its own solver
   (:class:`~presso.compressors.plan.planner.PerLayerSolver`); layers planned dense are left out.

The plan is printed as a table and logged to the stage's MLflow run (``budget_plan.txt``,
``budget_plan.json`` and a heat map of stored bits per weight by block and layer).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from presso import ConfigError, IntegrityError, UnsupportedError
from presso.compressors.plan.candidates import CandidateGrid, Option
from presso.compressors.plan.planner import (
    BudgetPlan,
    CandidateMeasurer,
    Planner,
    layer_weights,
    min_artifact_bytes,
    output_sensitivity,
    parse_bytes,
    planned_embedding,
    planned_layers,
    sensitivity_of,
    sensitivity_sums,
    with_embedding,
)
from presso.compressors.ptq.recipe import Recipe
from presso.orchestrator.compress import CompressResult, run_compression, spread_over
from presso.orchestrator.models import storage_dtype
from presso.orchestrator.pool import Task, WorkerPool


def measuring_recipe(grid: CandidateGrid, sensitivity: dict | None = None) -> Recipe:
    """The recipe of the measuring pass (``sensitivity``: the loss weights, once computed)."""
    return Recipe([], CandidateMeasurer(grid, sensitivity))


def check_budget(cfg, model, tokenizer, dtype: str = "auto") -> None:
    """Refuse a budget no plan can meet, before any calibration or worker starts (``dtype``:
    the artifact's storage dtype, as ``save_compressed`` takes it)."""
    c = cfg.compress
    b = c.budget
    if b.bytes is not None:
        floor = min_artifact_bytes(model, c.candidates, c.ignore, tokenizer, dtype)
        if parse_bytes(b.bytes) < floor:
            raise ConfigError(
                f"compress.budget.bytes: {b.bytes} ({parse_bytes(b.bytes):,} bytes) is below the "
                f"smallest artifact this model can have with compress.candidates: {floor:,} "
                "bytes (every layer at its cheapest setting, the rest of the model as it is); "
                "raise the budget or offer cheaper candidates"
            )
    if b.avg_bits is not None:
        offered = [  # (weight, its candidates) of every planned layer and the embedding
            (lin.weight, c.candidates.candidates(lin.in_features))
            for lin in planned_layers(model, c.ignore).values()
        ]
        if (name := planned_embedding(model, c.candidates, c.ignore)) is not None:
            weight = model.get_submodule(name).weight
            offered.append((weight, c.candidates.embedding_candidates(weight.shape[1])))
        cheapest = sum(min(cand.nbytes(*w.shape) for cand in cands) for w, cands in offered)
        floor = 8 * cheapest / sum(w.numel() for w, _ in offered)
        if b.avg_bits < floor:
            raise ConfigError(
                f"compress.budget.avg_bits: {b.avg_bits} is below the fewest bits per weight "
                f"compress.candidates allow ({floor:.3f}); raise it or offer cheaper candidates"
            )


def _solve(cfg, plan, budget_plan: BudgetPlan, progress) -> CompressResult:
    c = cfg.compress
    return run_compression(
        plan.model,
        budget_plan.recipe(c.candidates.damp),
        c.workers,
        [*c.ignore, *budget_plan.ignore],
        progress,
        plan.calibration,
        c.calibration.shards,
        c.threads_per_worker,
    )


def loss_weights(
    model,
    calibration: list,
    ignore,
    workers: int,
    shards: int = 8,
    threads: int = 1,
    embedding: bool = False,
) -> dict:
    """:func:`~presso.compressors.plan.planner.output_sensitivity` with one task per shard of the
    calibration batches on ``workers`` actors (0: in this process), summed in shard order."""
    if not workers:
        return output_sensitivity(model, calibration, ignore, embedding)
    import ray

    count = min(shards, len(calibration))
    bounds = [len(calibration) * i // count for i in range(count + 1)]
    pool = WorkerPool(workers, threads)
    try:
        model_ref = ray.put(model)
        tasks = [
            Task(worker, sensitivity_sums,
                 (model_ref, calibration[bounds[i]:bounds[i + 1]], list(ignore), embedding))
            for i, worker in enumerate(spread_over(pool, count))
        ]  # fmt: skip
        return sensitivity_of(pool.run(tasks))
    finally:
        pool.close()


@dataclass
class Measurement:
    """What the measuring pass found, and what it cost."""

    options: dict[str, list[Option]]  # each planned layer's (and the embedding's) candidates
    sensitivity: dict | None  # the loss weights (None with ``error: output``)
    loss_weights_s: float  # wall seconds of the backward pass
    measuring_s: float  # wall seconds of the measuring pass


def measure_candidates(
    model,
    calibration: list,
    grid: CandidateGrid,
    ignore,
    workers: int,
    shards: int = 8,
    threads: int = 1,
    progress=None,
    layers=None,
) -> Measurement:
    """Every planned layer's measured candidates: the loss weights (if ``grid.error`` is
    ``loss``), then one calibration pass of the dense model with the measurements spread over
    the workers, layer-parallel like solves (``layers``: the checked plan, if the caller has it);
    the tied embedding's options, when it is planned, are measured on the driver last."""
    sensitivity = None
    embedding = planned_embedding(model, grid, ignore)
    tick = time.perf_counter()
    if grid.error == "loss":
        print("presso: weighing each layer's outputs by the loss (one backward pass)", flush=True)
        sensitivity = loss_weights(
            model, calibration, ignore, workers, shards, threads, embedding is not None
        )
        print(f"presso: loss weights in {time.perf_counter() - tick:.0f} s", flush=True)
    weighed = time.perf_counter()
    print("presso: measuring every layer's candidates (one calibration pass)", flush=True)
    measured = run_compression(
        model,
        measuring_recipe(grid, layer_weights(sensitivity)),
        workers,
        ignore,
        progress,
        calibration,
        shards,
        threads,
        layers,
    )
    options = {name: record.options for name, record in measured.records.items()}
    options = with_embedding(options, model, grid, sensitivity, embedding)
    done = time.perf_counter()
    print(
        f"presso: measured {len(options)} layers' candidates in {done - weighed:.0f} s", flush=True
    )
    return Measurement(options, sensitivity, weighed - tick, done - weighed)


def run_budget(cfg, plan, run, progress=None) -> tuple[CompressResult, BudgetPlan]:
    """Measure, plan and solve; returns the solved result and the plan it followed. ``run``
    (an MLflow stage run) gets the plan's table and heat map; None logs nowhere."""
    c = cfg.compress
    b = c.budget
    options = measure_candidates(
        plan.model,
        plan.calibration,
        c.candidates,
        c.ignore,
        c.workers,
        c.calibration.shards,
        c.threads_per_worker,
        progress,
        plan.layers,
    ).options
    dtype = storage_dtype(c.dtype, plan.source)
    planner = Planner(plan.model, options, plan.tokenizer, dtype)
    result, search = None, None
    try:
        if b.bytes is not None:
            chosen = planner.for_bytes(parse_bytes(b.bytes))
        elif b.avg_bits is not None:
            chosen = planner.for_avg_bits(b.avg_bits)
        else:
            chosen, result, search = _search(cfg, plan, planner, progress)
    except UnsupportedError as e:
        raise ConfigError(f"compress.budget: {e}") from None
    print(chosen.table(), flush=True)
    if run is not None:
        log_plan(run, chosen, search, planner)
    if result is None:
        result = _solve(cfg, plan, chosen, progress)
    return result, chosen


def _search(cfg, plan, planner: Planner, progress):
    """``max_ppl_increase_pct``: the bisection of :meth:`Planner.search_ppl`, each step solved
    on the workers and measured on the validation split's first ``search_tokens`` tokens."""
    from presso.orchestrator.evaluate import perplexity

    b, e = cfg.compress.budget, cfg.eval
    tokens = plan.corpus.val

    def ppl(model) -> float:
        return perplexity(
            model, tokens, e.seq_len, b.search_tokens, e.batch_size, bos=plan.corpus.bos
        ).perplexity

    base = ppl(plan.model)
    latest: list = [None, None]  # the last plan solved and its result (the best is usually last)

    def ppl_of(candidate: BudgetPlan) -> float:
        result = _solve(cfg, plan, candidate, progress)
        value = ppl(result.model)
        print(
            f"presso: budget search: {candidate.artifact_bytes:,} bytes, held-out perplexity "
            f"{value:.4g} (dense {base:.4g})",
            flush=True,
        )
        latest[:] = [candidate, result]
        return value

    first = None
    if cfg.compress.candidates.error == "loss":  # errors estimate the rise of the mean loss
        first = math.log1p(b.max_ppl_increase_pct / 100)
    chosen, history = planner.search_ppl(
        ppl_of, base, b.max_ppl_increase_pct, b.search_steps, first
    )
    target = base * (1 + b.max_ppl_increase_pct / 100)
    search = {"base_ppl": base, "target_ppl": target, "steps": history}
    return chosen, latest[1] if latest[0] is chosen else None, search


def check_artifact(chosen: BudgetPlan, artifact_bytes: int, budget) -> None:
    """The artifact must be the planned size and within a byte budget."""
    limit = parse_bytes(budget.bytes) if budget.bytes is not None else None
    if artifact_bytes != chosen.artifact_bytes or (limit is not None and artifact_bytes > limit):
        raise IntegrityError(
            f"compress.budget: the artifact has {artifact_bytes:,} bytes but the plan predicted "
            f"{chosen.artifact_bytes:,} (budget {budget.bytes}); the artifact format changed "
            "under the planner's size model (presso.compressors.formats.artifact_size) — report this"
        )


def choice_grid(chosen: BudgetPlan) -> tuple[list[str], list[str], list[list[float]]]:
    """Stored bits per weight of each planned layer as ``(blocks, layer kinds, values)``:
    rows are decoder blocks, columns the layers inside a block (q_proj, ..., down_proj)."""
    cells = {}
    for name, option in zip(chosen.names, chosen.chosen):
        if name == chosen.embedding:  # not a block's layer; the plan's table lists it
            continue
        _, _, rest = name.partition(".layers.")
        block, _, kind = rest.partition(".")
        kind = kind.rpartition(".")[2]  # q_proj, ..., down_proj: short column labels
        cells[block, kind] = 8 * option.bytes / option.weights
    blocks = list(dict.fromkeys(b for b, _ in cells))
    kinds = list(dict.fromkeys(k for _, k in cells))
    return blocks, kinds, [[cells.get((b, k), float("nan")) for k in kinds] for b in blocks]


def frontier(planner: Planner, chosen: BudgetPlan, points: int = 16) -> dict[str, list]:
    """``(artifact MB, predicted loss rise)`` of plans for ``points`` sizes from the smallest
    artifact to the largest, of every uniform setting the grid offers all layers, and of
    ``chosen``: the picture of what each byte buys, from the measured table alone."""
    low, high = planner.smallest().artifact_bytes, planner.largest().artifact_bytes
    sizes = {round(low * (high / low) ** (i / (points - 1))) for i in range(points)}
    sweep = [planner.for_bytes(b) for b in sorted(sizes)]
    offered = {o.candidate for opts in planner.options for o in opts if o.format}
    uniform = [p for c in sorted(offered, key=str) if (p := planner.uniform(c)) is not None]

    def pts(plans):
        return [(p.artifact_bytes / 1e6, p.total_error) for p in plans if p.total_error > 0]

    return {
        "budget plans": pts(sweep),
        "uniform settings": pts(uniform),
        "this plan": pts([chosen]),
    }


def log_plan(run, chosen: BudgetPlan, search: dict | None, planner: Planner | None = None) -> None:
    """The plan's table and rows (and the perplexity search's steps), the heat map, the
    predicted size/error frontier (with ``planner``), totals."""
    from presso.orchestrator.plots import plot_layer_choices, plot_series

    run.text(chosen.table(), "budget_plan.txt")
    run.text(json.dumps({"rows": chosen.rows(), "search": search}, indent=1), "budget_plan.json")
    blocks, kinds, values = choice_grid(chosen)
    plot_layer_choices(
        run,
        [f"block {b}" for b in blocks],
        kinds,
        values,
        label="stored bits per weight",
        filename="budget_plan.png",
        xlabel="layer",
    )
    if planner is not None:
        plot_series(
            run,
            frontier(planner, chosen),
            "predicted loss rise vs artifact size (measured candidates)",
            "budget_frontier.png",
            xlabel="artifact MB (whole folder)",
            ylabel="predicted rise of the mean loss (nats)",
            log_y=True,
            markers=True,
            points_only={"uniform settings": "x", "this plan": "*"},
        )
    run.metrics(
        {
            "compress/planned_artifact_bytes": chosen.artifact_bytes,
            "compress/planned_avg_bits": chosen.avg_bits,
            "compress/planned_error": chosen.total_error,
        },
        0,
    )
