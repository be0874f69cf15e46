"""Gradient compression frontiers: dense DDP, uniform settings of each family, torch's PowerSGD
and L-GreCo, over several seeds.

    python bench/gradcomp.py [--quick] [--rows "uniform powersgd 8,lgreco powersgd 8"] [--seeds N]

Every row trains the same from-scratch Llama (the quickstart's: hidden 256, 4 layers, byte
tokens) on the same Shakespeare batches, learning-rate schedule and number of steps, on 2 Ray
Train workers (DDP over gloo, one thread each), once per seed (``run.seed``: model init, data
order, stochastic rounding). Only ``train.grad_compression`` differs between rows:

* per family, uniform rows at three settings (PowerSGD ranks 4/8/16, top-k densities
  0.01/0.02/0.05, 2/4/8 bits) draw the bytes-vs-loss frontier L-GreCo must beat; torch's own
  PowerSGD hook at rank 8 is the peer;
* L-GreCo (``alpha = 1``: no more total error than its uniform reference) at two references per
  family, drawing from the default candidates (ranks 1-32, densities 0.001-0.1, bits 2/3/4/8),
  re-planning every ``adjust`` steps from the errors of the compressors as they run;
* compression starts after ``warmup`` dense steps (the learning-rate warm-up's length) in every
  compressed row, torch's PowerSGD included (its ``start_powerSGD_iter``).

``--rows`` runs the named rows (labels as printed) and keeps the others from the last run's
JSON; results are written after every row. ``--report`` re-renders the tables, verdict and plot
from the JSON (the per-run lines and load of the ``.txt`` are kept). Each row's JSON object holds, over its seeds:

* ``bytes_per_step``: bytes one worker hands to collectives per step (the hooks' own count:
  payloads, the dense flat part, L-GreCo's error table and plan broadcast), averaged over the
  compressed phase (after the dense warm-up); ``compression_ratio`` is dense bytes over it.
* ``val_loss`` (mean), ``val_loss_spread`` (half the range) and ``val_loss_seeds``: next-byte
  NLL on fixed held-out windows after the last step; ``gap_pct`` against dense's mean. Dense's
  own spread is the noise floor printed; ``gap_seeds_pct`` (each seed against dense's run of the
  same seed: same init, same batches) and its half range ``gap_spread_pct`` are the noise on a
  gap itself, smaller, because a seed moves every row the same way.
* ``wire_bytes``: bytes one worker sends on the network per step at N = 2, 8, 64 workers by ring
  algorithms (``presso.compressors.gradient.accounting.wire_bytes``): an all-reduce moves
  ``2 (N - 1) / N`` times its payload through each link, an all-gather ``N - 1`` times the
  worker's part, so top-k and quantization (all-gathers) lose ground as N grows.
* ``step_s``: a modelled step time, ``compute + wire bytes / bandwidth`` at N = 2, 8, 64 and
  1 / 10 / 100 Gb/s, where ``compute`` is the median measured step over the compressed phase on
  this machine (forward, backward with the hook's encode/decode, optimizer; the gloo exchange
  runs over loopback and adds almost no wire time). A family whose encode/decode costs more than
  the wire time it saves shows a step slower than dense.

``bench/results/gradcomp_pareto.png`` draws each family's frontier (bytes/step, log axis, against
final val loss with the seed spread as error bars; dense as a band).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

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

from presso.compressors.gradient.accounting import wire_bytes

WORKERS = 2
FULL = dict(steps=200, warmup=20, adjust=30, measure=3, eval_every=100, eval_batches=16, seeds=3)
QUICK = dict(steps=20, warmup=4, adjust=4, measure=2, eval_every=20, eval_batches=2, seeds=1)
QUICK_MODEL = [  # a tiny Llama: the quick run checks the pipeline, not the numbers
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
    "train.batch_size=4",
    "train.seq_len=64",
]
GC = "train.grad_compression"
PARAMETER = {"powersgd": "rank", "topk": "density", "quant": "bits"}
UNIFORM = {"powersgd": (4, 8, 16), "topk": (0.01, 0.02, 0.05), "quant": (2, 4, 8)}
REFERENCES = {"powersgd": (8, 16), "topk": (0.02, 0.05), "quant": (2, 4)}
PEER_RANK = 8
NETWORK = [(n, gbps) for n in (2, 8, 64) for gbps in (1, 10, 100)]
LOSS_TOLERANCE_PCT = 1.0  # the "within 1 % of dense"


@dataclass(frozen=True)
class Row:
    method: str  # dense, uniform, lgreco or torch_powersgd
    family: str = "none"
    setting: float | None = None  # the family's parameter; L-GreCo's reference

    @property
    def label(self) -> str:
        return " ".join(
            str(x) for x in (self.method, self.family, self.setting) if x not in ("none", None)
        )

    def overrides(self) -> list[str]:
        if self.method == "dense":
            return []
        setting = [f"{GC}.{PARAMETER[self.family]}={self.setting}"]
        if self.method == "torch_powersgd":
            return [f"{GC}.method=torch_powersgd", *setting]
        return [f"{GC}.method={self.method}", f"{GC}.family={self.family}", *setting]


def all_rows() -> list[Row]:
    """Every row, dense first (the reference every gap is against)."""
    rows = [Row("dense")]
    for family, settings in UNIFORM.items():
        rows += [Row("uniform", family, s) for s in settings]
        if family == "powersgd":
            rows.append(Row("torch_powersgd", family, PEER_RANK))
        rows += [Row("lgreco", family, s) for s in REFERENCES[family]]
    return rows


def base_overrides(s: dict, quick: bool) -> list[str]:
    return [
        f"train.workers={WORKERS}",
        f"train.steps={s['steps']}",
        f"train.eval_every={s['eval_every']}",
        f"train.eval_batches={s['eval_batches']}",
        f"train.checkpoint_every={s['steps']}",
        f"train.warmup_steps={s['warmup']}",
        f"{GC}.warmup_steps={s['warmup']}",
        f"{GC}.adjust_every={s['adjust']}",
        f"{GC}.measure_steps={s['measure']}",
        *(QUICK_MODEL if quick else []),
    ]


def measure_seed(run: TrainRun, row: Row, warmup: int) -> dict:
    """One seed's bytes per collective (compressed phase), compute time and final val loss."""
    if row.method == "dense":
        reduced, gathered, broadcast = float(run.dense_bytes), 0.0, 0.0
        compute = median(run.step_seconds())
    else:
        compressed = {s for s, flag in run.series("comm/dense_phase") if flag == 0.0}
        sent, gathered, broadcast = (
            mean([b for s, b in run.series(f"comm/bytes_{kind}") if s in compressed])
            for kind in ("sent", "all_gather", "broadcast")
        )
        reduced = sent - gathered - broadcast
        compute = median(run.step_seconds(after=warmup))
        dense = {b for _, b in run.series("comm/dense_bytes")}
        assert dense == {run.dense_bytes}, f"{row.label}: hook's dense count {dense} != model"
    return dict(
        reduced=reduced,
        gathered=gathered,
        broadcast=broadcast,
        compute=compute,
        loss=run.final("val/loss"),
        wall=run.wall_s,
    )


