"""A killed worker costs only the steps since the last checkpoint: Ray Train restarts the group,
every rank restores its own state (model, optimizer, compression state, RNG) and the run ends
exactly where an uninterrupted run with the same seed ends."""

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

RUN = ["train.steps=6", "train.eval_every=6", "train.checkpoint_every=2", "train.max_failures=1"]
LOW_RANK = ["train.optimizer.rank=8", "train.optimizer.update_proj_gap=2"]
LGRECO = [
    "train.grad_compression.method=lgreco",
    "train.grad_compression.warmup_steps=1",
    "train.grad_compression.adjust_every=2",
    "train.grad_compression.measure_steps=1",
    "train.grad_compression.min_numel=256",
]
# Every gradient compressor family and every optimizer family, each carrying state
# (error feedback, PowerSGD Q, L-GreCo plan, projectors, 8-bit moments) across the restart.
CASES = {
    "dense-ddp": [],
    "lgreco-powersgd+galore": ["train.optimizer.name=galore", *LOW_RANK, *LGRECO],
    "lgreco-topk+gradnormlorp8bit": [
        "train.optimizer.name=gradnormlorp8bit",
        *LOW_RANK,
        *LGRECO,
        "train.grad_compression.family=topk",
    ],
    "uniform-quant+galore8bit": [
        "train.optimizer.name=galore8bit",
        *LOW_RANK,
        "train.grad_compression.method=uniform",
        "train.grad_compression.family=quant",
        "train.grad_compression.warmup_steps=1",
        "train.grad_compression.min_numel=256",
    ],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_kill_and_resume_matches_uninterrupted(local_ray, train_stage, tmp_path, overrides):
    clean, _ = train_stage([*RUN, *overrides], "clean")
    resumed, run = train_stage([*RUN, *overrides], "faulty", fault="1:3")  # dies before step 4
    clean, resumed = (load_file(f / "model.safetensors") for f in (clean, resumed))

    markers = list((tmp_path / "faulty").rglob("fault-rank1-step3"))
    assert len(markers) == 1, "the fault was not injected"
    # From the checkpoint at step 2, not from scratch (which would end the same, deterministically)
    assert run.history("train/resumed_from_step") == [(2, 2.0)]
    assert run.history("train/replicas_identical") == [(6, 1.0)]
    diff = max((clean[k] - resumed[k]).abs().max().item() for k in clean)
    print(f"faults injected 1, survived 1, max |param difference| {diff:.3g}")
    assert clean.keys() == resumed.keys()
    assert diff == 0.0
