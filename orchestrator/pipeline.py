"""The pipeline: train → compress → evaluate → register, each stage a nested MLflow run.

``run_pipeline(cfg, stages)`` is what every entry point calls: ``presso run`` on a laptop, a job
submitted to a Ray cluster, and a KubeRay RayJob all go through here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from presso import ClusterError, ConfigError
from presso.orchestrator.config import PressoConfig, recipe_algorithms

STAGES = ("train", "compress", "eval")
# The compress stage writes here; the artifact moves to ``compressed/`` once the stages after it
# (evaluation, when asked for) have succeeded, so a failed run never leaves one under that name.
UNVERIFIED = ".compressed.unverified"


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


def ensure_ray(cfg: PressoConfig) -> None:
    """Connect to ``ray.address`` / $RAY_ADDRESS, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    if address:
        _check_listening(address, cfg.ray.connect_timeout_s)
        ray.init(address=address, logging_level="WARNING")
    else:
        # A local Ray of presso's own: token auth on (Ray's default) without the warning that
        # says so; no spot-instance preemption to watch for (its watcher logs an error on start).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            include_dashboard=True,  # Ray Train's state API needs it
            logging_level="WARNING",
        )


def ray_address(cfg: PressoConfig) -> str | None:
    """The cluster to join: ``ray.address``, else $RAY_ADDRESS; None means a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def _check_listening(address: str, timeout: float) -> None:
    """Fail in ``timeout`` seconds, not never, when nothing listens at a ``host:port`` address
    (Ray itself retries the connection without end)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():  # "auto" and the like: Ray finds the cluster itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({e.strerror or e}; waited up to {timeout:g} s, "
            "ray.connect_timeout_s): start one with `ray start --head`, or unset RAY_ADDRESS and "
            "ray.address to let presso start a local Ray"
        ) from None


def wait_for_resources(cfg: PressoConfig, cpus: float, gpus: float, asked_by: str) -> None:
    """Wait up to ``ray.resources_timeout_s`` until the cluster holds ``cpus`` and ``gpus`` in
    all (an autoscaler may add nodes); a local Ray cannot grow, so it is refused at once.
    Without this check Ray waits forever for resources that will never come."""
    import ray

    local = ray_address(cfg) is None
    deadline = time.monotonic() + (0 if local else cfg.ray.resources_timeout_s)
    while True:
        total = ray.cluster_resources()
        have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
        if have_cpus >= cpus and have_gpus >= gpus:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    waited = "" if local else f" after {cfg.ray.resources_timeout_s:g} s (ray.resources_timeout_s)"
    raise ClusterError(
        f"{asked_by}: asks for {cpus:g} CPUs and {gpus:g} GPUs, but the Ray cluster has "
        f"{have_cpus:g} CPUs and {have_gpus:g} GPUs{waited}; ask for less or use a larger cluster"
    )


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
    out: Path
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
    recipe = None
    if "compress" in stages:
        budgeted = cfg.compress.budget is not None
        recipe = measuring_recipe(cfg) if budgeted else Recipe.parse(recipe_algorithms(cfg))
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
    if "train" in stages and cfg.train.resume_from:
        checkpoint.check_resumable(Path(cfg.train.resume_from), model, cfg.train.workers)
    layers = calibration = None
    if recipe is not None:
        layers = plan_layers(model, recipe, cfg.compress.ignore)
        if cfg.compress.budget is not None:
            check_budget(cfg, model, tokenizer, models.storage_dtype(cfg.compress.dtype, source))
        if recipe.needs_data:
            k = cfg.compress.calibration
            calibration = calibration_batches(
                corpus.train, k.samples, k.seq_len, k.batch_size, k.seed
            )
    out = Path(cfg.run.output_dir).resolve() / cfg.run.name
    return Preflight(
        stages,
        out,
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
    from presso.orchestrator.models import load_pretrained
    from presso.orchestrator.tracking import Tracking

    quiet_environment()
    enabled = {
        "train": cfg.train.enabled,
        "compress": cfg.compress.enabled,
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
    tracking = Tracking(cfg)
    parent = tracking.start()
    summary: dict = {"run_id": parent.run_id, "tracking_uri": tracking.uri}
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
        print(f"presso: {_kept(plan, summary)}", file=sys.stderr, flush=True)
        raise
    finally:
        tracking.summary(summary)
        tracking.finish(error)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _kept(plan: Preflight, summary: dict) -> str:
    """What a failed pipeline leaves behind, for the user to go on from."""
    kept = []
    if (plan.out / "ray_train").is_dir():
        kept.append(
            f"training checkpoints under {plan.out / 'ray_train'} (resume with "
            "train.resume_from=<checkpoint folder>)"
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

    t = cfg.train
    wait_for_resources(
        cfg,
        t.workers * t.threads_per_worker,
        t.workers if t.use_gpu else 0,
        "train.workers × train.threads_per_worker"
        + (" (train.use_gpu: one GPU each)" if t.use_gpu else ""),
    )
    run = tracking.stage("train")
    tick = time.perf_counter()
    folder = run_training(cfg, plan.corpus, plan.vocab_size, plan.source, run, plan.out)
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
    if "eval" in stages:
        run = tracking.stage("eval")
        e = cfg.eval
        bar = progress_bar()
        test = plan.corpus.test
        kind = "compressed" if packed_source else "dense"
        first = perplexity(model, test, e.seq_len, e.max_tokens, e.batch_size, bar)
        values = {
            f"eval/{kind}_ppl": first.perplexity,
            f"eval/{kind}_tokens_per_s": first.tokens_per_s,
        }
        summary.update(
            {
                f"{kind}_ppl": first.perplexity,
                f"{kind}_tokens_per_s": first.tokens_per_s,
                "eval_tokens": first.tokens,
            }
        )
        if artifact is not None:
            packed = presso.load_compressed(artifact, dtype=torch.float32)
            comp = perplexity(packed, test, e.seq_len, e.max_tokens, e.batch_size, bar)
            values.update(
                {
                    "eval/compressed_ppl": comp.perplexity,
                    "eval/compressed_tokens_per_s": comp.tokens_per_s,
                }
            )
            summary.update(
                compressed_ppl=comp.perplexity, compressed_tokens_per_s=comp.tokens_per_s
            )
        run.metrics(values, 0)
        run.finish()
    if artifact is not None:
        replace_folder(artifact, plan.out / "compressed")
        artifact = plan.out / "compressed"
        summary["artifact"] = str(artifact)
    if artifact is not None and cfg.tracking.register:
        run = tracking.stage("register")
        name = cfg.tracking.registered_model or f"{cfg.run.name}-compressed"
        summary["registered_model"] = name
        registered = register_model(run, artifact, name, summary.get("compressed_ppl"))
        summary.update(model_version=registered.version or "spooled", champion=registered.champion)
        run.finish()
