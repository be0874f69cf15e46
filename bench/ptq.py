"""Post-training quantization and pruning of SmolLM2-135M: Presso's methods against RTN, each
other and llm-compressor, with 1 and 2 compression workers.

    python bench/ptq.py [--quick] [--calib-samples N] [--eval-tokens N] [--no-peers]
    python bench/ptq.py --model gemma3-270m --workers 2   # Gemma-3-270M: fp32, GPTQ W4 g64
    python bench/ptq.py --rows "gptq W3,llmc gptq W3"   # some rows; the others are kept
    python bench/ptq.py --rows "gptq W4,llmc gptq W4" --seeds 3   # each on 3 calibration draws

Every row starts from the same fp32 model (SmolLM2-135M-Instruct dequantized from its GGUF
Q4_1 source, so it already sits on a 4-bit grid per 32 columns: other grids stack a second
rounding), the same calibration windows (``--calib-samples`` windows of 512 tokens drawn from
the Shakespeare train split with seed 0) and the same evaluation (perplexity over the first
``--eval-tokens`` tokens of the test split, Macbeth and The Tempest, in windows of 512, and over
as many tokens of a second text domain no setting was chosen on: the software licence texts in
``/usr/share/common-licenses``, legal English, the ``lic`` columns).
SmolLM2's width 576 is not a multiple of 128, so the grouped rows use groups of 64 (576 = 9 × 64).
``lm_head`` (tied to the embedding) stays dense in every row.

Presso rows run the real compress stage (``run_compression``: a Ray actor pool, data-parallel
calibration, layer-parallel solves) once with 1 worker and once with 2 (with ``--seeds``: 2
only), check that both give the same records, save the artifact and measure perplexity on the
artifact *reloaded* from disk. Wall seconds cover the whole stage: actor start, calibration, solves.

Peer rows (llm-compressor's ``oneshot``: GPTQModifier W4/W3 g64 symmetric with its default
static act-order, SparseGPTModifier and WandaPruningModifier at 50 %, with
``ignore=["re:.*lm_head"]``: their module names end in a dot, so a plain ``"lm_head"`` would
not keep the tied head dense as every other row does) run in this process on
the same model folder, calibration windows and evaluation when ``llmcompressor`` imports
(``pip install presso[peers]``); otherwise they are skipped with a note. A peer uses torch's
threads (both cores) in one process; its wall seconds are in ``wall_s_2w``.

``--model gemma3-270m`` measures Gemma-3-270M (Q4_K_M GGUF dequantized to fp32; width 640, so
g64 fits it too) the same way, by default fp32 and GPTQ W4 g64, every window led by BOS as Gemma
needs; its artifact (stored in bf16) is evaluated with fp32 compute. ``--rows`` runs only the
named rows (labels as in the table: ``gptq W4``, ``llmc gptq W3``, ``sparsegpt 2:4``) and keeps
the model's other rows from an earlier run with the same settings.
``gptq scale32`` rows are GPTQ with ``scale_dtype: float32``: the scales stored as
llm-compressor stores them for an fp32 model, at 0.25 bit/weight more than fp16 ones at g64.

``--seeds N`` runs every row on N calibration draws (seeds 0..N-1, the same draws for every row)
and reports the mean perplexity and half the range (``±``): how far one draw can move a row, the
noise floor a difference between two rows must clear. Such runs are kept apart from the
one-draw table.

Writes ``bench/results/ptq.json`` (``--quick``: ``ptq_quick.json``): per model (and seed count),
``rows`` with the fields ``method, bits, group_size, sparsity, ppl, ppl_ratio, ppl_lic,
ppl_lic_ratio, avg_bits, artifact_bytes, wall_s_1w, wall_s_2w`` (with ``--seeds``, also each
perplexity's ``_seeds`` and ``_spread``), plus the settings, the checks and the machine's load
per row; ``ptq.txt`` has one table per model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from harness import LICENSES, RESULTS, second_domain, spread

SEQ_LEN = 512
G = 64  # 576 = 9 × 64


@dataclass
class Row:
    method: str
    bits: int | None  # code width; None for pure pruning (kept values fp16)
    group_size: int | None
    sparsity: float
    recipe: list  # Presso recipe, or the peer modifier's settings
    quick: bool = False  # part of --quick
    peer: str | None = None  # llm-compressor modifier: gptq | sparsegpt | wanda


def quant(method: str, bits: int, group: int, quick: bool = False, **extra) -> Row:
    algo = method.split()[0]
    return Row(
        method, bits, group, 0.0, [{algo: {"bits": bits, "group_size": group, **extra}}], quick
    )


def prune(method: str, quick: bool = False, **settings) -> Row:
    return Row(method, None, None, 0.5, [{method.split()[0]: settings}], quick)


ASYM = {"symmetric": False}
ROWS = [
    quant("rtn", 4, G, quick=True),
    quant("rtn", 3, G),
    quant("rtn asym", 4, 32, **ASYM),
    quant("gptq", 4, G, quick=True, act_order=True),
    quant("gptq", 3, G, act_order=True),
    quant("gptq asym", 4, 32, act_order=True, **ASYM),
    quant("gptq scale32", 4, G, act_order=True, scale_dtype="float32"),
    quant("gptq scale32", 3, G, act_order=True, scale_dtype="float32"),
    quant("awq", 4, G, quick=True),
    quant("awq", 3, G),
    quant("spqr", 4, G),
    quant("spqr", 3, G),
    quant("spqr g16", 3, 16),
    prune("magnitude", quick=True, sparsity=0.5),
    prune("magnitude 2:4", pattern="2:4"),
    prune("wanda", quick=True, sparsity=0.5),
    prune("wanda 2:4", pattern="2:4"),
    prune("sparsegpt", quick=True, sparsity=0.5),
    prune("sparsegpt 2:4", pattern="2:4"),
]
PEERS = [
    Row("llmc gptq", 4, G, 0.0, [], True, "gptq"),
    Row("llmc gptq", 3, G, 0.0, [], False, "gptq"),
    Row("llmc sparsegpt", None, None, 0.5, [], False, "sparsegpt"),
    Row("llmc wanda", None, None, 0.5, [], False, "wanda"),
]
QUICK_BOTH = {"gptq"}  # --quick measures 1 and 2 workers for these rows only


class Subject(NamedTuple):
    description: str
    folder: Callable[[], Path]  # its fp32 folder, fetched once
    eval_batch: int
    artifact_dtype: torch.dtype | None  # compute dtype of the reloaded artifact; None: as stored


def _models() -> dict[str, Subject]:
    from presso.orchestrator.models import gemma3_folder, smollm2_folder

    return {
        "smollm2": Subject(
            "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)", smollm2_folder, 4, None
        ),
        # 262k-token vocabulary: a window's logits take 0.5 GB. Its artifact is stored in bf16,
        # whose matmuls on a CPU without bf16 units take many times fp32's: computed in fp32
        "gemma3-270m": Subject(
            "Gemma-3-270M (GGUF Q4_K_M dequantized to fp32)", gemma3_folder, 1, torch.float32
        ),
    }


MODELS = _models()


def label(row: Row | dict) -> str:
    """The row's name in the table and in ``--rows``: ``gptq W4``, ``sparsegpt 2:4``, ``fp32``."""
    method, bits = (row["method"], row["bits"]) if isinstance(row, dict) else (row.method, row.bits)
    return f"{method} W{bits}" if bits and bits < 32 else method


