"""Low-rank optimizers side by side: AdamW, GaLore, GradNormLoRP (fp32 and 8-bit states), and
GaLore's projected-gradient all-reduce against dense DDP.

    python bench/optim.py [--quick] [--rows galore,galore+comm]   # --rows keeps the other rows
    python bench/optim.py --report [--quick]   # re-render optim.txt from optim.json

Every row trains the same from-scratch Llama (the quickstart's: hidden 256, 4 layers, byte
tokens) on the same Shakespeare batches and steps (warm-up then cosine) on 2 Ray Train workers;
only ``train.optimizer`` (and, for the ``+comm`` rows, ``train.grad_compression.method: galore``)
differs. Each optimizer gets its own learning rate: seed 0 runs at every rate of ``lrs`` (a
factor ~3 apart around the quickstart's 3e-3), the rate with the lowest validation loss is kept,
and the other seeds run at it. A best rate at the sweep's edge is not shown to be best, so the
sweep goes on past that edge by the same factor (up to ``extend`` more rates) until a tried rate
on each side is worse; a row reports the mean over seeds at its rate (``±``: half the
range), so no optimizer is judged at a rate tuned for another. Settings chosen once for all
low-rank rows:

* rank 64 = hidden / 4, the GaLore paper's rank-to-width ratio for its pre-training runs;
* a subspace refresh every 50 steps: 6 in a 300-step run (the paper's 200 is for runs of 10k+
  steps, and subspaces move fastest early in training);
* scale 1.0: the paper's scale 0.25 comes paired with a learning rate several times its AdamW
  baseline's; the rate sweep finds each row's rate, so scale 1 keeps one knob, not two.
  Projections on the smaller side; moments re-projected at a refresh (the defaults); embeddings
  and norms stay on AdamW in every row.

Columns (``bench/results/optim.json`` holds one object per row with exactly these fields,
``optim.txt`` the printed table; ``--quick`` writes ``optim_quick.*`` instead):

* ``state_bytes``: bytes of the optimizer's state tensors on a worker after the last step
  (moments, 8-bit codes and scales, projectors, step counters); ``state_ratio`` is that over
  AdamW's.
* ``peak_rss_mb``: peak resident memory of rank 0's worker process (most of it is the Python,
  torch and Ray runtime, the same in every row).
* ``lr``: the rate kept; ``lr_sweep``: seed 0's final val loss at every rate tried (empty for the
  ``+comm`` rows, which run at their optimizer's rate: only the exchange differs).
* ``final_val_loss``: mean next-byte NLL on fixed held-out windows after the last step, mean
  over seeds (``val_loss_spread``: half their range; ``val_loss_seeds``: each);
  ``loss_gap_pct`` is ``100 * (loss - AdamW's) / AdamW's``.
* ``ms_per_step``: median wall time of a training step (forward, backward with the gradient
  exchange, optimizer step); the median keeps out load spikes from other processes.
* ``comm_bytes_per_step``: bytes one worker hands to collectives per step, mean over all steps
  (subspace refreshes included). Plain DDP all-reduces every fp32 gradient every step; the
  ``+comm`` rows send GaLore's projected gradients between refreshes (the comm hook's count).

galore-torch's ``GaLoreAdamW`` joins as a peer row (same rank, scale and refresh gap) when it is
importable (``pip install 'presso[peers]'``); otherwise that row is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from functools import partial

from harness import (
    RESULTS,
    Bench,
    Log,
    TrainRun,
    format_table,
    load_average,
    mean,
    median,
    noise_floor,
    spread,
)

WORKERS = 2
FULL = dict(steps=300, eval_every=100, eval_batches=16, rank=64, gap=50, seeds=2)
FULL.update(lrs=(1e-3, 3e-3, 1e-2), extend=2)
QUICK = dict(steps=20, eval_every=20, eval_batches=2, rank=16, gap=8, seeds=1)
QUICK.update(lrs=(3e-3, 1e-2), extend=0)
QUICK_MODEL = [  # a tiny Llama: the quick run checks the pipeline, not the numbers
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
    "train.batch_size=4",
    "train.seq_len=64",
]
SCALE = 1.0
OPT, GC = "train.optimizer", "train.grad_compression"
PEER = "galore_torch"


def rows() -> list[tuple[str, list[str]]]:
    """``(label, overrides)`` of every row, AdamW first (the reference)."""
    names = ["adamw", "galore", "galore8bit", "gradnormlorp", "gradnormlorp8bit"]
    result = [(name, [f"{OPT}.name={name}"]) for name in names]
    result.append(("galore+comm", [f"{OPT}.name=galore", f"{GC}.method=galore"]))
    if peer_status() is None:
        result.append((f"{PEER} (peer)", [f"{OPT}.name={PEER}"]))
    return result


def peer_status() -> str | None:
    """Why the galore-torch row cannot run here, or None when it can."""
    from presso.compressors.optim.config import OPTIMIZERS

    if importlib.util.find_spec(PEER) is None:
        return "galore-torch is not installed (pip install 'presso[peers]')"
    if PEER not in OPTIMIZERS:
        return f"the train stage has no train.optimizer.name {PEER} to plug it in"
    return None


def base_overrides(s: dict, quick: bool) -> list[str]:
    return [
        f"train.workers={WORKERS}",
        f"train.steps={s['steps']}",
        f"train.eval_every={s['eval_every']}",
        f"train.eval_batches={s['eval_batches']}",
        f"train.checkpoint_every={s['steps']}",
        f"{OPT}.rank={s['rank']}",
        f"{OPT}.update_proj_gap={s['gap']}",
        f"{OPT}.scale={SCALE}",
        *(QUICK_MODEL if quick else []),
    ]


def measure(runs: list[TrainRun], label: str, lr: float, sweep: dict, reference) -> dict:
    """One JSON row from a row's runs at its rate, one per seed (see the module docstring)."""
    first = runs[0]
    state = first.final("train/optimizer_state_bytes")
    losses = [run.final("val/loss") for run in runs]
    loss = mean(losses)
    sent = [b for run in runs for _, b in run.series("comm/bytes_sent")]
    ref_state = reference["state_bytes"] if reference else state
    ref_loss = reference["final_val_loss"] if reference else loss
    return {
        "optimizer": label,
        "lr": lr,
        "lr_sweep": {f"{k:g}": round(v, 4) for k, v in sweep.items()},
        "state_bytes": int(state),
        "state_ratio": round(state / ref_state, 4),
        "peak_rss_mb": round(max(run.final("train/peak_rss_mb") for run in runs), 1),
        "final_val_loss": round(loss, 4),
        "val_loss_spread": spread(losses),
        "val_loss_seeds": [round(x, 4) for x in losses],
        "loss_gap_pct": round(100 * (loss - ref_loss) / ref_loss, 2),
        "ms_per_step": round(1000 * median([t for run in runs for t in run.step_seconds()]), 1),
        "comm_bytes_per_step": round(mean(sent)) if sent else first.dense_bytes,
    }


