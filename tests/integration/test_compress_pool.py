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


def test_the_pool_applies_the_embedding_entry_after_the_solver(local_ray, tiny_llama):
    """On the pool, as in one process: the embedding entry quantizes the tied embedding once,
    after the layers, and the result's model holds its dequantized values."""
    from presso.compressors.ptq import compress_model

    recipe = [{"embedding": {"bits": 8, "group_size": 32}}, {"rtn": {"bits": 4, "group_size": 32}}]
    pooled = run_compression(tiny_llama, recipe, workers=2, ignore=["lm_head"])
    assert list(pooled.records)[-1] == "model.embed_tokens" and len(pooled.records) == 15
    _same(pooled.records, compress_model(tiny_llama, recipe))
    embedding = pooled.model.get_input_embeddings().weight
    assert torch.equal(embedding, pooled.records["model.embed_tokens"].dequantize())
