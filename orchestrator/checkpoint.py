"""Training checkpoints: one folder per rank, each sealed with a sha256 manifest.

A checkpoint holds, for every rank, the engine's state (model, optimizer, compression state:
error-feedback buffers, per-layer choices, projectors), the step and the RNG state; the data
position is the step itself, because batches are a function of ``(seed, step, rank)``. A
checkpoint is resumed only if every rank's folder is present and matches its manifest and it was
written by the same number of workers; anything else is refused with a message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from presso import ConfigError, IntegrityError
from presso.compressors.formats.integrity import verify_manifest, write_manifest
from presso.orchestrator import storage

FINAL_MODEL = "model"  # the trained model as a Hugging Face folder, in rank 0's final checkpoint


def rank_folder(root: Path, rank: int) -> Path:
    return root / f"rank{rank}"


def save(root: Path, engine, step: int, rank: int, world: int, final: bool) -> None:
    """Write this rank's part of a checkpoint under ``root`` (a local staging folder)."""
    own = rank_folder(root, rank)
    own.mkdir(parents=True)
    engine.save(own)
    state = {"step": step, "world": world, "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, own / "train.pt")
    if final and rank == 0:
        engine.model.save_pretrained(own / FINAL_MODEL)
    write_manifest(own)


def restore(root: Path, engine, rank: int, world: int) -> int:
    """Load this rank's state from a complete, verified checkpoint; returns the step."""
    folders = [rank_folder(root, r) for r in range(world)]
    for folder in folders:
        verify_manifest(folder, what="checkpoint")
    extra = rank_folder(root, world)
    if extra.exists():
        raise IntegrityError(
            f"checkpoint {root} was written by more than {world} workers; resume with the "
            "same train.workers"
        )
    state = torch.load(folders[rank] / "train.pt", weights_only=True)
    if state["world"] != world:
        raise IntegrityError(
            f"checkpoint {root} was written by {state['world']} workers, this run has {world}"
        )
    engine.load(folders, rank)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]


def resolve_resume(
    root: str | Path,
    world: int,
    model: torch.nn.Module | None = None,
    key: str = "train.resume_from",
    steps: int | None = None,
) -> tuple[str, list[str]]:
    """The checkpoint ``key`` (train.resume_from, recover.resume_from) names: ``root`` itself, or
    the newest complete, verified checkpoint under it (a run's ``ray_train`` folder, or one run's
    folder in it). ``root`` is a folder or a ``run.storage`` URI (``s3://…``).

    Damaged checkpoints (a missing rank, a file that fails its checksum) are skipped for the one
    before them, and named in the returned notes; one written by another number of workers or
    holding another ``model`` is refused, because an older one would be no better, and so is one
    already at or past ``steps`` (the stage would have nothing to do). Runs before the stage
    starts, so a bad checkpoint costs a second, not a Ray start.
    """
    root = str(root)
    if not storage.is_dir(root):
        raise IntegrityError(f"{key} {root}: no such checkpoint folder")
    candidates = _checkpoints_under(root)
    if not candidates:
        raise IntegrityError(
            f"{key} {root}: no checkpoint in it (a checkpoint holds rank0/, rank1/, …)"
        )
    skipped = []
    for folder in candidates:
        with storage.local_copy(folder) as local:
            try:
                for r in range(world):
                    verify_manifest(rank_folder(local, r), what="checkpoint")
            except IntegrityError as e:
                skipped.append(str(e).replace(str(local), folder))
                continue
            _check_same_run(local, model, world, name=folder)
            step = torch.load(rank_folder(local, 0) / "train.pt", weights_only=True)["step"]
        if steps is not None and step >= steps:
            stage = key.split(".")[0]
            raise ConfigError(
                f"{stage}.steps={steps}: the checkpoint {key} names is at step {step} already "
                f"({folder}); set {stage}.steps above {step} to train on from it"
            )
        return folder, skipped
    raise IntegrityError(
        f"{key} {root}: no complete checkpoint"
        + (f" ({len(skipped)} damaged; the newest: {skipped[0]})" if len(candidates) > 1 else "")
        + ("" if len(candidates) > 1 else f": {skipped[0]}")
    )


def _checkpoints_under(root: str) -> list[str]:
    """``root`` if it is a checkpoint, else Ray Train's ``checkpoint_<time>`` folders one or two
    levels below it, newest first (their names sort by time)."""
    if any(storage.is_dir(f"{root}/rank{r}") for r in (0, 1)):
        return [root]
    found = storage.subfolders(root, "checkpoint_", depth=2)
    return sorted(found, key=lambda p: p.rsplit("/", 1)[-1], reverse=True)


def _check_same_run(root: Path, model: torch.nn.Module | None, world: int, name: str) -> None:
    """``root`` is the local copy of the checkpoint ``name`` (a folder or a URI)."""
    if rank_folder(root, world).exists():
        raise IntegrityError(f"checkpoint {name} was written by more than {world} workers")
    engine_file = rank_folder(root, 0) / "engine.pt"
    if model is not None and engine_file.is_file():  # DDP; DeepSpeed checks its own on load
        saved = torch.load(engine_file, weights_only=True, mmap=True)["model"]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in saved.items()}
        if got.keys() != expected.keys() or any(got[k] != expected[k] for k in expected):
            mismatched = sorted(k for k in expected if got.get(k) != expected[k])[:3]
            raise IntegrityError(
                f"checkpoint {name} holds a different model (e.g. {mismatched}); resume it with "
                "the model config it was trained with"
            )


def final_model(root: Path) -> Path:
    folder = rank_folder(root, 0)
    verify_manifest(folder, what="checkpoint")
    return folder / FINAL_MODEL


def final_state(root: Path) -> dict:
    """The model state in rank 0's part of a verified DDP checkpoint (what the recover stage
    exports: its model is no Hugging Face model to save as a folder)."""
    folder = rank_folder(root, 0)
    verify_manifest(folder, what="checkpoint")
    return torch.load(folder / "engine.pt", weights_only=True)["model"]


def maybe_inject_fault(spec: str | None, step: int, rank: int, markers: Path) -> None:
    """Test hook: ``spec = "RANK:STEP"`` kills that worker process once, at that step.

    A marker file under ``markers`` (the run's storage folder, shared by the workers) makes the
    fault happen once, so the restarted worker group runs through. The worker first waits out
    Ray Train's health-check poll (2 s), which is what collects its last report: a worker that
    dies sooner takes its newest checkpoint with it, and the group restarts from the one before.
    """
    if not spec:
        return
    kill_rank, kill_step = (int(x) for x in spec.split(":"))
    marker = markers / f"fault-rank{kill_rank}-step{kill_step}"
    if rank == kill_rank and step == kill_step and not marker.exists():
        markers.mkdir(parents=True, exist_ok=True)
        marker.touch()
        time.sleep(5)
        print(f"presso: fault injection: killing rank {rank} at step {step}", flush=True)
        os._exit(17)
