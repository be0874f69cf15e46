"""DeepSpeed ZeRO-2 as the training engine inside Ray Train: on the same data and seed it follows
DDP + AdamW (ZeRO shards the optimizer state, it does not change the maths), and a worker killed
mid-run resumes from its sharded checkpoint to the same final parameters."""

import os

import pytest
from safetensors.torch import load_file

from presso.orchestrator.config import load_config
from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
from presso.orchestrator.tracking import Tracking
from presso.orchestrator.train import run_training

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

TINY = [
    "train.steps=4",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
]
ZERO2 = ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"]


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


def test_zero2_follows_ddp_and_resumes(local_ray, tmp_path):
    _, ddp = _train(tmp_path, "ddp", [])
    clean, zero = _train(tmp_path, "zero2", ZERO2)
    resumed, _ = _train(tmp_path, "zero2-faulty", ZERO2, fault="1:3")

    ddp_loss, zero_loss = ddp.history("train/loss"), zero.history("train/loss")
    assert [s for s, _ in zero_loss] == [1, 2, 3, 4]
    # Same batches, same AdamW maths; only the order of fp32 reductions differs.
    for (_, a), (_, b) in zip(ddp_loss, zero_loss):
        assert abs(a - b) <= 1e-4 * abs(a), (ddp_loss, zero_loss)
    assert zero.history("train/replicas_identical") == [(4, 1.0)]
    assert list((tmp_path / "zero2-faulty").rglob("fault-rank1-step3"))
    diff = max((clean[k] - resumed[k]).abs().max().item() for k in clean)
    assert diff == 0.0, f"resumed ZeRO-2 run differs by {diff}"
