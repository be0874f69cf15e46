"""Ray Train with two gloo workers: DDP keeps the replicas identical and the loss falls."""

import pytest

from presso.orchestrator.models import load_pretrained

pytestmark = pytest.mark.integration


def test_two_workers_train_identical_replicas(local_ray, train_stage):
    folder, run = train_stage(["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3"])

    assert run.history("train/replicas_identical") == [(6, 1.0)]
    val = dict(run.history("val/loss"))
    assert sorted(val) == [0, 3, 6]
    assert val[6] < val[0]  # a few steps already move a byte-level model off uniform
    assert [s for s, _ in run.history("train/loss")] == [1, 2, 3, 4, 5, 6]
    model, _ = load_pretrained(folder)
    assert model.config.num_hidden_layers == 2
