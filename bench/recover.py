"""Recovery of SmolLM2-135M after 3-bit quantization and 2:4 pruning: each row before and after
the recover stage (KD toward the dense model, codes and masks fixed) on 2 Ray Train workers.

    python bench/recover.py [--steps N] [--calib-samples N] [--eval-tokens N] [--rows a,b]

Each row runs the real stages: ``run_compression`` (2 Ray actors), ``save_compressed``, then
``run_recovery`` (2 Ray Train workers, DDP over gloo, one thread each) and measures perplexity on
the artifacts *reloaded* from disk: on the Shakespeare test split (Macbeth, The Tempest; windows
of 512) and on a second text domain, the software licence texts in /usr/share/common-licenses
(legal English; skipped where that folder is missing). Recovery wall seconds cover the whole
stage: worker start, distillation, checkpoints, export, the two val evaluations. The recovered
artifact's ``model.safetensors`` is checked to be the same size to the byte as the original's.

Writes ``bench/results/recover.json`` and prints the table; ``gap closed`` is
``(ppl before − ppl after) / (ppl before − ppl fp32)`` on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, ROOT, second_domain

ROWS = {
    "gptq-w3": [{"gptq": {"bits": 3, "group_size": 64, "act_order": True}}],
    "spqr-w3": [{"spqr": {"bits": 3, "group_size": 16}}],
    "sparsegpt-2:4": [{"sparsegpt": {"pattern": "2:4"}}],
    "sparsegpt-2:4+w4": [{"sparsegpt": {"pattern": "2:4", "bits": 4, "group_size": 64}}],
}


def ppls(model, texts: dict, e) -> dict:
    """Perplexity on each text, as the eval stage measures it."""
    from presso.orchestrator.evaluate import perplexity

    return {
        name: perplexity(model, tokens, e.seq_len, e.max_tokens, e.batch_size).perplexity
        for name, tokens in texts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()

    from presso import load_compressed
    from presso.compressors.formats.artifact import WEIGHTS, save_compressed
    from presso.orchestrator.cluster import ensure_ray
    from presso.orchestrator.compress import run_compression
    from presso.orchestrator.config import load_config
    from presso.orchestrator.pipeline import preflight, quiet_environment
    from presso.orchestrator.recover import run_recovery

    quiet_environment()
    torch.set_num_threads(2)
    out_rows, dense, texts = [], None, {}
    for name in args.rows.split(","):
        recipe = json.dumps(ROWS[name])  # JSON is YAML; unquoted, "2:4" would read as 124
        cfg = load_config(
            ROOT / "jobs" / "smollm2_gptq.yaml",
            [
                f"compress.recipe={recipe}",
                f"compress.calibration.samples={args.calib_samples}",
                "recover.enabled=true",
                f"recover.steps={args.steps}",
                f"recover.optimizer.lr={args.lr}",
                f"recover.eval_every={max(args.steps // 4, 1)}",
                f"eval.max_tokens={args.eval_tokens}",
            ],
        )
        with tempfile.TemporaryDirectory(prefix="presso-recover-") as tmp:
            cfg.run.output_dir = tmp
            plan = preflight(cfg, ("compress", "recover", "eval"))
            ensure_ray(cfg)
            if dense is None:
                texts = {"test": plan.corpus.test}
                if (other := second_domain(plan.tokenizer)) is not None:
                    texts["licenses"] = other
                dense = ppls(plan.model, texts, cfg.eval)
            tick = time.perf_counter()
            c = cfg.compress
            result = run_compression(
                plan.model, plan.recipe, c.workers, c.ignore, None, plan.calibration,
                c.calibration.shards, c.threads_per_worker, plan.layers,
            )  # fmt: skip
            compress_s = time.perf_counter() - tick
            original = Path(tmp) / "compressed"
            save_compressed(result.model, result.records, original, plan.tokenizer)
            rec = run_recovery(cfg, plan, original, None, Path(tmp) / "recovered")
            before = ppls(load_compressed(original), texts, cfg.eval)
            after = ppls(load_compressed(rec.artifact), texts, cfg.eval) if rec.artifact else before
            same_size = rec.artifact is None or (
                (original / WEIGHTS).stat().st_size == (rec.artifact / WEIGHTS).stat().st_size
            )
        gap = (before["test"] - after["test"]) / (before["test"] - dense["test"])
        out_rows.append(
            {
                "row": name, "recipe": ROWS[name], "compress_s": compress_s,
                "recover_s": rec.wall_s, "steps": args.steps, "tokens": rec.tokens,
                "val_before": rec.val_ppl_before, "val_after": rec.val_ppl_after,
                "kept": rec.artifact is not None, "before": before, "after": after,
                "gap_closed": gap, "weights_same_size": same_size, "load": os.getloadavg()[0],
            }
        )  # fmt: skip
        _print(dense, out_rows)
        RESULTS.mkdir(parents=True, exist_ok=True)  # after every row: a cut-short run keeps some
        settings = {k: getattr(args, k) for k in ("steps", "lr", "calib_samples", "eval_tokens")}
        payload = {"settings": settings, "fp32": dense, "rows": _merged(settings, out_rows)}
        (RESULTS / "recover.json").write_text(json.dumps(payload, indent=1))


def _merged(settings: dict, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of an earlier run with the same settings that this one did not
    repeat (``--rows`` runs a few at a time; each row is a separate measurement anyway)."""
    path = RESULTS / "recover.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier.get("settings") != settings:
        return rows
    ran = {r["row"] for r in rows}
    return [r for r in earlier["rows"] if r["row"] not in ran] + rows


def _print(dense: dict, rows: list[dict]) -> None:
    head = f"{'row':>18} {'test before':>11} {'after':>8} {'gap':>6} {'lic before':>10}"
    print(f"{head} {'after':>8} {'val b→a':>17} {'kept':>5} {'rec s':>6}")
    lic = dense.get("licenses", float("nan"))
    print(f"{'fp32':>18} {dense['test']:>11.3f} {'':>8} {'':>6} {lic:>10.3f}")
    for r in rows:
        b, a = r["before"], r["after"]
        nan = float("nan")
        print(
            f"{r['row']:>18} {b['test']:>11.3f} {a['test']:>8.3f} {r['gap_closed']:>6.1%} "
            f"{b.get('licenses', nan):>10.3f} {a.get('licenses', nan):>8.3f} "
            f"{r['val_before']:>8.3f}→{r['val_after']:>8.3f} {r['kept']!s:>5} "
            f"{r['recover_s']:>6.0f}"
        )


if __name__ == "__main__":
    main()
