"""Which checkpoint `train.resume_from` continues from: the newest that is whole and verified."""

import pytest
import torch

from presso import IntegrityError
from presso.compressors.formats.integrity import write_manifest
from presso.orchestrator.checkpoint import resolve_resume


def _checkpoint(folder, model, step, world=2):
    for rank in range(world):
        own = folder / f"rank{rank}"
        own.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "optimizer": {}}, own / "engine.pt")
        torch.save({"step": step, "world": world}, own / "train.pt")
        write_manifest(own)
    return folder


@pytest.fixture
def run_folder(tmp_path, tiny_llama):
    """Ray Train's layout: ray_train/<run>/checkpoint_<time>/rank<r>/, three checkpoints."""
    run = tmp_path / "ray_train" / "job-20261204-120000"
    for i, step in enumerate((2, 4, 6)):
        _checkpoint(run / f"checkpoint_2026-12-04_12-0{i}-00.000000", tiny_llama, step)
    return run


def test_newest_is_chosen_from_a_run_or_its_parent(run_folder, tiny_llama):
    """A user points at the folder presso named when it failed; the newest checkpoint wins."""
    for root in (run_folder, run_folder.parent):
        chosen, skipped = resolve_resume(root, 2, tiny_llama)
        assert chosen.endswith("12-02-00.000000") and skipped == []


def test_a_damaged_newest_falls_back_to_the_one_before(run_folder, tiny_llama):
    """A checkpoint cut short or bit-flipped must cost one interval of work, not the run."""
    newest = sorted(run_folder.iterdir())[-1]
    (newest / "rank1" / "train.pt").write_bytes(b"flipped")
    chosen, skipped = resolve_resume(run_folder, 2, tiny_llama)
    assert chosen.endswith("12-01-00.000000")
    assert len(skipped) == 1 and "does not match its checksum" in skipped[0]


def test_nothing_whole_is_refused_with_the_reason(run_folder, tiny_llama):
    for folder in run_folder.iterdir():
        (folder / "rank0" / "engine.pt").unlink()
    with pytest.raises(IntegrityError, match="no complete checkpoint .*3 damaged.*missing"):
        resolve_resume(run_folder, 2, tiny_llama)


def test_another_model_is_refused_not_skipped(run_folder, make_llama):
    """An older checkpoint of the same run would hold the same wrong model: no fallback."""
    with pytest.raises(IntegrityError, match="holds a different model"):
        resolve_resume(run_folder, 2, make_llama(hidden_size=32))


def test_another_worker_count_is_refused(run_folder, tiny_llama):
    with pytest.raises(IntegrityError, match="more than 1 workers"):
        resolve_resume(run_folder, 1, tiny_llama)


def test_checkpoints_in_object_storage_are_listed_verified_and_named_by_uri(
    run_folder, tiny_llama, s3_env
):
    """With run.storage=s3://…, Ray Train writes checkpoints to the bucket from whichever node a
    worker runs on; resume must find the newest whole one there, and name a damaged one by its
    URI, not by the temporary download it was checked in."""
    from presso.orchestrator import storage

    newest = sorted(run_folder.iterdir())[-1]
    (newest / "rank1" / "train.pt").write_bytes(b"flipped")
    ray_train = f"{s3_env.bucket('checkpoints')}/run/ray_train"
    storage.upload(run_folder.parent, ray_train)
    chosen, skipped = resolve_resume(ray_train, 2, tiny_llama)
    assert chosen.startswith(f"{ray_train}/job-") and chosen.endswith("12-01-00.000000")
    assert len(skipped) == 1 and f"{ray_train}/job-" in skipped[0], skipped
    with pytest.raises(IntegrityError, match="no such checkpoint folder"):
        resolve_resume(f"{ray_train}-typo", 2, tiny_llama)


def test_a_checkpoint_with_nothing_left_to_train_is_refused_up_front(run_folder, tiny_llama):
    """Resuming at step 6 with train.steps=6 would start workers that train nothing and end with
    no checkpoint; the user gets told which setting to raise instead."""
    from presso import ConfigError

    with pytest.raises(ConfigError, match=r"train.steps=6: .* at step 6 already .*above 6"):
        resolve_resume(run_folder, 2, tiny_llama, steps=6)
    assert resolve_resume(run_folder, 2, tiny_llama, steps=7)[0].endswith("12-02-00.000000")