def projected_fraction(model, rank: int) -> float:
    """The fraction of dense bytes GaLore's hook should send between refreshes: ``r x max(m, n)``
    for each low-rank ``m x n`` weight (the smaller side projected to ``r``), every other
    parameter whole."""
    from presso.compressors.optim import OptimizerConfig, low_rank_parameters

    cfg = OptimizerConfig()
    low = {id(p) for p in low_rank_parameters(model, cfg.modules, cfg.exclude).values()}
    sent = total = 0
    for p in model.parameters():
        total += p.numel()
        sent += min(rank, min(p.shape)) * max(p.shape) if id(p) in low else p.numel()
    return sent / total


def between_refreshes(run: TrainRun, expected: float) -> str:
    """The comm hook's bytes on steps that refreshed no subspace, against dense DDP."""
    quiet = {s for s, n in run.series("comm/refreshed_layers") if n == 0}
    sent = mean([b for s, b in run.series("comm/bytes_sent") if s in quiet])
    refreshes = len(run.series("comm/refreshed_layers")) - len(quiet)
    return (
        f"{sent:,.0f} B/step between refreshes = {sent / run.dense_bytes:.4f} x dense "
        f"(r x max(m, n) per low-rank weight, the rest whole: {expected:.4f}); "
        f"{refreshes} refresh steps sent more"
    )


