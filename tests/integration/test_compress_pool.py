"""The compression pool: 1 and 2 workers, and a pool that loses a worker mid-run, all produce the
same records — a dead worker's layers are reassigned, not lost or solved differently."""

import pytest
import torch

from presso.compressors.quant.rtn import RTN
from presso.orchestrator.compress import run_compression

pytestmark = pytest.mark.integration


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key, t in a[name].tensors().items():
            assert torch.equal(t, b[name].tensors()[key]), (name, key)


def test_worker_count_and_failure_do_not_change_the_artifact(local_ray, tiny_llama, monkeypatch):
    algo = RTN(bits=4, group_size=32, symmetric=False)
    one = run_compression(tiny_llama, algo, workers=1, ignore=["lm_head"])
    two = run_compression(tiny_llama, algo, workers=2, ignore=["lm_head"])
    monkeypatch.setenv("PRESSO_INJECT_COMPRESS_FAULT", "1:2")  # worker 1 dies after 2 layers
    faulty = run_compression(tiny_llama, algo, workers=2, ignore=["lm_head"])

    assert len(one.records) == 14  # 2 blocks x 7 linear layers, lm_head left dense
    _same(one.records, two.records)
    _same(one.records, faulty.records)
    assert faulty.reassigned >= 1 and one.reassigned == two.reassigned == 0
    assert {layer.worker for layer in two.layers} == {0, 1}
