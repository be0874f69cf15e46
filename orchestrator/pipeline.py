"""The pipeline: train → compress → evaluate → register, each stage a nested MLflow run.

``run_pipeline(cfg, stages)`` is what every entry point calls: ``presso run`` on a laptop, a job
submitted to a Ray cluster, and a KubeRay RayJob all go through here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from presso import ConfigError
from presso.orchestrator import storage
from presso.orchestrator.config import PressoConfig, model_architecture, recipe_algorithms

STAGES = ("train", "compress", "recover", "eval")
# The compress stage writes here; the artifact moves to ``compressed/`` once the stages after it
# (evaluation, when asked for) have succeeded, so a failed run never leaves one under that name.
UNVERIFIED = ".compressed.unverified"
RECOVERED = ".recovered.unverified"  # the recover stage's output, under the same rule


def quiet_environment() -> None:
    """Settings every presso process wants, before Ray, MLflow or DeepSpeed are imported."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # progress bars belong on a terminal, not in logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already: its bars read the variable once
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else worker lines print twice
    # MLflow: no "Creating initial database tables" or artifact progress bars.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def progress_bar():
    """tqdm on a terminal; elsewhere none (the stages print plain log lines)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm


def check_stages(cfg: PressoConfig, stages: tuple[str, ...]) -> None:
    """Combinations that cannot work, refused before anything starts."""
    needs_model = "compress" in stages or "eval" in stages
    if cfg.model.source == "scratch" and "train" not in stages and needs_model:
        raise ConfigError(
            "model.source: a scratch model must be trained first; enable train or set "
            "model.source to smollm2 or a model folder"
        )
    if "recover" in stages and "compress" not in stages:
        raise ConfigError(
            "recover.enabled: recovery trains the artifact the compress stage makes toward the "
            "dense model; enable compress too"
        )
    if cfg.model.source != "scratch" and cfg.data.tokenizer != "auto":
        raise ConfigError("data.tokenizer: a pretrained model.source brings its own; use auto")


def _tokenizer(cfg: PressoConfig, source: Path | None):
    """``(tokenizer, vocab size)``: bytes or SmolLM2's for scratch models, else the model's own."""
    from presso.orchestrator.data import ByteTokenizer
    from presso.orchestrator.models import smollm2_folder

    if source is None and cfg.data.tokenizer in ("auto", "bytes"):
        return ByteTokenizer(), ByteTokenizer.vocab_size
    if source is not None and ByteTokenizer.saved_in(source):
        return ByteTokenizer(), ByteTokenizer.vocab_size
    from transformers import AutoTokenizer

    folder = source if source is not None else smollm2_folder()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.source {folder}: no tokenizer files in it ({type(e).__name__}); save the "
            "model's tokenizer into the folder (tokenizer.save_pretrained)"
        ) from None
    return tokenizer, len(tokenizer)


def check_windows(cfg: PressoConfig, corpus, stages: tuple[str, ...]) -> None:
    """Window lengths against the splits they cut: refused here, not after hours of work."""
    t, e = cfg.train, cfg.eval
    if "train" in stages:
        for split, tokens in (("val", corpus.val), ("train", corpus.train)):
            if tokens.numel() <= t.seq_len + 1:
                raise ConfigError(
                    f"train.seq_len: {t.seq_len} tokens, but the {split} split holds "
                    f"{tokens.numel():,}; shorten train.seq_len or add works to the {split} split"
                )
    usable = min(corpus.test.numel(), e.max_tokens)
    if "eval" in stages and usable < e.seq_len:
        raise ConfigError(
            f"eval.seq_len: {e.seq_len} tokens, but the test split holds "
            f"{corpus.test.numel():,} (eval.max_tokens {e.max_tokens:,}); shorten eval.seq_len "
            "or raise eval.max_tokens / add works to data.test_works"
        )


@dataclass
class Preflight:
    """Everything checked and loaded before a run starts or writes anything."""

    stages: tuple[str, ...]
    out: Path  # the run's folder under run.output_dir: the driver's working copy
    storage: str  # where checkpoints and the finished run are kept: out itself, or run.storage's
    source: Path | None  # pretrained model folder; None for a scratch model
    tokenizer: object
    vocab_size: int
    corpus: object
    recipe: object | None  # the compress recipe (presso.compressors.ptq.Recipe)
    layers: object | None  # the layers it compresses, checked (ptq.blocks.BlockLayers)
    calibration: list | None  # batches of train-split token ids, when the recipe needs data
    model: object | None  # the loaded pretrained (or packed) model, when there is one


def preflight(cfg: PressoConfig, stages: tuple[str, ...]) -> Preflight:
    """Resolve and check the sources, the corpus, the checkpoint and every layer the recipe will
    compress, so that bad input fails here: before Ray, MLflow or any output folder."""
    import torch

    from presso import load_compressed
    from presso.compressors.ptq import Recipe
    from presso.orchestrator import checkpoint, data, models
    from presso.orchestrator.budget import check_budget, measuring_recipe
    from presso.orchestrator.compress import calibration_batches, plan_layers

    check_stages(cfg, stages)
    kept = storage.run_folder(cfg.run.storage, cfg.run.output_dir, cfg.run.name)
    if cfg.run.storage:
        try:
            storage.check_writable(kept)
        except Exception as e:  # pyarrow raises OSError, ValueError, ArrowInvalid, ...
            raise ConfigError(
                f"run.storage {cfg.run.storage}: cannot write there ({str(e).splitlines()[0]}); "
                "give a folder every node mounts or a reachable URI (an S3-compatible server "
                "needs AWS_ENDPOINT_URL and credentials in the environment)"
            ) from None
    recipe = None
    if "compress" in stages:
        budgeted = cfg.compress.budget is not None
        recipe = (
            measuring_recipe(cfg.compress.candidates)
            if budgeted
            else Recipe.parse(recipe_algorithms(cfg))
        )
    source = models.resolve_source(cfg.model)
    packed = source is not None and models.is_artifact(source)
    if packed and ("compress" in stages or "train" in stages):
        raise ConfigError(
            f"model.source {source}: already a packed artifact; it can only be evaluated"
        )
    tokenizer, vocab_size = _tokenizer(cfg, source)
    works = data.load_works(cfg.data.path)
    splits = data.split_works(works, cfg.data.val_works, cfg.data.test_works)
    corpus = data.build_corpus(works, splits, tokenizer)
    check_windows(cfg, corpus, stages)
    if packed:  # evaluated on the CPU: computed in fp32, whatever the storage dtype
        model = load_compressed(source, dtype=torch.float32)
    elif source is not None:
        model = models.load_pretrained(source)[0]
    else:
        model = models.build_scratch(cfg.model.scratch, vocab_size, cfg.train.seq_len, cfg.run.seed)
    for stage, resumed_model in (("train", model), ("recover", None)):
        section = getattr(cfg, stage)
        if stage in stages and section.resume_from:
            chosen, skipped = checkpoint.resolve_resume(
                section.resume_from,
                section.workers,
                resumed_model,
                f"{stage}.resume_from",
                section.steps,
            )
            for note in skipped:
                print(f"presso: skipping a damaged checkpoint: {note}", file=sys.stderr)
            section.resume_from = chosen  # what the run resumes from, as logged
            print(f"presso: {stage} resumes from {chosen}", flush=True)
    layers = calibration = None
    if recipe is not None:
        layers = plan_layers(model, recipe, cfg.compress.ignore, model_architecture(cfg))
        if cfg.compress.budget is not None:
            check_budget(cfg, model, tokenizer, models.storage_dtype(cfg.compress.dtype, source))
        if recipe.needs_data:
            k = cfg.compress.calibration
            calibration = calibration_batches(
                corpus.train, k.samples, k.seq_len, k.batch_size, k.seed, corpus.bos
            )
    out = Path(cfg.run.output_dir).resolve() / cfg.run.name
    return Preflight(
        stages,
        out,
        kept,
        source,
        tokenizer,
        vocab_size,
        corpus,
        recipe,
        layers,
        calibration,
        None if source is None else model,
    )


def run_pipeline(cfg: PressoConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run the requested and enabled ``stages`` of a validated config; returns the summary."""
    from presso.orchestrator.cluster import check_resources, check_shared, ensure_ray
    from presso.orchestrator.models import load_pretrained
    from presso.orchestrator.tracking import Tracking

    quiet_environment()
    enabled = {
        "train": cfg.train.enabled,
        "compress": cfg.compress.enabled,
        "recover": cfg.recover.enabled,
        "eval": cfg.eval.enabled,
    }
    plan = preflight(cfg, tuple(s for s in stages if enabled[s]))
    c = plan.corpus
    print(
        f"presso: corpus {len(c.splits['train']) + len(c.splits['val']) + len(c.splits['test'])} "
        f"works; tokens train {c.train.numel():,} val {c.val.numel():,} test {c.test.numel():,}",
        flush=True,
    )
    ensure_ray(cfg)
    check_resources(cfg, plan.stages)
    if not storage.is_uri(plan.storage):
        check_shared(Path(plan.storage), "run.storage" if cfg.run.storage else "run.output_dir")
    tracking = Tracking(cfg)
    parent = tracking.start()
    summary: dict = {"run_id": parent.run_id, "tracking_uri": tracking.uri}
    if plan.storage != str(plan.out):
        summary["storage"] = plan.storage
    error = None
    try:
        if "train" in plan.stages:
            folder = _train(cfg, plan, tracking, summary)
            plan.model = load_pretrained(folder)[0]
        if "compress" in plan.stages or "eval" in plan.stages:
            _compress_and_eval(cfg, plan, tracking, summary)
    except BaseException as e:
        error = e
        shutil.rmtree(plan.out / UNVERIFIED, ignore_errors=True)
        shutil.rmtree(plan.out / RECOVERED, ignore_errors=True)
        print(f"presso: {_kept(plan, summary)}", file=sys.stderr, flush=True)
        raise
    finally:
        _close_tracking(tracking, summary, error)
        _store(plan, summary, error)
    return summary


