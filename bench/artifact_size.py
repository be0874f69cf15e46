"""Artifact size, perplexity, load memory and transformers loading of SmolLM2-135M GPTQ W4 g64,
by how the tensors presso does not compress are stored.

    python bench/artifact_size.py [--calib-samples N] [--eval-tokens N]

One GPTQ W4 g64 (act-order, symmetric) compress stage on 2 Ray workers, with the calibration and
evaluation of ``bench/ptq.py`` (16 windows of 512 train tokens, seed 0; perplexity over the first
8192 test tokens in windows of 512), then the same records saved four ways:

- ``fp32``: every uncompressed tensor in fp32 (what presso stored before ``compress.dtype``);
- ``fp16``: in the model's half dtype (``compress.dtype: auto``, the default);
- ``fp16 + emb W8 g64`` / ``W4 g64``: the ``embedding`` recipe entry on top (tied: one tensor).

``MB`` counts the folder as ``bench/ptq.py`` writes it (weights, config.json, manifest); the
pipeline also writes the tokenizer's files (``+tok MB``).

Each artifact is reloaded with ``presso.load_compressed(dtype=torch.float32)`` for perplexity.
Peak memory of ``load_compressed`` (default dtype: as stored) is measured in a fresh process:
the rise of its peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over the RSS
before loading: once loaded and every tensor read (safetensors maps the file; a page counts once
read), and after a first 16-token forward pass (the CPU reference path dequantizes one layer at a
time, and computes fp16 matmuls through fp32 copies); against the issue's bound of 1.3 × the
artifact plus one decoder layer (its dense weights in the stored dtype). ``transformers`` is the logits' largest difference between
``AutoModelForCausalLM.from_pretrained(artifact)`` (compressed-tensors installed) and
presso's loader, both in fp32, or why transformers could not load it.

Writes ``bench/results/artifact_size.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SEQ_LEN = 512
RECIPE = [{"gptq": {"bits": 4, "group_size": 64, "act_order": True}}]
VARIANTS = {  # name → (storage dtype, embedding entry settings or None)
    "fp32": ("float32", None),
    "fp16": ("auto", None),
    "fp16 + emb W8 g64": ("auto", {"bits": 8, "group_size": 64}),
    "fp16 + emb W4 g64": ("auto", {"bits": 4, "group_size": 64}),
}

PEAK = """
import json, sys, torch
import presso
from presso.compressors.formats.loading import load_compressed
import transformers.models.llama.modeling_llama  # imported before the baseline is taken

def status(key):
    line = next(s for s in open("/proc/self/status") if s.startswith(key + ":"))
    return int(line.split()[1]) * 1024

torch.set_num_threads(1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
base = status("VmRSS")
model = load_compressed(sys.argv[1])
with torch.no_grad():  # read every page of every tensor (safetensors maps the file: zero-copy)
    for t in [*model.parameters(), *model.buffers()]:
        t.flatten()[::256].sum()
loaded = status("VmHWM") - base
with torch.no_grad():
    model(torch.arange(16).unsqueeze(0))
print(json.dumps({"load_bytes": loaded, "peak_bytes": status("VmHWM") - base,
                  "held_bytes": status("VmRSS") - base}))
"""


def load_peak(artifact: Path) -> dict:
    """Peak memory of ``load_compressed(artifact)`` in a fresh process (see the docstring)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(artifact)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def transformers_diff(artifact: Path, ours: torch.nn.Module, ids: torch.Tensor) -> str:
    """Largest |logit difference| of transformers' load against presso's, or why it failed."""
    from transformers import AutoModelForCausalLM

    try:
        theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32)
        with torch.no_grad():
            diff = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    except Exception as e:  # what transformers raises varies; the row says what it was
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return f"max |Δlogit| {diff:.2e}"


