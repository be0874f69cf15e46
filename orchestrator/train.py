"""The train stage: data-parallel training of a causal LM on Ray Train workers.

Each worker builds the same model and hands it to an engine (DDP with an optional compressing
comm hook, or DeepSpeed ZeRO; gloo on CPUs, nccl on GPUs), then steps through batches that depend
only on ``(seed, step, rank)``. Rank 0 logs to MLflow; every rank writes its part of each
checkpoint (sha256 manifests) through ``ray.train.report``, and a restarted worker group resumes
from the latest complete one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from presso import PressoError, StageError, disk_full
from presso.orchestrator import checkpoint
from presso.orchestrator.config import PressoConfig, TrainConfig, to_dict
from presso.orchestrator.data import train_batch, windows
from presso.orchestrator.engine import build_engine
from presso.orchestrator.models import build_scratch, load_pretrained
from presso.orchestrator.tracking import RunLogger


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    peak, warm = cfg.optimizer.lr, cfg.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _build_model(cfg: PressoConfig, vocab_size: int, source: str | None):
    if source is None:
        return build_scratch(cfg.model.scratch, vocab_size, cfg.train.seq_len, cfg.run.seed)
    return load_pretrained(Path(source))[0]


def _mean_across_ranks(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def _val_loss(model, val: torch.Tensor, cfg: TrainConfig, rank: int, world: int, device) -> float:
    """Mean NLL over a fixed set of val windows, each rank taking its share."""
    model.eval()
    per_rank = cfg.eval_batches * cfg.batch_size
    all_windows = windows(val, cfg.seq_len + 1)[: per_rank * world]
    nll = torch.zeros(2, dtype=torch.float64)
    for batch in all_windows[rank::world].split(cfg.batch_size):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        nll[0] += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll[1] += batch[:, 1:].numel()
    dist.all_reduce(nll)
    model.train()
    return (nll[0] / nll[1]).item()


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (DDP's promise; a cheap end check)."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


class MetricsBuffer:
    """Rank 0's metrics, sent to MLflow in batches (every 10 steps and at each evaluation)."""

    def __init__(self, logger: RunLogger | None) -> None:
        self.logger, self.pending = logger, []

    def add(self, values: dict[str, float], step: int, flush: bool = False) -> None:
        if self.logger is None:
            return
        self.pending.append((values, step))
        if flush or len(self.pending) >= 10:
            for v, s in self.pending:
                self.logger.metrics(v, s)
            self.pending.clear()


def log_comm_plots(logger: RunLogger, layers: list[str]) -> None:
    """Bytes sent per step against dense, and the per-layer choices over time (a heat map)."""
    from presso.orchestrator.plots import plot_bytes_per_step, plot_layer_choices

    sent, dense = logger.history("comm/bytes_sent"), dict(logger.history("comm/dense_bytes"))
    if not sent:
        return
    steps = [s for s, _ in sent]
    plot_bytes_per_step(logger, steps, [v for _, v in sent], [dense.get(s, 0.0) for s in steps])
    if layers:
        histories = [dict(logger.history(f"comm/choice/{name}")) for name in layers]
        choices = [[h.get(s, float("nan")) for s in steps] for h in histories]
        plot_layer_choices(logger, layers, steps, choices, label="parameter")