def load() -> float:
    return os.getloadavg()[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(t, b[n].tensors()[k]) for n in a for k, t in a[n].tensors().items()
    )


def presso_row(row, model, calib, evaluate, workers_list, checks, dtype=None) -> dict:
    from presso import load_compressed
    from presso.compressors.formats.artifact import save_compressed
    from presso.orchestrator.compress import run_compression

    walls, results = {}, {}
    for workers in workers_list:
        tick = time.perf_counter()
        results[workers] = run_compression(
            model, row.recipe, workers, ["lm_head"], calibration=calib, shards=8
        )
        walls[workers] = time.perf_counter() - tick
    if len(results) == 2:
        checks[f"{label(row)}: 1 and 2 workers give the same records"] = _same(
            results[1].records, results[2].records
        )
    result = results[workers_list[-1]]
    folder = Path(tempfile.mkdtemp(prefix="presso-ptq-"))
    try:
        info = save_compressed(result.model, result.records, folder / "artifact")
        ppl = evaluate(load_compressed(folder / "artifact", dtype=dtype))
        if row.method == "gptq" and row.bits == 4:  # the artifact reproduces the model it saved
            # up to the half-precision storage of the tensors left uncompressed (norms, embedding)
            in_memory = evaluate(result.model, domains=("test",))["ppl"]
            off = abs(ppl["ppl"] / in_memory - 1)
            checks[f"gptq W4: reloaded artifact ppl within 0.5 % of the in-memory fp32 model's "
                   f"({ppl['ppl']:.3f} vs {in_memory:.3f})"] = off <= 0.005  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        **ppl,
        "avg_bits": info.avg_bits,
        "artifact_bytes": info.artifact_bytes,
        "wall_s_1w": walls.get(1),
        "wall_s_2w": walls.get(2),
    }


