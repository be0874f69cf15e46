"""Ray Train with two gloo workers: DDP keeps the replicas identical and the loss falls."""

import pytest

from presso.orchestrator.config import load_config
from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
from presso.orchestrator.models import load_pretrained
from presso.orchestrator.tracking import Tracking
from presso.orchestrator.train import run_training

pytestmark = pytest.mark.integration

TINY = [
    "train.steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=2",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
]


def test_two_workers_train_identical_replicas(local_ray, tmp_path):
    cfg = load_config("jobs/quickstart.yaml", [*TINY, f"run.output_dir={tmp_path}"])
    works = load_works(None)
    corpus = build_corpus(works, split_works(works, ["hamlet"], ["macbeth"]), ByteTokenizer())
    tracking = Tracking(cfg)
    tracking.start()
    run = tracking.stage("train")

    folder = run_training(cfg, corpus, ByteTokenizer.vocab_size, None, run, tmp_path)

    assert run.history("train/replicas_identical") == [(6, 1.0)]
    val = dict(run.history("val/loss"))
    assert sorted(val) == [0, 3, 6]
    assert val[6] < val[0]  # a few steps already move a byte-level model off uniform
    assert [s for s, _ in run.history("train/loss")] == [1, 2, 3, 4, 5, 6]
    model, _ = load_pretrained(folder)
    assert model.config.num_hidden_layers == 2
