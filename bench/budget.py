"""Budgeted compression of SmolLM2-135M: Presso's per-layer plans against uniform methods.

    python bench/budget.py [--quick] [--eval-tokens N] [--calib-samples N]

Three budgets are the real artifact sizes of uniform GPTQ W4 g64, GPTQ W3 g64 and SparseGPT
2:4 + W4 g64 (SmolLM2's width 576 is not a multiple of 128, so g64). For each, the planner
(:mod:`presso.compressors.plan.planner`) chooses per-layer bits, group sizes, sparsity, rank or dense
from one calibration pass (each layer's output errors weighted by the loss's sensitivity to them,
from one backward pass), and the plan is solved with GPTQ / SparseGPT / output-optimal low
rank, sequentially block by block like the uniform recipes. More budgets (``SWEEP``) and uniform
RTN points complete the perplexity-vs-size picture (``bench/results/budget_pareto.png``).

Fixed for every row: the same calibration windows (``--calib-samples`` windows of 512 tokens
from the train split, seed 0), Hessian dampening 0.01, symmetric grids for the uniform methods
(the repository's defaults), and the same evaluation: perplexity over the first
``--eval-tokens`` tokens of the test split (Macbeth, The Tempest) in windows of 512.

**Budgets are about the whole artifact**: every file ``save_compressed`` writes (weights,
safetensors header, config.json, tokenizer files, manifest). SmolLM2 ties its embedding and
``lm_head`` (28 M weights, stored once in fp32: 113 MB, about two thirds of a W4 artifact).
The planner leaves them as they are, exactly like the uniform methods (``ignore: [lm_head]``):
the artifact format compresses ``nn.Linear`` layers only, and letting the planner alone shrink
the embedding would win the comparison on a setting the uniform rows were denied.

Perplexity is measured on the model the pipeline leaves behind (weights replaced by their
stored values); the artifact reloads to the same logits bit for bit for every format but the
low-rank one, whose two thin products round differently from the dense product (tests).

``bench/results/budget.json`` holds one row per (budget, method) with the fields
``budget_bytes, method, artifact_bytes, avg_bits, ppl`` (``budget_bytes`` is null for points
that only draw the picture), plus each plan's layer table and the settings of the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SEQ_LEN = 512
G = 64
BUDGETS = {  # the uniform methods whose real artifact sizes are the budgets
    "GPTQ W4 g64": [{"gptq": {"bits": 4, "group_size": G}}],
    "GPTQ W3 g64": [{"gptq": {"bits": 3, "group_size": G}}],
    "SparseGPT 2:4+W4 g64": [{"sparsegpt": {"pattern": "2:4", "bits": 4, "group_size": G}}],
}
POINTS = {  # more uniform points for the perplexity-vs-size picture
    "RTN W4 g64": [{"rtn": {"bits": 4, "group_size": G}}],
    "RTN W3 g64": [{"rtn": {"bits": 3, "group_size": G}}],
    "GPTQ W8 g64": [{"gptq": {"bits": 8, "group_size": G}}],
}
SWEEP_MB = (175.0, 200.0)  # extra mixed-plan budgets (whole artifact, 10^6 bytes)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:4.1f}] {message}", flush=True)


def setup(args):
    """Model, tokenizer, calibration batches and evaluation tokens."""
    from presso.orchestrator import data
    from presso.orchestrator.compress import calibration_batches
    from presso.orchestrator.config import ScratchModelConfig
    from presso.orchestrator.models import build_scratch, load_pretrained, smollm2_folder

    model, tokenizer = load_pretrained(smollm2_folder())
    if args.quick:  # a tiny random Llama with SmolLM2's tokenizer: checks the script, not numbers
        shape = ScratchModelConfig(hidden_size=128, num_layers=2, intermediate_size=256)
        model = build_scratch(shape, len(tokenizer), max_len=2048, seed=0).eval()
    works = data.load_works(None)
    corpus = data.build_corpus(
        works, data.split_works(works, ["hamlet", "sonnets"], ["macbeth", "tempest"]), tokenizer
    )
    calib = calibration_batches(corpus.train, args.calib_samples, SEQ_LEN, 4, seed=0)
    return model, tokenizer, calib, corpus.test


class Runner:
    """Compresses copies of the model, writes their artifacts and measures perplexity."""

    def __init__(self, model, tokenizer, calib, test_tokens, eval_tokens: int) -> None:
        self.model, self.tokenizer, self.calib = model, tokenizer, calib
        self.test_tokens, self.eval_tokens = test_tokens, eval_tokens
        self.tmp = Path(tempfile.mkdtemp(prefix="presso-budget-"))

    def ppl(self, model) -> float:
        from presso.orchestrator.evaluate import perplexity

        return perplexity(model, self.test_tokens, SEQ_LEN, self.eval_tokens, 4).perplexity

    def run(self, recipe, ignore=("lm_head",)):
        """``(artifact info, perplexity)`` of the model compressed by ``recipe``."""
        from presso.compressors.formats.artifact import save_compressed
        from presso.compressors.ptq.blocks import compress_model

        model = copy.deepcopy(self.model)
        records = compress_model(model, recipe, self.calib, ignore=list(ignore))
        info = save_compressed(model, records, self.tmp / "artifact", self.tokenizer)
        return info, self.ppl(model)


def plot(rows: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"Presso mixed plan": "o-", "GPTQ": "s--", "RTN": "^--", "SparseGPT": "D--"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, style in families.items():
        points = sorted(
            (r["artifact_bytes"] / 1e6, r["ppl"]) for r in rows if r["method"].startswith(family)
        )
        if points:
            ax.plot(*zip(*points), style, label=family, markersize=6)
    ax.axhline(dense_ppl, color="gray", linestyle=":", label=f"fp32 ({dense_ppl:.2f})")
    ax.set(
        xlabel="artifact size (MB, whole folder)",
        ylabel="test perplexity",
        title="SmolLM2-135M: perplexity vs artifact size",
        yscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model: checks the script")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.eval_tokens, args.calib_samples = min(args.eval_tokens, 2048), 4
    torch.set_num_threads(args.threads)
    from presso.compressors.plan.planner import CandidateGrid, Planner, measure_model

    model, tokenizer, calib, test_tokens = setup(args)
    runner = Runner(model, tokenizer, calib, test_tokens, args.eval_tokens)
    dense_ppl = runner.ppl(model)
    log(f"dense perplexity {dense_ppl:.3f}")
    rows, plans, loads = [], {}, [os.getloadavg()[0]]

    def add(budget, method, info, ppl, avg_bits=None):
        rows.append(
            {
                "budget_bytes": budget,
                "method": method,
                "artifact_bytes": info.artifact_bytes,
                "avg_bits": round(info.avg_bits if avg_bits is None else avg_bits, 4),
                "ppl": round(ppl, 4),
            }
        )
        loads.append(os.getloadavg()[0])
        log(
            f"{method:<26} {info.artifact_bytes:>12,} B  {rows[-1]['avg_bits']:6.3f} b/w  {ppl:.3f}"
        )

    budgets = {}
    for method, recipe in BUDGETS.items():
        info, ppl = runner.run(recipe)
        budgets[method] = info.artifact_bytes
        add(info.artifact_bytes, method, info, ppl)
    for method, recipe in POINTS.items():
        add(None, method, *runner.run(recipe))

    tick = time.perf_counter()
    options = measure_model(model, calib, CandidateGrid())
    planner = Planner(model, options, tokenizer)
    log(
        f"weighed outputs by the loss, calibrated and measured {len(options)} layers in "
        f"{time.perf_counter() - tick:.0f} s"
    )
    sweep = [] if args.quick else [int(mb * 1e6) for mb in SWEEP_MB]
    for budget in [*budgets.values(), *sweep]:
        plan = planner.for_bytes(budget)
        info, ppl = runner.run([plan.solver()], ignore=("lm_head", *plan.ignore))
        if info.artifact_bytes != plan.artifact_bytes or info.artifact_bytes > budget:
            raise SystemExit(f"plan {plan.artifact_bytes} vs artifact {info.artifact_bytes}")
        add(budget, "Presso mixed plan", info, ppl, plan.avg_bits)
        plans[str(budget)] = {
            "choices": dict(Counter(o.candidate.label for o in plan.chosen).most_common()),
            "layers": plan.rows(),
        }
        print(plan.table(), flush=True)

    lines = [
        f"fp32 perplexity {dense_ppl:.3f}",
        "budget (bytes)   method                       artifact (bytes)  avg bits  perplexity",
    ]
    for r in rows:
        b = f"{r['budget_bytes']:,}" if r["budget_bytes"] else "-"
        lines.append(
            f"{b:>14}   {r['method']:<26} {r['artifact_bytes']:>16,}  {r['avg_bits']:8.3f}  "
            f"{r['ppl']:10.3f}"
        )
    verdicts = []
    for method, budget in budgets.items():
        uniform = next(r for r in rows if r["method"] == method)
        mixed = next(r for r in rows if r["budget_bytes"] == budget and r is not uniform)
        verdicts.append(mixed["ppl"] < uniform["ppl"] and mixed["artifact_bytes"] <= budget)
        lines.append(
            f"at {method}'s size: mixed {mixed['ppl']:.3f} vs uniform {uniform['ppl']:.3f}"
        )
    print("\n" + "\n".join(lines))

    name = "budget_quick" if args.quick else "budget"
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("eval_tokens", "calib_samples", "threads", "quick")}
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF)",
                "settings": {**settings, "seq_len": SEQ_LEN, "grid": vars(CandidateGrid())},
                "dense_ppl": round(dense_ppl, 4),
                "load_average": [round(v, 1) for v in loads],
                "rows": rows,
                "plans": plans,
            },
            indent=1,
        )
    )
    (RESULTS / f"{name}.txt").write_text("\n".join(lines) + "\n")
    plot(rows, dense_ppl, RESULTS / f"{name}_pareto.png")
    log(f"wrote {RESULTS / name}.json, .txt and {name}_pareto.png")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