def _peer_modifier(row):
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    if row.peer == "gptq":
        weights = {"num_bits": row.bits, "type": "int", "symmetric": True}
        weights.update(strategy="group", group_size=row.group_size)
        group = {"targets": ["Linear"], "weights": weights}
        return GPTQModifier(config_groups={"group_0": group}, ignore=["lm_head"])
    # llm-compressor 0.14's pruning modifiers name modules with a trailing dot ("lm_head."):
    # ignore=["lm_head"] does not match them, and the tied lm_head/embedding would be pruned too
    cls = SparseGPTModifier if row.peer == "sparsegpt" else WandaPruningModifier
    return cls(sparsity=row.sparsity, mask_structure="0:0", ignore=["re:.*lm_head"])


def compressed_layer_bytes(folder: Path, linears: dict[str, int]) -> tuple[int, int]:
    """Bytes stored for the decoder linears' weights in a saved folder (every ``weight*``
    tensor of theirs: codes, scales, zeros, masks), and the number of weights they encode."""
    from safetensors import safe_open

    stored = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                parts = key.split(".")
                owner = next(
                    (i for i in range(1, len(parts)) if ".".join(parts[:i]) in linears), None
                )
                if owner is not None and parts[owner].startswith("weight"):
                    t = f.get_tensor(key)
                    stored += t.numel() * t.element_size()
    return stored, sum(linears.values())


def peer_row(row, folder, calib, evaluate, linears) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    ids = torch.cat(calib)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ_LEN] * len(ids)}
    )
    tick = time.perf_counter()
    model = oneshot(
        model=str(folder),
        processor=str(folder),
        dataset=data,
        recipe=_peer_modifier(row),
        num_calibration_samples=len(ids),
        max_seq_length=SEQ_LEN,
        shuffle_calibration_samples=False,
        batch_size=calib[0].shape[0],
    )
    wall = time.perf_counter() - tick
    ppl = evaluate(model)
    out = Path(tempfile.mkdtemp(prefix="presso-ptq-peer-"))
    try:
        model.save_pretrained(out, save_compressed=True)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        stored, weights = compressed_layer_bytes(out, linears)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        active_session().reset()
    return {
        **ppl,
        "avg_bits": 8 * stored / weights,
        "artifact_bytes": size,
        "wall_s_1w": None,
        "wall_s_2w": wall,
    }


