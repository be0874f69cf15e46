"""The recover stage: distill a compressed model back toward its dense teacher on Ray Train workers.

Each worker receives the dense teacher and the recoverable student (see
:mod:`presso.compressors.recovery`: integer codes and sparsity masks fixed, the chosen continuous
parts learning), wraps the student in the train stage's :class:`DDPEngine` (its gradient
compression included) and minimizes the KL from the teacher's logits, computed on the fly, to the
student's, on train-split batches that depend only on ``(seed, step, rank)``. Checkpoints,
restarts and resume are the train stage's. The driver writes the learned records as an artifact
in the same packed format and keeps it only if its validation perplexity is no worse than the
original's.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from presso import IntegrityError
from presso.compressors.recovery import export_records, kd_loss, make_recoverable
from presso.orchestrator import checkpoint
from presso.orchestrator.config import PressoConfig, to_dict
from presso.orchestrator.data import train_batch
from presso.orchestrator.engine import DDPEngine
from presso.orchestrator.train import (
    _mean_across_ranks,
    _val_loss,
    fit_on_workers,
    lr_at,
    replicas_identical,
    report_checkpoint,
    resume,
    start_worker,
)


def recover_worker(config: dict) -> None:
    """The loop each Ray Train worker runs."""
    import ray

    w = start_worker(config, "recover")
    cfg, r, rank, world, device, log = w.cfg, w.cfg.recover, w.rank, w.world, w.device, w.log
    train_tokens, val_tokens = w.train_tokens, w.val_tokens
    teacher = ray.get(config["teacher"]).to(device).eval()
    student = ray.get(config["student"]).to(device).train()
    engine = DDPEngine(student, r, device)
    start = resume(engine, w, r.resume_from)
    if start and rank == 0:
        print(f"presso: recover resumed from the checkpoint at step {start}", flush=True)
    if start == 0:  # the student's val loss before any step: where the recovery starts from
        log.add({"recover/val_loss": _val_loss(student, val_tokens, r, rank, world, device)}, 0)

    tokens_per_step = r.batch_size * r.seq_len * world
    for step in range(start, r.steps):
        checkpoint.maybe_inject_fault(config["fault"], step, rank, Path(config["markers"]))
        tick = time.perf_counter()
        batch = train_batch(train_tokens, step, rank, world, r.batch_size, r.seq_len, cfg.run.seed)
        inputs = batch[:, :-1].to(device)
        with torch.no_grad():
            target = teacher(inputs).logits
        loss = kd_loss(engine(inputs), target, r.temperature)
        lr = lr_at(step, r)
        comm = engine.step(loss, lr)
        (mean_loss,) = _mean_across_ranks(loss.item())
        done = step + 1
        seconds = time.perf_counter() - tick
        metrics = {
            "recover/kd_loss": mean_loss,
            "recover/lr": lr,
            "recover/tokens_per_s": tokens_per_step / seconds,
            **comm,
        }
        evaluate = done % r.eval_every == 0 or done == r.steps
        if evaluate:
            metrics["recover/val_loss"] = _val_loss(student, val_tokens, r, rank, world, device)
            if rank == 0:
                print(
                    f"presso: recover step {done}/{r.steps} kd {mean_loss:.4f} "
                    f"val {metrics['recover/val_loss']:.4f} {tokens_per_step / seconds:.0f} tok/s",
                    flush=True,
                )
        if done == r.steps:
            metrics["recover/replicas_identical"] = float(replicas_identical(student))
        log.add(metrics, done, flush=evaluate)
        if done % r.checkpoint_every == 0 or done == r.steps:
            report_checkpoint(engine, w, done, metrics, final=False)


def _dense_skeleton(teacher: torch.nn.Module, student: torch.nn.Module, records: dict):
    """A dense model holding the student's parameters outside the compressed layers (learned
    norms included): what ``save_compressed`` writes beside the records."""
    skeleton = copy.deepcopy(teacher)
    prefixes = tuple(f"{name}." for name in records)
    own = {k: v for k, v in student.state_dict().items() if not k.startswith(prefixes)}
    missing, unexpected = skeleton.load_state_dict(own, strict=False)
    if unexpected or any(not k.startswith(prefixes) for k in missing):
        raise IntegrityError(
            f"recover: the artifact does not match the dense model (unexpected {unexpected[:3]}, "
            f"missing {[k for k in missing if not k.startswith(prefixes)][:3]})"
        )
    return skeleton


@dataclass
class Recovery:
    artifact: Path | None  # the recovered artifact; None when the original was kept
    val_ppl_before: float
    val_ppl_after: float
    tokens: int  # tokens distilled (all workers)
    wall_s: float


def run_recovery(cfg: PressoConfig, plan, artifact: Path, logger, dest: Path) -> Recovery:
    """Distill the artifact at ``artifact`` toward ``plan.model``; writes the recovered artifact
    to ``dest`` if it is no worse on the val split than the original."""
    import ray

    import presso
    from presso.compressors.formats.artifact import WEIGHTS, read_records, save_compressed
    from presso.orchestrator.evaluate import perplexity
    from presso.orchestrator.models import storage_dtype

    r, e = cfg.recover, cfg.eval
    records = read_records(artifact)
    original = presso.load_compressed(artifact, dtype=torch.float32)  # learns in fp32
    student = make_recoverable(copy.deepcopy(original), records, r.learn)
    tick = time.perf_counter()
    loop_config = {
        "cfg": to_dict(cfg),
        "train": ray.put(plan.corpus.train),
        "val": ray.put(plan.corpus.val),
        "teacher": ray.put(plan.model),
        "student": ray.put(student),
        "logger": logger,
        "fault": _fault(),
    }
    result = fit_on_workers(cfg, "recover", recover_worker, loop_config, plan.storage, plan.out)
    wall_s = time.perf_counter() - tick
    with result.checkpoint.as_directory() as d:
        student.load_state_dict(checkpoint.final_state(Path(d)))
    learned = export_records(student, records)
    tokens = r.steps * r.batch_size * r.seq_len * r.workers
    settings = {"steps": r.steps, "tokens": tokens, "learn": list(r.learn), "lr": r.optimizer.lr}
    settings.update(temperature=r.temperature, workers=r.workers, teacher="dense model")
    skeleton = _dense_skeleton(plan.model, student, records)
    save_compressed(
        skeleton, learned, dest, plan.tokenizer,
        dtype=storage_dtype(cfg.compress.dtype, plan.source), metadata={"recovery": settings},
    )  # fmt: skip
    sizes = [(folder / WEIGHTS).stat().st_size for folder in (artifact, dest)]
    if sizes[0] != sizes[1]:  # same records, same dtypes and shapes: a bug if not
        raise IntegrityError(f"recover: weights {sizes[0]:,} bytes became {sizes[1]:,}")

    def val_ppl(model) -> float:
        return perplexity(model, plan.corpus.val, e.seq_len, e.max_tokens, e.batch_size).perplexity

    before, after = val_ppl(original), val_ppl(presso.load_compressed(dest, dtype=torch.float32))
    kept = after <= before
    if not kept:
        shutil.rmtree(dest)
    return Recovery(dest if kept else None, before, after, tokens, wall_s)


def _fault() -> str | None:
    return os.environ.get("PRESSO_INJECT_RECOVER_FAULT")  # test hook: "RANK:STEP"


def recover_stage(cfg: PressoConfig, plan, tracking, summary: dict, artifact: Path) -> Path | None:
    """The ``recover`` nested run: KD loss curve, before/after val perplexity, the verdict.
    Returns the recovered artifact, or None when the original is kept."""
    from presso.orchestrator.pipeline import RECOVERED
    from presso.orchestrator.tracking import plot_curves

    r = cfg.recover
    run = tracking.stage("recover")
    rec = run_recovery(cfg, plan, artifact, run, plan.out / RECOVERED)
    run.metrics(
        {
            "recover/val_ppl_before": rec.val_ppl_before,
            "recover/val_ppl_after": rec.val_ppl_after,
            "recover/kept": float(rec.artifact is not None),
            "recover/tokens": rec.tokens,
            "recover/wall_s": rec.wall_s,
        },
        r.steps,
    )
    plot_curves(run, ["recover/kd_loss"], "KD loss (KL to the dense teacher)", "kd_loss.png")
    run.finish()
    verdict = "kept" if rec.artifact is not None else "worse on val: the original is kept"
    print(
        f"presso: recover {r.steps} steps in {rec.wall_s:.0f} s, val ppl "
        f"{rec.val_ppl_before:.4f} → {rec.val_ppl_after:.4f} ({verdict})",
        flush=True,
    )
    summary.update(
        recover_steps=r.steps,
        recover_s=rec.wall_s,
        recover_val_ppl_before=rec.val_ppl_before,
        recover_val_ppl_after=rec.val_ppl_after,
        recovery_kept=rec.artifact is not None,
    )
    return rec.artifact
