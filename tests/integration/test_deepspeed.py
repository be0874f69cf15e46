"""DeepSpeed ZeRO-2 as the training engine inside Ray Train: on the same data and seed it follows
DDP + AdamW (ZeRO shards the optimizer state, it does not change the maths), and a worker killed
mid-run resumes from its sharded checkpoint to the same final parameters."""

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

RUN = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=2"]
ZERO2 = [*RUN, "train.engine=deepspeed", "train.deepspeed.zero_stage=2"]


def test_zero2_follows_ddp_and_resumes(local_ray, train_stage, tmp_path):
    _, ddp = train_stage(RUN, "ddp")
    clean, zero = train_stage(ZERO2, "zero2")
    resumed, faulty = train_stage(ZERO2, "zero2-faulty", fault="1:3")
    clean, resumed = (load_file(f / "model.safetensors") for f in (clean, resumed))

    ddp_loss, zero_loss = ddp.history("train/loss"), zero.history("train/loss")
    assert [s for s, _ in zero_loss] == [1, 2, 3, 4]
    # Same batches, same AdamW maths; only the order of fp32 reductions differs.
    for (_, a), (_, b) in zip(ddp_loss, zero_loss):
        assert abs(a - b) <= 1e-4 * abs(a), (ddp_loss, zero_loss)
    assert zero.history("train/replicas_identical") == [(4, 1.0)]
    assert list((tmp_path / "zero2-faulty").rglob("fault-rank1-step3"))
    assert faulty.history("train/resumed_from_step") == [(2, 2.0)]  # not from scratch
    diff = max((clean[k] - resumed[k]).abs().max().item() for k in clean)
    assert diff == 0.0, f"resumed ZeRO-2 run differs by {diff}"
