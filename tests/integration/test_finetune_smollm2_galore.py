"""jobs/finetune_smollm2_galore.yaml on two CPU workers, shrunk to two tiny steps: the job a user
copies must actually fine-tune the real pretrained model, with GaLore's projected all-reduce
sending the projected bytes (not dense ones) once the subspace is fitted."""

import math

import pytest

from presso.compressors.optim import low_rank_parameters
from presso.orchestrator.config import load_config
from presso.orchestrator.pipeline import preflight
from presso.orchestrator.tracking import Tracking
from presso.orchestrator.train import run_training

# Fetching and dequantizing SmolLM2 (first run) and two 135M-parameter steps on two cores: minutes.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

TINY = [
    "train.steps=2",
    "train.batch_size=1",
    "train.seq_len=32",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.warmup_steps=1",
]


def test_job_finetunes_smollm2_with_projected_allreduce(local_ray, tmp_path):
    cfg = load_config("jobs/finetune_smollm2_galore.yaml", [*TINY, f"run.output_dir={tmp_path}"])
    plan = preflight(cfg, ("train",))
    tracking = Tracking(cfg)
    tracking.start()
    run = tracking.stage("train")

    run_training(cfg, plan.corpus, plan.vocab_size, plan.source, run, tmp_path)

    assert run.history("train/replicas_identical") == [(2, 1.0)]
    assert all(math.isfinite(v) for _, v in run.history("val/loss"))
    # Step 1 fits every subspace from the whole gradient; step 2 sends P^T G for each low-rank
    # weight (r x the larger side) and every other parameter whole.
    assert [s for s, n in run.history("comm/refreshed_layers") if n > 0] == [1]
    o = cfg.train.optimizer
    model = plan.model
    low = {id(p) for p in low_rank_parameters(model, o.modules, o.exclude).values()}
    expected = sum(
        (min(o.rank, min(p.shape)) * max(p.shape) if id(p) in low else p.numel()) * 4
        for p in model.parameters()
    )
    sent = dict(run.history("comm/bytes_sent"))
    dense = dict(run.history("comm/dense_bytes"))
    assert sent[2] == expected
    assert sent[2] < 0.5 * dense[2]
