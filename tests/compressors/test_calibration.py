"""Calibration statistics: shards add up to the whole (the data-parallel property)."""

import pytest
import torch

from presso import DataError
from presso.compressors.ptq.calibration import ActivationStats, HessianStats, NormStats

MAKERS = [HessianStats.empty, NormStats.empty, lambda k: ActivationStats.empty(k, max_tokens=100)]


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 30, 16, generator=gen) * 10 for _ in range(4)]


def _tensors(st):
    return [v for v in vars(st).values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("make", MAKERS, ids=["hessian", "norms", "activations"])
def test_two_shards_sum_to_the_whole(make):
    """Workers each accumulate a shard; ``+`` of their statistics must equal one worker's over
    all batches, so M workers solve the same problem as one. Tolerance: 1e-12 relative (fp64
    sums of the same per-batch terms, added in a different order); the AWQ sample is exact."""
    batches = _batches()
    whole, first, second = make(16), make(16), make(16)
    for b in batches:
        whole.update(b)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    merged = first + second
    assert merged.count == whole.count == 240
    for a, b in zip(_tensors(merged), _tensors(whole)):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_activation_sample_is_the_first_rows_whatever_the_sharding():
    """AWQ searches on a bounded sample; 1 and 2 workers must sample the very same rows."""
    batches = _batches()
    whole, first, second = (ActivationStats.empty(16, max_tokens=100) for _ in range(3))
    for b in batches:
        whole.update(b)
    first.update(batches[0])
    for b in batches[1:]:
        second.update(b)
    assert torch.equal((first + second).sample, whole.sample)
    assert whole.sample.shape == (100, 16)


@pytest.mark.parametrize("make", MAKERS, ids=["hessian", "norms", "activations"])
def test_nan_inputs_fail_naming_the_layer(make):
    """A NaN in the activations would silently poison every later solve; fail at the source."""
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    with pytest.raises(DataError, match="model.layers.3.mlp.down_proj"):
        make(16).update(x, "model.layers.3.mlp.down_proj")
