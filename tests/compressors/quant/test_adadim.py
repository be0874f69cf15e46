"""AdaDim: per layer, the grouping dimension with the smaller output error is chosen."""

import pytest
import torch

from presso import UnsupportedError
from presso.compressors.formats.quantized import InputChannelQuantizedWeight, QuantizedWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.quant.adadim import AdaDim


@pytest.fixture
def stats():
    torch.manual_seed(0)
    st = HessianStats.empty(128)
    st.update(torch.randn(1024, 128))
    return st


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_outlier_input_channels_choose_input_channel_groups(stats, method):
    """A few input channels with 30x larger weights stretch every row's grid; grouping down the
    columns isolates them, so that grouping must be chosen and must be the better one."""
    w = torch.randn(64, 128) * 0.1
    w[:, :3] *= 30
    algo = AdaDim(bits=4, group_size=32, method=method)
    cands = algo.candidates(w, stats, "layer")
    errors = [stats.output_error(c.dequantize() - w) for c in cands]
    rec = algo.compress(w, stats)
    assert isinstance(rec, InputChannelQuantizedWeight)
    assert stats.output_error(rec.dequantize() - w) == min(errors)


def test_outlier_output_rows_keep_the_usual_groups(stats):
    """The mirror case: large output rows are isolated by the usual (per-row) grouping."""
    w = torch.randn(64, 128) * 0.1
    w[:3] *= 30
    assert isinstance(AdaDim(bits=4, group_size=32).compress(w, stats), QuantizedWeight)


def test_input_channel_record_round_trips(stats):
    w = torch.randn(64, 128)
    oc, rec = AdaDim(bits=3, group_size=16, method="rtn").candidates(w, stats, "layer")
    assert isinstance(rec, InputChannelQuantizedWeight)
    back = InputChannelQuantizedWeight.from_tensors(rec.tensors(), rec.scheme())
    assert back.shape == (64, 128)
    assert torch.equal(back.dequantize(), rec.dequantize())


def test_group_size_must_divide_one_of_the_dimensions():
    with pytest.raises(UnsupportedError, match="divides neither"):
        AdaDim(group_size=48).check_shape(64, 128, "layer")
    AdaDim(group_size=32).check_shape(48, 128, "layer")  # rows do not fit, columns do