def solver_agreement(model, calib, bits: int) -> dict:
    """presso's GPTQ solve and llm-compressor's ``quantize_weight`` on the same weights and
    Hessian (inputs of the dense model over the calibration windows) with the same settings
    (symmetric min-max grid per 64 columns, static act-order, damp 0.01, blocks of 128): per
    layer, each one's output error tr(ΔW H ΔWᵀ) and the share of equal codes. Separates the
    solver from everything around it (calibration, block order, storage)."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from presso.compressors.quant.gptq import gptq_quantize
    from presso.compressors.quant.primitives import dequantize

    last = model.config.num_hidden_layers - 1
    layers = [(0, "self_attn.q_proj"), (last // 2, "self_attn.o_proj")]
    layers += [(last // 2, "mlp.up_proj"), (last, "mlp.down_proj")]
    names = [f"model.layers.{i}.{linear}" for i, linear in layers]
    hessians, hooks = {}, []
    for name in names:

        def accumulate(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + x.T @ x

        hooks.append(model.get_submodule(name).register_forward_hook(accumulate))
    with torch.no_grad():
        for batch in calib:
            model(batch)
    for hook in hooks:
        hook.remove()
    args = QuantizationArgs(num_bits=bits, symmetric=True, group_size=G, actorder="static")
    out = {}
    for name in names:
        w, h = model.get_submodule(name).weight.detach().float(), hessians[name].float()
        q, scale, zero = gptq_quantize(w, h, bits, G, True, 0.01, True, 128)
        ours = dequantize(q, scale, zero, G)
        groups = w.reshape(w.shape[0], -1, G)
        ct_scale = groups.abs().amax(-1) / ((2**bits - 1) / 2)  # compressed-tensors' min-max
        zeros = torch.zeros_like(ct_scale, dtype=torch.int8)
        theirs = quantize_weight(w[None].clone(), h[None].clone(), ct_scale[None], zeros[None],
                                 None, args, 128, 0.01)[0][0]  # fmt: skip
        codes = (theirs.reshape(groups.shape) / ct_scale.unsqueeze(-1)).round().reshape(w.shape)
        out[name] = {"presso": output_error(ours - w, h), "llmc": output_error(theirs - w, h),
                     "equal_codes": float((codes == q.float()).float().mean())}  # fmt: skip
    return out


def output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    return float(torch.einsum("ij,jk,ik->", delta, h, delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset in about 10 minutes")
    parser.add_argument("--calib-samples", type=int, help="windows of 512 (default 16; quick 4)")
    parser.add_argument("--eval-tokens", type=int, help="test tokens (default 8192; quick 4096)")
    parser.add_argument("--no-peers", action="store_true", help="skip the llm-compressor rows")
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--rows", help="comma-separated row labels; the model's others are kept")
    parser.add_argument(
        "--seeds", type=int, default=1, help="calibration draws per row (seeds 0..N-1; default 1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        choices=(1, 2),
        help="compression workers for presso's rows (default: 1 and 2 in a one-draw run, which "
        "checks their speed and equal records; 2 otherwise)",
    )
    args = parser.parse_args()
    samples = args.calib_samples or (4 if args.quick else 16)
    eval_tokens = args.eval_tokens or (4096 if args.quick else 8192)

    from presso.orchestrator.pipeline import quiet_environment

    quiet_environment()
    import ray

    from presso.orchestrator import data
    from presso.orchestrator.compress import calibration_batches
    from presso.orchestrator.evaluate import perplexity
    from presso.orchestrator.models import load_pretrained

    torch.set_num_threads(2)
    description, source, eval_batch, artifact_dtype = MODELS[args.model]
    folder = source()
    model, tokenizer = load_pretrained(folder)
    works = data.load_works(None)
    splits = data.split_works(works, ["hamlet", "sonnets"], ["macbeth", "tempest"])
    corpus = data.build_corpus(works, splits, tokenizer)
    calibs = [
        calibration_batches(corpus.train, samples, SEQ_LEN, 4, seed=seed, bos=corpus.bos)
        for seed in range(args.seeds)
    ]

    texts = {"test": corpus.test}
    if (other := second_domain(tokenizer)) is not None:
        texts["lic"] = other

    def evaluate(m, domains=tuple(texts)) -> dict:
        """``{"ppl": test ppl, "ppl_lic": second domain's}`` (the ones in ``domains``)."""
        return {
            "ppl" if name == "test" else f"ppl_{name}": perplexity(
                m, texts[name], SEQ_LEN, eval_tokens, eval_batch, bos=corpus.bos
            ).perplexity
            for name in domains
        }

    linears = {
        n: m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    }
    dense = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    base = evaluate(model)
    fp32 = {"method": "fp32", "bits": 32, "group_size": None, "sparsity": 0.0, **base}
    fp32.update(avg_bits=32.0, artifact_bytes=dense, wall_s_1w=None, wall_s_2w=None)
    fp32.update(ratios(base, base))
    rows, checks, loads, notes = [fp32], {}, {}, []
    print(table([fp32]), flush=True)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    selected = [r for r in ROWS if r.quick or not args.quick]
    peers = [] if args.no_peers else [r for r in PEERS if r.quick or not args.quick]
    if args.model != "smollm2":
        selected, peers = [r for r in ROWS if r.method == "gptq" and r.bits == 4], []
    if args.rows:
        wanted = {name.strip() for name in args.rows.split(",")}
        known = {label(r) for r in [*ROWS, *PEERS]}
        if wanted - known:
            parser.error(f"--rows: unknown {sorted(wanted - known)}; the rows are {sorted(known)}")
        selected = [r for r in ROWS if label(r) in wanted]
        peers = [r for r in PEERS if label(r) in wanted and not args.no_peers]
    if peers:
        try:
            import llmcompressor  # noqa: F401
        except ImportError as e:
            notes.append(f"llm-compressor rows skipped: {e} (pip install presso[peers])")
            peers = []
    settings = {
        "model": description,
        "calibration": f"{samples} x {SEQ_LEN} tokens, train split, seed 0, batches of 4, 8 shards"
        if args.seeds == 1
        else f"{samples} x {SEQ_LEN} tokens, train split, each row once per seed 0..{args.seeds - 1}"
        " (ppl: their mean; ±: half their range), batches of 4, 8 shards",
        "eval": f"first {eval_tokens} test tokens (macbeth, tempest) in windows of {SEQ_LEN}",
        "second_domain": f"first {eval_tokens} tokens of {LICENSES}/* (the lic columns)"
        if "lic" in texts
        else None,
        "bos_led_windows": corpus.bos is not None,
        "artifact_compute": str(artifact_dtype or "as stored").removeprefix("torch."),
        "presso_workers": "Ray actors with 1 torch thread each; driver 2 threads",
        "peers": "llm-compressor oneshot in-process, 2 torch threads; its wall is wall_s_2w",
        "cores": os.cpu_count(),
    }
    name = "ptq_quick" if args.quick else "ptq"
    RESULTS.mkdir(parents=True, exist_ok=True)
    earlier = earlier_runs(RESULTS / f"{name}.json")
    key = args.model if args.seeds == 1 else f"{args.model}, {args.seeds} calibration seeds"

    def save() -> str:
        """Write the results so far (after every row: a run cut short keeps what it measured)."""
        report = {"settings": settings, "rows": rows, "checks": checks, "load_1min": loads}
        report.update(solver_agreement=agreement, notes=notes)
        # other models' runs as the file holds them now: another run may have written since
        runs = {**earlier_runs(RESULTS / f"{name}.json"), key: merged(earlier.get(key), report)}
        (RESULTS / f"{name}.json").write_text(json.dumps({"runs": runs}, indent=1))
        text = "\n\n".join(report_text(label, run) for label, run in runs.items())
        (RESULTS / f"{name}.txt").write_text(text + "\n")
        return text

    agreement = {}
    for bits in sorted({r.bits for r in peers if r.peer == "gptq"}):
        agreement[f"W{bits}"] = layers = solver_agreement(model, calibs[0], bits)
        worst = max(abs(v["presso"] / v["llmc"] - 1) for v in layers.values())
        checks[f"gptq W{bits}: solver output error within 2 % of llm-compressor's "
               f"on the same layer and Hessian (worst {worst:.2%})"] = worst <= 0.02  # fmt: skip
        print(json.dumps({f"solver W{bits}": layers}), flush=True)
    for row in [*peers, *selected]:  # peers first: a broken peer install shows in minutes
        before, per_seed = load(), []
        for calib in calibs:
            if row.peer:
                per_seed.append(peer_row(row, folder, calib, evaluate, linears))
            else:  # 1 and 2 workers (and their check) in a one-draw run: its subject is speed
                both = args.seeds == 1 and (not args.quick or row.method in QUICK_BOTH)
                workers = [args.workers] if args.workers else [1, 2] if both else [2]
                per_seed.append(
                    presso_row(row, model, calib, evaluate, workers, checks, artifact_dtype)
                )
        values = {**per_seed[0], **over_seeds(per_seed)}
        out = {"method": row.method, "bits": row.bits, "group_size": row.group_size}
        out.update(sparsity=row.sparsity, **ratios(values, base))
        out.update({k: v for k, v in values.items() if k.endswith(("_spread", "_seeds"))})
        out.update({k: values[k] for k in ("avg_bits", "artifact_bytes", "wall_s_1w", "wall_s_2w")})
        rows.append(out)
        loads[label(row)] = [round(before, 2), round(load(), 2)]
        print(table([out], header=False), flush=True)
        save()
    ray.shutdown()

    print("\n" + save())
    print(f"wrote {RESULTS / name}.json and .txt")


def over_seeds(per_seed: list[dict]) -> dict:
    """Each perplexity's mean over the calibration draws, its values and half their range."""
    out = {}
    for key in (k for k in per_seed[0] if k.startswith("ppl")):
        values = [v[key] for v in per_seed]
        out.update(
            {
                key: sum(values) / len(values),
                f"{key}_seeds": values,
                f"{key}_spread": spread(values),
            }
        )
    return out


def ratios(ppl: dict, base: dict) -> dict:
    """The perplexities in ``ppl`` (its ``ppl*`` keys) and their ratios to fp32's."""
    out = {}
    for key, value in ppl.items():
        if not key.startswith("ppl") or key.endswith(("_spread", "_seeds")):
            continue
        out.update({key: value, f"{key}_ratio": value / base[key] if key in base else None})
    return out


def earlier_runs(path: Path) -> dict:
    """``{model: run}`` of an earlier results file (one of the single-model layout is SmolLM2's)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    return earlier["runs"] if "runs" in earlier else {"smollm2": earlier}


SAME_RUN = ("model", "calibration", "eval")  # settings that make rows of two runs comparable


def merged(earlier: dict | None, run: dict) -> dict:
    """``run`` plus the rows of an earlier run of the same model and settings that it did not
    repeat (``--rows``); each row is its own measurement, on the same inputs."""
    if not earlier or any(earlier["settings"].get(k) != run["settings"][k] for k in SAME_RUN):
        return run
    ran = {label(r) for r in run["rows"]}
    order = [label(r) for r in earlier["rows"]]
    rows = [r for r in earlier["rows"] if label(r) not in ran] + run["rows"]
    rows.sort(key=lambda r: order.index(label(r)) if label(r) in order else len(order))
    notes = [*earlier.get("notes", []), *run["notes"]]
    return {
        "settings": run["settings"],
        "rows": rows,
        "checks": {**earlier.get("checks", {}), **run["checks"]},
        "load_1min": {**earlier.get("load_1min", {}), **run["load_1min"]},
        "solver_agreement": {**earlier.get("solver_agreement", {}), **run["solver_agreement"]},
        "notes": list(dict.fromkeys(notes)),
    }


def report_text(model: str, run: dict) -> str:
    lines = [f"{model}: {run['settings']['model']}", table(run["rows"]), ""]
    lines += [f"{'ok ' if ok else 'FAILED'} {key}" for key, ok in run["checks"].items()]
    for bits, layers in run.get("solver_agreement", {}).items():
        for name, v in layers.items():
            lines.append(
                f"solver {bits} {name}: output error presso {v['presso']:.4g}, llm-compressor "
                f"{v['llmc']:.4g}; equal codes {v['equal_codes']:.1%}"
            )
    lines += [f"note: {note}" for note in run.get("notes", [])]
    lines.append(f"settings: {json.dumps(run['settings'])}")
    return "\n".join(lines)


COLUMNS = [  # field, header, width, format of a value
    ("method", "method", 14, "{}"),
    ("bits", "bits", 4, "{}"),
    ("group_size", "group", 5, "{}"),
    ("sparsity", "sparsity", 8, "{:.2f}"),
    ("ppl", "ppl", 8, "{:.3f}"),
    ("ppl_spread", "±", 6, "{:.2f}"),
    ("ppl_ratio", "ratio", 6, "{:.3f}"),
    ("ppl_lic", "ppl lic", 8, "{:.3f}"),
    ("ppl_lic_spread", "±", 6, "{:.2f}"),
    ("ppl_lic_ratio", "ratio", 6, "{:.3f}"),
    ("avg_bits", "avg bits", 8, "{:.3f}"),
    ("artifact_bytes", "MB", 7, "{:.1f}"),
    ("wall_s_1w", "s 1w", 7, "{:.1f}"),
    ("wall_s_2w", "s 2w", 7, "{:.1f}"),
]


def table(rows: list[dict], header: bool = True) -> str:
    def cell(key, fmt, value):
        if value is None:  # not applicable, or not measured in the run that made the row
            return "—"
        return fmt.format(value / 1e6 if key == "artifact_bytes" else value)

    lines = ["  ".join(head.rjust(width) for _, head, width, _ in COLUMNS)] if header else []
    for row in rows:
        lines.append("  ".join(cell(k, f, row.get(k)).rjust(w) for k, _, w, f in COLUMNS))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