COLUMNS = [  # (field, header, width, format)
    ("optimizer", "optimizer", 19, "{}"),
    ("state_bytes", "state bytes", 12, "{:,}"),
    ("state_ratio", "ratio", 6, "{:.3f}"),
    ("lr", "lr", 7, "{:g}"),
    ("peak_rss_mb", "peak RSS MB", 11, "{:.0f}"),
    ("final_val_loss", "val loss", 9, "{:.4f}"),
    ("val_loss_spread", "±", 7, "{:.4f}"),
    ("loss_gap_pct", "gap", 8, "{:+.2f}%"),
    ("ms_per_step", "ms/step", 8, "{:.0f}"),
    ("comm_bytes_per_step", "comm B/step", 12, "{:,}"),
]


def verdict(results: list[dict]) -> list[str]:
    """The noise floor (AdamW's seed spread), each low-rank row's state and gap against AdamW at
    its own rate, and GaLore against galore-torch at equal settings."""
    adamw = results[0]
    lines = [noise_floor("adamw", adamw["final_val_loss"], adamw["val_loss_spread"])]
    for r in results[1:]:
        lines.append(
            f"{r['optimizer']}: {r['state_ratio']:.3f}x AdamW's state at {r['loss_gap_pct']:+.2f}% "
            f"val loss (lr {r['lr']:g} vs AdamW's {adamw['lr']:g})"
        )
    ours = next((r for r in results if r["optimizer"] == "galore"), None)
    peer = next((r for r in results if r["optimizer"].startswith(PEER)), None)
    if ours and peer:
        diff = 100 * (ours["final_val_loss"] - peer["final_val_loss"]) / peer["final_val_loss"]
        lines.append(
            f"galore vs {PEER}: {diff:+.2f}% val loss, each at its own rate (lr {ours['lr']:g} vs "
            f"{peer['lr']:g}; target: within 1%)"
        )
        both = [lr for lr in ours["lr_sweep"] if lr in peer["lr_sweep"]]
        equal = ", ".join(
            f"lr {lr}: {ours['lr_sweep'][lr]:.4f} vs {peer['lr_sweep'][lr]:.4f} "
            f"({100 * (ours['lr_sweep'][lr] / peer['lr_sweep'][lr] - 1):+.2f}%)"
            for lr in both
        )
        lines.append(f"galore vs {PEER} at equal rates, seed 0: {equal}")
    return lines


def render(results: list[dict], s: dict, quick: bool, log: Log) -> None:
    """The table, what its columns mean and the verdict."""
    log()
    log(
        f"low-rank optimizers, {WORKERS} workers, {s['steps']} steps, rank {s['rank']}, "
        f"refresh every {s['gap']} steps, scale {SCALE}; each row at its best rate of "
        f"{', '.join(f'{x:g}' for x in s['lrs'])} (seed 0's val loss; past an edge by up to "
        f"{s['extend']} more), then {s['seeds']} seed(s)"
        f"{' (quick: tiny model)' if quick else ''}"
    )
    log(format_table(results, COLUMNS))
    log(
        "state: optimizer state tensors per worker; val loss: mean over seeds at the row's rate "
        "(±: half their range); comm B/step: per worker, mean over all steps (dense DDP for rows "
        "without the comm hook); ms/step: median."
    )
    for line in verdict(results):
        log(line)


def beyond_edge(at: dict) -> float | None:
    """The next rate to try when the best of ``at`` (rate: run) is the lowest or highest tried:
    one step further by the factor between the two rates at that edge; else None."""
    rates = sorted(at)
    best = min(rates, key=lambda lr: at[lr].final("val/loss"))
    if best not in (rates[0], rates[-1]) or len(rates) < 2:
        return None
    near, next_in = (rates[0], rates[1]) if best == rates[0] else (rates[-1], rates[-2])
    return float(f"{near * near / next_in:.2g}")