def _store(plan: Preflight, summary: dict, error: BaseException | None) -> None:
    """Write the summary, and copy the run's folder to run.storage when that is elsewhere
    (after a failure too: the spool and an evaluated artifact are worth keeping). A failure to
    copy after a failure is reported, never raised over the cause."""
    try:
        if error is None:
            plan.out.mkdir(parents=True, exist_ok=True)
            (plan.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if plan.storage != str(plan.out) and plan.out.is_dir():
            storage.upload(plan.out, plan.storage)
            print(f"presso: stored the run in {plan.storage}", flush=True)
    except Exception as e:
        if error is None:
            raise
        print(f"presso: could not store the run in {plan.storage}: {e}", file=sys.stderr)


def _close_tracking(tracking, summary: dict, error: BaseException | None) -> None:
    """Log the summary and end the runs. After a failure, a failure to record it (the disk that
    filled up holds the MLflow store, say) is reported, never raised over the cause."""
    for close in (lambda: tracking.summary(summary), lambda: tracking.finish(error)):
        try:
            close()
        except Exception as e:
            if error is None:
                raise
            print(f"presso: could not record the failure in MLflow: {e}", file=sys.stderr)


def _kept(plan: Preflight, summary: dict) -> str:
    """What a failed pipeline leaves behind, for the user to go on from."""
    kept = []
    for stage in ("train", "recover"):
        if storage.is_dir(folder := f"{plan.storage}/ray_{stage}"):
            kept.append(
                f"{stage} checkpoints under {folder} (continue from the newest with "
                f"{stage}.resume_from={folder})"
            )
    if summary.get("artifact") == str(plan.out / "compressed"):
        kept.append(f"the evaluated, unregistered artifact {plan.out / 'compressed'}")
    return "kept: " + ("; ".join(kept) if kept else "nothing") + "; no unevaluated artifact"


def describe(recipe) -> str:
    """``awq(bits=4, ...) + gptq(bits=4, ...)``: the recipe's steps and their settings."""
    from dataclasses import fields

    steps = [*recipe.transforms]
    if recipe.solver not in steps:
        steps.append(recipe.solver)
    if recipe.embedding is not None:
        steps.append(recipe.embedding)
    return " + ".join(
        f"{a.name}({', '.join(f'{f.name}={getattr(a, f.name)}' for f in fields(a))})" for a in steps
    )


def _train(cfg, plan: Preflight, tracking, summary) -> Path:
    from presso.orchestrator.tracking import plot_curves
    from presso.orchestrator.train import run_training

    run = tracking.stage("train")
    tick = time.perf_counter()
    folder = run_training(
        cfg, plan.corpus, plan.vocab_size, plan.source, run, plan.out, plan.storage
    )
    plan.tokenizer.save_pretrained(folder)
    losses = run.history("train/loss")
    vals = run.history("val/loss")
    summary.update(
        steps=cfg.train.steps,
        train_loss=losses[-1][1] if losses else None,
        val_loss_start=vals[0][1] if vals else None,
        val_loss=vals[-1][1] if vals else None,
        train_s=time.perf_counter() - tick,
    )
    plot_curves(run, ["train/loss", "val/loss"], "loss", "loss.png")
    run.finish()
    return folder


def _compress(cfg, plan: Preflight, tracking, summary) -> Path:
    """Compress ``plan.model`` (a copy of it) and save the artifact; returns its folder."""
    from presso.compressors.formats.artifact import save_compressed
    from presso.orchestrator.compress import run_compression
    from presso.orchestrator.models import storage_dtype

    run = tracking.stage("compress")
    c = cfg.compress
    chosen = None
    if c.budget is not None:
        from presso.orchestrator.budget import check_artifact, run_budget

        result, chosen = run_budget(cfg, plan, run, progress_bar())
    else:
        result = run_compression(
            plan.model,
            plan.recipe,
            c.workers,
            c.ignore,
            progress_bar(),
            plan.calibration,
            c.calibration.shards,
            c.threads_per_worker,
            plan.layers,
        )
    dtype = storage_dtype(c.dtype, plan.source)
    info = save_compressed(
        result.model, result.records, plan.out / UNVERIFIED, plan.tokenizer, dtype
    )
    if chosen is not None:
        check_artifact(chosen, info.artifact_bytes, c.budget)
    for i, layer in enumerate(result.layers):
        run.metrics(
            {
                "compress/layer_rel_error": layer.rel_error,
                "compress/layer_s": layer.seconds,
                "compress/layer_worker": layer.worker,
            },
            i,
        )
    for w, seconds in enumerate(result.worker_s):
        run.metrics({"compress/worker_busy_s": seconds}, w)
    run.metrics(
        {
            "compress/artifact_bytes": info.artifact_bytes,
            "compress/avg_bits": info.avg_bits,
            "compress/wall_s": result.wall_s,
            "compress/layers": len(result.records),
            "compress/reassigned_tasks": result.reassigned,
        },
        0,
    )
    run.text(json.dumps([vars(r) for r in result.layers], indent=1), "layers.json")
    run.finish()
    summary.update(
        method=describe(plan.recipe)
        if chosen is None
        else f"budget plan: {chosen.describe(top=3)}",
        artifact_bytes=info.artifact_bytes,
        avg_bits=info.avg_bits,
        compress_s=result.wall_s,
    )
    return info.path


def _compress_and_eval(cfg, plan: Preflight, tracking, summary):
    import torch

    import presso
    from presso.compressors.formats.artifact import folder_bytes
    from presso.compressors.formats.integrity import replace_folder
    from presso.orchestrator.evaluate import perplexity
    from presso.orchestrator.models import is_artifact, model_bytes
    from presso.orchestrator.tracking import register_model

    model, stages = plan.model, plan.stages
    packed_source = plan.source is not None and is_artifact(plan.source)
    if packed_source:
        summary.update(artifact=str(plan.source), artifact_bytes=folder_bytes(plan.source))
    else:
        summary["dense_bytes"] = model_bytes(model)
    # The compressed perplexity is measured on the artifact as saved and reloaded, not on the
    # model in memory: what is registered is exactly what was measured.
    artifact = _compress(cfg, plan, tracking, summary) if "compress" in stages else None
    recovered = None
    if artifact is not None and "recover" in stages:
        from presso.orchestrator.recover import recover_stage

        recovered = recover_stage(cfg, plan, tracking, summary, artifact)
    if "eval" in stages:
        run = tracking.stage("eval")
        e = cfg.eval
        bar = progress_bar()
        test = plan.corpus.test
        kind = "compressed" if packed_source else "dense"
        bos = plan.corpus.bos
        measured = [(kind, model), ("compressed", artifact), ("recovered", recovered)]
        values = {}
        for i, (kind, source) in enumerate(measured):
            if source is None:
                continue
            # fp32 on the CPU, as the dense model is measured (the artifact stores half precision)
            m = source if i == 0 else presso.load_compressed(source, dtype=torch.float32)
            result = perplexity(m, test, e.seq_len, e.max_tokens, e.batch_size, bar, bos)
            values[f"eval/{kind}_ppl"] = result.perplexity
            values[f"eval/{kind}_tokens_per_s"] = result.tokens_per_s
            summary.update(
                {
                    f"{kind}_ppl": result.perplexity,
                    f"{kind}_tokens_per_s": result.tokens_per_s,
                    "eval_tokens": result.tokens,
                }
            )
        run.metrics(values, 0)
        run.finish()
    if recovered is not None:  # the recovered artifact replaces the one it was trained from
        summary["recovered_bytes"] = folder_bytes(recovered)
        shutil.rmtree(artifact)
        artifact = recovered
    if artifact is not None:
        replace_folder(artifact, plan.out / "compressed")
        artifact = plan.out / "compressed"
        summary["artifact"] = str(artifact)
    if artifact is not None and cfg.tracking.register:
        run = tracking.stage("register")
        name = cfg.tracking.registered_model or f"{cfg.run.name}-compressed"
        summary["registered_model"] = name
        ppl = summary.get("recovered_ppl", summary.get("compressed_ppl"))
        registered = register_model(run, artifact, name, ppl)
        summary.update(model_version=registered.version or "spooled", champion=registered.champion)
        run.finish()