def summarize(row: Row, seeds: list[dict], dense_bytes: int) -> dict:
    """A row's JSON object from its seeds (see the module docstring for the fields)."""
    avg = {k: mean([s[k] for s in seeds]) for k in ("reduced", "gathered", "broadcast", "compute")}
    sent = avg["reduced"] + avg["gathered"] + avg["broadcast"]
    losses = [s["loss"] for s in seeds]
    wire = {n: wire_bytes(avg["reduced"], avg["gathered"], avg["broadcast"], n) for n in (2, 8, 64)}
    return {
        "label": row.label,
        "method": row.method,
        "family": row.family,
        "setting": row.setting,
        "bytes_per_step": round(sent),
        "compression_ratio": round(dense_bytes / sent, 2),
        "val_loss": round(mean(losses), 4),
        "val_loss_spread": spread(losses),
        "val_loss_seeds": [round(x, 4) for x in losses],
        "seeds": len(seeds),
        "compute_s": round(avg["compute"], 4),
        "wire_bytes": {f"N={n}": round(b) for n, b in wire.items()},
        "step_s": {
            f"N={n} {g}Gb/s": round(avg["compute"] + wire[n] / (g * 1e9 / 8), 4) for n, g in NETWORK
        },
        "wall_s": round(mean([s["wall"] for s in seeds]), 1),
    }