def train_row(bench, label, overrides, position, log, loads: list, lr, seed: int) -> TrainRun:
    """One training run of a row at rate ``lr`` and ``seed``; its line is logged after
    ``position`` (``[2/7]``) and its load average kept in ``loads``."""
    tag = f"{label.split(' ')[0].replace('+', '_')}_lr{lr:g}_s{seed}"
    run = bench.run(tag, [*overrides, f"{OPT}.lr={lr}", f"run.seed={seed}"])
    loads.append(run.load)
    log(
        f"{position} {label} lr {lr:g} seed {seed}: {run.wall_s:.0f} s, "
        f"val {run.final('val/loss'):.4f}, load {run.load[0]:.1f}->{run.load[1]:.1f}"
    )
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 steps")
    parser.add_argument(
        "--rows", help="comma-separated optimizers to run, with adamw (default: all)"
    )
    parser.add_argument(
        "--report", action="store_true", help="re-render the table and verdict from the JSON"
    )
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    out = RESULTS / f"optim{'_quick' if args.quick else ''}.json"
    if args.report:
        if not out.exists():
            parser.error(f"--report: no {out}; run the benchmark first")
        txt = out.with_suffix(".txt")
        ran = txt.read_text().splitlines() if txt.exists() else []  # the run's own lines stay
        log = Log()
        for line in (x for x in ran if x.startswith("[")):
            log(line)
        render(json.loads(out.read_text()), s, args.quick, log)
        for line in (x for x in ran if x.startswith(("load average", "note: "))):
            log(line)
        log.save(txt)
        return
    tick = time.perf_counter()
    results, loads, notes, log = [], [], [], Log()
    plan = rows()
    if args.rows:
        wanted = {x.strip() for x in args.rows.split(",")}
        if unknown := wanted - {label for label, _ in plan}:
            parser.error(f"unknown rows {sorted(unknown)}; choose from {[x for x, _ in plan]}")
        # AdamW is every gap's reference; a +comm row compares with its optimizer's row
        wanted |= {"adamw"} | {x.removesuffix("+comm") for x in wanted}
        plan = [(label, o) for label, o in plan if label in wanted]
    with Bench("jobs/quickstart.yaml", base_overrides(s, args.quick), cpus=WORKERS) as bench:
        for i, (label, overrides) in enumerate(plan, 1):
            train = partial(train_row, bench, label, overrides, f"[{i}/{len(plan)}]", log, loads)

            plain = label.removesuffix("+comm")
            if plain != label:  # the same optimizer, its gradients sent projected: its rate
                lr = next(r["lr"] for r in results if r["optimizer"] == plain)
                sweep, runs = {}, [train(lr, 0)]
            else:
                at = {lr: train(lr, 0) for lr in s["lrs"]}
                for _ in range(s["extend"]):
                    if (lr := beyond_edge(at)) is None:
                        break
                    at[lr] = train(lr, 0)
                sweep = {lr: at[lr].final("val/loss") for lr in sorted(at)}
                lr = min(sweep, key=sweep.get)
                runs = [at[lr]]
            runs += [train(lr, seed) for seed in range(1, s["seeds"])]
            results.append(measure(runs, label, lr, sweep, results[0] if results else None))
            if plain != label:
                plain_row = next(r for r in results if r["optimizer"] == plain)
                diff = results[-1]["final_val_loss"] - plain_row["final_val_loss"]
                expected = projected_fraction(bench.model(bench.config([])), s["rank"])
                notes.append(
                    f"{label}: {between_refreshes(runs[0], expected)}; val loss {diff:+.4f} vs DDP"
                )
    if (why := peer_status()) is not None:
        notes.append(f"{PEER} (peer) row skipped: {why}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.rows and out.exists():  # keep the other rows of the last run (this layout only)
        ran = {r["optimizer"] for r in results}
        kept = [r for r in json.loads(out.read_text()) if "lr" in r and r["optimizer"] not in ran]
        order = [label for label, _ in rows()]
        results = sorted(results + kept, key=lambda r: order.index(r["optimizer"]))
    out.write_text(json.dumps(results, indent=1) + "\n")
    seen = [x for pair in loads for x in pair]
    render(results, s, args.quick, log)
    log(
        f"load average during the rows: {min(seen):.1f}-{max(seen):.1f} (now "
        f"{load_average():.1f}); total {time.perf_counter() - tick:.0f} s; wrote {out}"
    )
    for note in notes:
        log(f"note: {note}")
    log.save(out.with_suffix(".txt"))


if __name__ == "__main__":
    sys.exit(main())