def _step_metrics(loss: float, lr: float, seconds: float, tokens: int, comm: dict) -> dict:
    return {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens / seconds, **comm}


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` call, metrics and all, at INFO; presso prints its
    own progress lines. Ray names that logger by its file's path, so the usual logger names and
    ``LoggingConfig(log_level=...)`` do not reach it."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


@dataclass
class Worker:
    """What a Ray Train worker of the train or recover stage starts from."""

    cfg: PressoConfig
    rank: int
    world: int
    device: torch.device
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    log: MetricsBuffer  # rank 0 logs to the stage's MLflow run; the others log nothing


def start_worker(config: dict, stage: str) -> Worker:
    """Join the stage's worker group: quiet Ray Train's report logging, take the config, the
    thread count, this worker's rank and device and the token splits (from the object store)."""
    import ray
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports()
    cfg: PressoConfig = OmegaConf.to_object(OmegaConf.merge(PressoConfig, config["cfg"]))
    torch.set_num_threads(getattr(cfg, stage).threads_per_worker)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    return Worker(
        cfg, rank, ctx.get_world_size(), ray.train.torch.get_device(),
        ray.get(config["train"]), ray.get(config["val"]),
        MetricsBuffer(config["logger"] if rank == 0 else None),
    )  # fmt: skip


def resume(engine, w: Worker, resume_from: str | None) -> int:
    """Restore Ray Train's own checkpoint after a restart, else ``resume_from`` (Ray Train 2
    refuses the trainer's resume_from_checkpoint argument: it is deprecated there); returns the
    step to go on from (0 when there is nothing to resume)."""
    import ray.train

    saved = ray.train.get_checkpoint()
    if saved is None and resume_from:
        saved = ray.train.Checkpoint(resume_from)
    if saved is None:
        return 0
    with saved.as_directory() as d:
        return checkpoint.restore(Path(d), engine, w.rank, w.world)


def report_checkpoint(engine, w: Worker, step: int, metrics: dict, final: bool) -> None:
    """Write this rank's part of the checkpoint at ``step`` and hand it to Ray Train, which
    stores it under the stage's storage path."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(Path(tmp), engine, step, w.rank, w.world, final=final)
        ray.train.report(
            {"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )


def train_worker(config: dict) -> None:
    """The loop each Ray Train worker runs."""
    w = start_worker(config, "train")
    cfg, t, rank, world, device, log = w.cfg, w.cfg.train, w.rank, w.world, w.device, w.log
    train_tokens, val_tokens = w.train_tokens, w.val_tokens
    model = _build_model(cfg, config["vocab_size"], config["source"]).to(device)
    engine = build_engine(model, t, device)
    start = resume(engine, w, t.resume_from)
    if start and rank == 0:
        print(f"presso: resumed from the checkpoint at step {start}", flush=True)
        log.add({"train/resumed_from_step": start}, start)
    if start == 0:  # the loss before any step: the baseline the curve falls from
        log.add({"val/loss": _val_loss(model, val_tokens, t, rank, world, device)}, 0)

    tokens_per_step = t.batch_size * t.seq_len * world
    for step in range(start, t.steps):
        checkpoint.maybe_inject_fault(config["fault"], step, rank, Path(config["markers"]))
        tick = time.perf_counter()
        batch = train_batch(train_tokens, step, rank, world, t.batch_size, t.seq_len, cfg.run.seed)
        batch = batch.to(device)
        logits = engine(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        comm = engine.step(loss, lr_at(step, t))
        (mean_loss,) = _mean_across_ranks(loss.item())
        done = step + 1
        metrics = _step_metrics(
            mean_loss, lr_at(step, t), time.perf_counter() - tick, tokens_per_step, comm
        )
        evaluate = done % t.eval_every == 0 or done == t.steps
        if evaluate:
            metrics["val/loss"] = _val_loss(model, val_tokens, t, rank, world, device)
            metrics["train/optimizer_state_bytes"] = engine.optimizer_state_bytes()
            metrics["train/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if rank == 0:
                print(
                    f"presso: step {done}/{t.steps} loss {mean_loss:.4f} "
                    f"val {metrics['val/loss']:.4f} {metrics['train/tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
        if done == t.steps:
            metrics["train/replicas_identical"] = float(replicas_identical(model))
        log.add(metrics, done, flush=evaluate)
        if done == t.steps and log.logger is not None:
            log_comm_plots(log.logger, sorted(engine.choices()))

        if done % t.checkpoint_every == 0 or done == t.steps:
            report_checkpoint(engine, w, done, metrics, final=done == t.steps)


def run_training(
    cfg: PressoConfig,
    corpus,
    vocab_size: int,
    source: Path | None,
    logger,
    out: Path,
    storage: str | None = None,
) -> Path:
    """Train on Ray Train, checkpointing under ``storage`` (default ``out``); returns the folder
    of the trained model (a Hugging Face folder) under ``out``."""
    import ray

    loop_config = {
        "cfg": to_dict(cfg),
        "train": ray.put(corpus.train),
        "val": ray.put(corpus.val),
        "vocab_size": vocab_size,
        "source": str(source) if source else None,
        "logger": logger,
        "fault": os.environ.get("PRESSO_INJECT_FAULT"),  # test hook: "RANK:STEP"
    }
    result = fit_on_workers(cfg, "train", train_worker, loop_config, storage or str(out), out)
    dest = out / "trained"
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(checkpoint.final_model(Path(d)), dest)
    return dest


def fit_on_workers(
    cfg: PressoConfig, stage: str, worker, loop_config: dict, storage: str, out: Path
):
    """Run ``worker`` on Ray Train workers as the ``stage`` section of ``cfg`` (train or recover:
    workers, threads, GPU, restarts, resume) says, checkpointing under
    ``<storage>/ray_<stage>`` (a folder or a URI); returns Ray Train's result. ``loop_config``
    gains ``markers``, a folder under the run's local ``out`` (for the fault-injection hook)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = getattr(cfg, stage)
    # Ray Train's run name must be ASCII (it crashes on others); run.name itself may be any text.
    ascii_name = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.run.name).strip("_") or "run"
    name = f"{ascii_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        worker,
        train_loop_config={**loop_config, "markers": str(out / f"ray_{stage}" / name)},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.threads_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=f"{storage}/ray_{stage}",
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _training_failure(e, stage, t.max_failures, f"{storage}/ray_{stage}") from None


def _training_failure(
    error: Exception, stage: str, max_failures: int, checkpoints: str
) -> PressoError:
    """The user's own error if a worker raised one (a bad checkpoint, say), else a one-line
    account of the crash that says what was kept and how to go on."""
    failures = getattr(error, "worker_failures", None) or {}
    causes = [getattr(e, "cause", None) or e for _, e in sorted(failures.items())]
    for cause in causes:
        if isinstance(cause, PressoError):
            return cause
    cause = causes[0] if causes else getattr(error, "controller_failure", None) or error
    if "low on memory" in str(cause):  # Ray's memory monitor killed workers
        lines = [line for line in str(cause).splitlines() if "Memory on the node" in line]
        return StageError(
            f"{stage}: the node ran out of memory and Ray killed the workers "
            f"({lines[0].strip()[:160] if lines else type(cause).__name__}); run fewer "
            f"{stage}.workers per node, stop what else uses its memory, or use a larger node; "
            f"checkpoints so far are kept under {checkpoints}: continue from the newest with "
            f"{stage}.resume_from={checkpoints}"
        )
    if disk_full(cause):
        return StageError(
            f"{stage}: no space left on the device of {checkpoints} while writing a checkpoint; "
            "free space there or set run.storage to a larger disk, then continue from the "
            f"newest complete checkpoint with {stage}.resume_from={checkpoints}"
        )
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    what = f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"
    return StageError(
        f"{stage}: the workers failed after {max_failures} restart(s) ({what}); checkpoints "
        f"so far are kept under {checkpoints}: continue from the newest with "
        f"{stage}.resume_from={checkpoints}, or allow more restarts with {stage}.max_failures"
    )