def with_gaps(rows: list[dict]) -> list[dict]:
    """Rows with ``gap_pct`` against dense's mean val loss (NaN while dense is not measured) and
    the paired gaps: ``gap_seeds_pct``, each seed's gap against dense's run of the same seed
    (same init and batches), and ``gap_spread_pct``, half their range. Seeds move every row
    together, so the paired spread is the noise on a gap; dense's own spread overstates it."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    base = dense["val_loss"] if dense else float("nan")
    for r in rows:
        r["gap_pct"] = round(100 * (r["val_loss"] - base) / base, 2)
        seeds = zip(r["val_loss_seeds"], dense["val_loss_seeds"] if dense else [])
        r["gap_seeds_pct"] = [round(100 * (x - d) / d, 2) for x, d in seeds]
        r["gap_spread_pct"] = spread(r["gap_seeds_pct"]) if r["method"] != "dense" else None
    return rows


COLUMNS = [  # (field, header, width, format)
    ("label", "row", 26, "{}"),
    ("bytes_per_step", "bytes/step", 12, "{:,}"),
    ("compression_ratio", "ratio", 8, "{:.1f}x"),
    ("val_loss", "val loss", 9, "{:.4f}"),
    ("val_loss_spread", "±", 7, "{:.4f}"),
    ("gap_pct", "gap", 8, "{:+.2f}%"),
    ("gap_spread_pct", "paired ±", 8, "{:.2f}%"),
    ("compute_s", "compute s", 9, "{:.3f}"),
    ("wire_n8", "wire N=8", 12, "{:,}"),
    ("step_n8_1", "N=8 1Gb/s", 10, "{:.3f}"),
    ("step_n64_10", "N=64 10Gb/s", 11, "{:.3f}"),
]


def table(rows: list[dict]) -> str:
    flat = [
        {
            **r,
            "wire_n8": r["wire_bytes"]["N=8"],
            "step_n8_1": r["step_s"]["N=8 1Gb/s"],
            "step_n64_10": r["step_s"]["N=64 10Gb/s"],
        }
        for r in rows
    ]
    return format_table(flat, COLUMNS)


def step_table(rows: list[dict]) -> str:
    """Modelled step seconds of every row at every network size and speed."""
    keys = [f"N={n} {g}Gb/s" for n, g in NETWORK]
    lines = [f"{'row':>26} " + " ".join(f"{k:>14}" for k in keys)]
    for r in rows:
        lines.append(f"{r['label']:>26} " + " ".join(f"{r['step_s'][k]:>14.3f}" for k in keys))
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Per family: L-GreCo's fewest bytes within tolerance against the best uniform row within
    tolerance (target: >= 2x fewer), and its modelled step at N=8, 1 Gb/s against dense's."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:
        return ["no dense row: no verdict"]
    lines = [noise_floor("dense", dense["val_loss"], dense["val_loss_spread"])]
    paired = [r["gap_spread_pct"] for r in rows if r["gap_spread_pct"] is not None]
    if paired:
        lines.append(
            f"paired noise: a compressed row's per-seed gaps (against dense's run of the same "
            f"seed) lie within ± {median(paired):.2f}% of their mean (median over rows)"
        )
    for family in UNIFORM:
        ok = [r for r in rows if r["family"] == family and r["gap_pct"] <= LOSS_TOLERANCE_PCT]
        uniform = min(
            (r for r in ok if r["method"] != "lgreco"),
            key=lambda r: r["bytes_per_step"],
            default=None,
        )
        lgreco = min(
            (r for r in ok if r["method"] == "lgreco"),
            key=lambda r: r["bytes_per_step"],
            default=None,
        )
        fast = [
            r["label"]
            for r in rows
            if r["family"] == family
            and r["method"] == "lgreco"
            and r["step_s"]["N=8 1Gb/s"] >= dense["step_s"]["N=8 1Gb/s"]
        ]
        head = f"{family}: "
        if lgreco is None or uniform is None:
            lines.append(
                head + f"no {'L-GreCo' if lgreco is None else 'uniform'} row within "
                f"{LOSS_TOLERANCE_PCT}% of dense"
            )
        else:
            factor = uniform["bytes_per_step"] / lgreco["bytes_per_step"]
            lines.append(
                head + f"{lgreco['label']} {lgreco['bytes_per_step']:,} B/step "
                f"({lgreco['gap_pct']:+.2f}%) vs best uniform {uniform['label']} "
                f"{uniform['bytes_per_step']:,} ({uniform['gap_pct']:+.2f}%): {factor:.2f}x fewer "
                f"({'meets' if factor >= 2 else 'misses'} >= 2x)"
            )
        if fast:
            lines.append(f"{family}: not faster than dense at N=8, 1 Gb/s: {', '.join(fast)}")
    return lines


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["method"] == "dense"), None)
    fig, axes = plt.subplots(1, len(UNIFORM), figsize=(5 * len(UNIFORM), 4), sharey=True)
    styles = {"uniform": "o-", "lgreco": "s", "torch_powersgd": "^"}
    for ax, family in zip(axes, UNIFORM):
        for method, style in styles.items():
            pts = sorted(
                (r for r in rows if r["family"] == family and r["method"] == method),
                key=lambda r: r["bytes_per_step"],
            )
            if pts:
                ax.errorbar(
                    [r["bytes_per_step"] for r in pts],
                    [r["val_loss"] for r in pts],
                    yerr=[r["val_loss_spread"] or 0.0 for r in pts],
                    fmt=style,
                    capsize=3,
                    label=method,
                )
        if dense is not None:
            lo, hi = (dense["val_loss"] + k * (dense["val_loss_spread"] or 0.0) for k in (-1, 1))
            ax.axhline(dense["val_loss"], c="grey", lw=1)
            ax.axhspan(lo, hi, color="grey", alpha=0.3, label="dense ± spread")
            ax.axhline(dense["val_loss"] * (1 + LOSS_TOLERANCE_PCT / 100), ls=":", c="k")
        ax.set_xscale("log")
        ax.set_title(family)
        ax.set_xlabel("bytes/step per worker")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final val loss (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(done: list[dict], s: dict, log: Log, path) -> None:
    """The tables, the verdict and the Pareto plot of finished rows."""
    log()
    log(
        f"gradient compression, {s['workers']} workers, {s['steps']} steps, {s['seeds']} seed(s) "
        f"per row, dense warm-up {s['warmup']} steps, L-GreCo alpha 1 every {s['adjust']} steps"
        f"{' (quick: tiny model)' if s['steps'] == QUICK['steps'] else ''}"
    )
    log(table(done))
    log(
        f"bytes/step: per worker, handed to collectives, mean over steps {s['warmup'] + 1}-"
        f"{s['steps']} (the compressed phase) and seeds; ±: half the seeds' range; paired ±: "
        "half the range of the per-seed gaps against dense's same seed; wire N=8: bytes on one "
        "worker's link per step by ring algorithms; N=8 1Gb/s, N=64 10Gb/s: median measured "
        "step + that wire time. Every network size and speed:"
    )
    log(step_table(done))
    for line in verdict(done):
        log(line)
    plot(done, path.with_name(f"{path.stem}_pareto.png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 steps, one seed")
    parser.add_argument("--rows", help="comma-separated row labels; the others are kept")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: full 3, quick 1)")
    parser.add_argument(
        "--report", action="store_true", help="re-render the tables and plot from the JSON"
    )
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    seeds = args.seeds or s["seeds"]
    rows = all_rows()
    if args.rows:
        wanted = {x.strip() for x in args.rows.split(",")}
        unknown = wanted - {r.label for r in rows}
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; choose from {[r.label for r in rows]}")
        rows = [r for r in rows if r.label in wanted]
    name = f"gradcomp{'_quick' if args.quick else ''}"
    out = RESULTS / f"{name}.json"
    order = [r.label for r in all_rows()]
    earlier = json.loads(out.read_text()) if (args.rows or args.report) and out.exists() else {}
    kept = earlier.get("rows", []) if isinstance(earlier, dict) else []  # an older layout: none
    results = {r["label"]: r for r in kept if r.get("label") in order}
    settings = {**s, "seeds": seeds, "workers": WORKERS}
    log = Log()

    def save() -> list[dict]:
        done = with_gaps(sorted(results.values(), key=lambda r: order.index(r["label"])))
        out.write_text(json.dumps({"settings": settings, "rows": done}, indent=1) + "\n")
        return done

    if args.report:
        if not results:
            parser.error(f"--report: no rows in {out}; run the benchmark first")
        txt = out.with_suffix(".txt")
        ran = txt.read_text().splitlines() if txt.exists() else []  # the run's own lines stay
        for line in (x for x in ran if x.startswith("[")):
            log(line)
        report(save(), earlier["settings"], log, out)
        for line in (x for x in ran if x.startswith("load average")):
            log(line)
        log.save(txt)
        return
    tick, loads = time.perf_counter(), []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with Bench("jobs/quickstart.yaml", base_overrides(s, args.quick), cpus=WORKERS) as bench:
        for i, row in enumerate(rows, 1):
            per_seed = []
            for seed in range(seeds):
                tag = row.label.replace(" ", "_")
                run = bench.run(f"{tag}_s{seed}", [*row.overrides(), f"run.seed={seed}"])
                per_seed.append(measure_seed(run, row, s["warmup"]))
                loads.append(run.load)
                log(
                    f"[{i}/{len(rows)}] {row.label} seed {seed}: {run.wall_s:.0f} s, val "
                    f"{per_seed[-1]['loss']:.4f}, load {run.load[0]:.1f}->{run.load[1]:.1f}"
                )
            results[row.label] = summarize(row, per_seed, run.dense_bytes)
            done = save()
    seen = [x for pair in loads for x in pair]
    report(done, settings, log, out)
    log(
        f"load average during the rows: {min(seen):.1f}-{max(seen):.1f} (now "
        f"{load_average():.1f}); total {time.perf_counter() - tick:.0f} s; wrote {out}"
    )
    log.save(out.with_suffix(".txt"))


if __name__ == "__main__":
    sys.exit(main())
