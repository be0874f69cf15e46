"""Low-rank layers: output-optimal factors, fp16-safe storage, an exact save/load round trip."""

import copy

import pytest
import torch

import presso
from presso.compressors.factor.lowrank import LowRank, spectrum_ranks, whitened_svd
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.formats.linear import LowRankLinear
from presso.compressors.formats.lowrank import LowRankWeight
from presso.compressors.ptq.blocks import compress_model
from presso.compressors.ptq.calibration import HessianStats


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _stats(x):
    stats = HessianStats.empty(x.shape[1])
    stats.update(x)
    return stats


def test_factors_minimise_output_error_not_weight_error(correlated_layer):
    """On unevenly scaled, correlated inputs the whitened truncation must beat the plain SVD
    truncation of the weight at every rank in output error (what the model sees), and its
    error must be what the whitened spectrum predicts."""
    w, x = correlated_layer
    stats = _stats(x)
    svd = whitened_svd(w, stats.hessian(), damp=0.0)
    u, s, vt = torch.linalg.svd(w.double(), full_matrices=False)
    for rank in (4, 16, 32):
        ours = stats.output_error(svd.record(rank).dequantize() - w)
        plain = stats.output_error((u[:, :rank] * s[:rank]) @ vt[:rank] - w)
        assert ours < 0.9 * plain
        predicted = float((svd.s[rank:] ** 2).sum())
        assert ours == pytest.approx(predicted, rel=1e-2)  # fp16 factors add a little


def test_factors_stay_finite_in_fp16_with_huge_activations(correlated_layer):
    """Activations of 1e4 make whitened singular values of ~1e5, beyond fp16; the factors are
    balanced between US and V so the stored layer is still finite and accurate."""
    w, x = correlated_layer
    stats = _stats(x * 1e4)
    record = LowRank(rank=16).compress(w, stats)
    assert record.us.dtype == record.v.dtype == torch.float16
    assert torch.isfinite(record.us).all() and torch.isfinite(record.v).all()
    exact = whitened_svd(w, stats.hessian(), 0.01)
    full = (exact.u[:, :16] * exact.s[:16]) @ exact.vt_whitened[:16] @ exact.unwhiten
    assert torch.allclose(record.dequantize().double(), full, rtol=0, atol=1e-2 * w.abs().max())


def test_spectrum_ranks_follow_the_energy_kept():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    assert spectrum_ranks(s, [0.5, 0.995, 0.999], 10) == [1, 3, 4]
    assert all(energy[r - 1] >= e for r, e in zip([1, 3, 4], [0.5, 0.995, 0.999]))
    assert spectrum_ranks(s, [0.5, 0.995, 0.999], 4) == [1, 3]  # capped below max_rank


def test_low_rank_layers_round_trip_through_the_artifact_exactly(tiny_llama, tmp_path):
    """Stored factors reload bit for bit, the layer computes x Vᵀ (US)ᵀ through plain torch,
    and the reloaded model's logits equal those of the model with the same modules in place."""
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(4)]
    records = compress_model(tiny_llama, [LowRank(rank=8)], calib)
    assert {type(r) for r in records.values()} == {LowRankWeight}
    save_compressed(tiny_llama, records, tmp_path / "art", dtype="float32")
    loaded = presso.load_compressed(tmp_path / "art")

    reference = copy.deepcopy(tiny_llama)
    for name, record in records.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, LowRankLinear)
        assert torch.equal(module.weight_us, record.us) and torch.equal(module.weight_v, record.v)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, record.module(None))
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        x = torch.randn(3, 64)
        layer = records["model.layers.0.self_attn.q_proj"]
        assert torch.equal(layer.module(None)(x), x @ layer.v.float().T @ layer.us.float().T)
