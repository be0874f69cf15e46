"""A killed worker costs only the steps since the last checkpoint: Ray Train restarts the group,
every rank restores its own state (model, optimizer, compression state, RNG) and the run ends
exactly where an uninterrupted run with the same seed ends."""

import os

import pytest
from safetensors.torch import load_file

from presso.orchestrator.config import load_config
from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
from presso.orchestrator.tracking import Tracking
from presso.orchestrator.train import run_training

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

TINY = [
    "train.steps=6",
    "train.eval_every=6",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=1",
    "train.max_failures=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
]
COMPRESSED = [
    "train.optimizer.name=galore",
    "train.optimizer.rank=8",
    "train.optimizer.update_proj_gap=2",
    "train.grad_compression.method=lgreco",
    "train.grad_compression.warmup_steps=1",
    "train.grad_compression.adjust_every=2",
    "train.grad_compression.measure_steps=1",
    "train.grad_compression.min_numel=256",
]


def _train(tmp_path, name, overrides, fault=None):
    cfg = load_config(
        "jobs/quickstart.yaml", [*TINY, *overrides, f"run.output_dir={tmp_path / name}"]
    )
    works = load_works(None)
    corpus = build_corpus(works, split_works(works, ["hamlet"], ["macbeth"]), ByteTokenizer())
    tracking = Tracking(cfg)
    tracking.start()
    run = tracking.stage("train")
    if fault:
        os.environ["PRESSO_INJECT_FAULT"] = fault
    try:
        folder = run_training(cfg, corpus, ByteTokenizer.vocab_size, None, run, tmp_path / name)
    finally:
        os.environ.pop("PRESSO_INJECT_FAULT", None)
    return load_file(folder / "model.safetensors"), run


@pytest.mark.parametrize("overrides", [[], COMPRESSED], ids=["dense-ddp", "lgreco+galore"])
def test_kill_and_resume_matches_uninterrupted(local_ray, tmp_path, overrides):
    clean, _ = _train(tmp_path, "clean", overrides)
    resumed, run = _train(tmp_path, "faulty", overrides, fault="1:3")  # rank 1 dies before step 4

    markers = list((tmp_path / "faulty").rglob("fault-rank1-step3"))
    assert len(markers) == 1, "the fault was not injected"
    assert run.history("train/replicas_identical") == [(6, 1.0)]
    diff = max((clean[k] - resumed[k]).abs().max().item() for k in clean)
    print(f"faults injected 1, survived 1, max |param difference| {diff:.3g}")
    assert clean.keys() == resumed.keys()
    assert diff == 0.0