def decoder_layer_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in model.model.layers[0].parameters()) * dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-samples", type=int, default=16, help="windows of 512")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="test tokens")
    args = parser.parse_args()

    from presso.orchestrator.pipeline import quiet_environment

    quiet_environment()
    import ray

    import presso
    from presso.compressors.formats.artifact import save_compressed
    from presso.compressors.quant.embedding import EmbeddingQuant
    from presso.orchestrator import data
    from presso.orchestrator.compress import calibration_batches, run_compression
    from presso.orchestrator.evaluate import perplexity
    from presso.orchestrator.models import load_pretrained, smollm2_folder

    torch.set_num_threads(2)
    model, tokenizer = load_pretrained(smollm2_folder())
    works = data.load_works(None)
    splits = data.split_works(works, ["hamlet", "sonnets"], ["macbeth", "tempest"])
    corpus = data.build_corpus(works, splits, tokenizer)
    calib = calibration_batches(corpus.train, args.calib_samples, SEQ_LEN, batch_size=4, seed=0)
    ids = corpus.test[:128].unsqueeze(0)

    def evaluate(m) -> float:
        return perplexity(m, corpus.test, SEQ_LEN, args.eval_tokens, batch_size=4).perplexity

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    tick = time.perf_counter()
    result = run_compression(model, RECIPE, 2, ["lm_head"], calibration=calib, shards=8)
    ray.shutdown()
    print(f"GPTQ W4 g64 in {time.perf_counter() - tick:.0f} s", flush=True)

    rows, tmp = [], Path(tempfile.mkdtemp(prefix="presso-artifact-size-"))
    for name, (dtype, embedding) in VARIANTS.items():
        work, records = result.model, dict(result.records)
        if embedding is not None:
            work = copy.deepcopy(result.model)
            records.update(EmbeddingQuant(**embedding).compress_embeddings(work))
        folder = tmp / name.replace(" ", "_")
        info = save_compressed(work, records, folder, None, dtype)
        with_tokenizer = save_compressed(work, records, tmp / "tokenized", tokenizer, dtype)
        loaded = presso.load_compressed(folder, dtype=torch.float32)
        peak = load_peak(folder)
        stored = presso.load_compressed(folder).model.norm.weight.dtype
        bound = 1.3 * info.artifact_bytes + decoder_layer_bytes(model, stored)
        row = {
            "variant": name,
            "artifact_bytes": info.artifact_bytes,
            "with_tokenizer_bytes": with_tokenizer.artifact_bytes,
            "ppl": evaluate(loaded),
            "load_only_peak_bytes": peak["load_bytes"],
            "load_peak_bytes": peak["peak_bytes"],
            "load_held_bytes": peak["held_bytes"],
            "load_peak_bound_bytes": int(bound),
            "transformers": transformers_diff(folder, loaded, ids),
        }
        rows.append(row)
        print(table([row], header=not rows[:-1]), flush=True)

    settings = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "recipe": RECIPE,
        "calibration": f"{args.calib_samples} x {SEQ_LEN} tokens, train split, seed 0",
        "eval": f"first {args.eval_tokens} test tokens (macbeth, tempest), windows of {SEQ_LEN}",
        "load_peak": "VmHWM rise over VmRSS in a fresh process, load_compressed default dtype: "
        "after loading and reading every tensor, and after a first 16-token forward pass",
        "cores": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "artifact_size.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1)
    )
    text = table(rows) + f"\nsettings: {json.dumps(settings)}\n"
    (RESULTS / "artifact_size.txt").write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + text + f"wrote {RESULTS / 'artifact_size'}.json and .txt")


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(
            f"{'variant':<18} {'MB':>7} {'+tok MB':>7} {'ppl':>8} {'load MB':>8} {'+forward MB':>11} "
            f"{'bound MB':>9}  "
            "transformers"
        )
    for r in rows:
        lines.append(
            f"{r['variant']:<18} {r['artifact_bytes'] / 1e6:>7.1f} "
            f"{r['with_tokenizer_bytes'] / 1e6:>7.1f} {r['ppl']:>8.3f} "
            f"{r['load_only_peak_bytes'] / 1e6:>8.1f} {r['load_peak_bytes'] / 1e6:>11.1f} "
            f"{r['load_peak_bound_bytes'] / 1e6:>9.1f}  "
            f"{r['transformers']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
