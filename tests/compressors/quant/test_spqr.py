"""SpQR-style: beats RTN at the same group size, and every stored byte is what was solved."""

import math

import pytest
import torch

from presso import UnsupportedError
from presso.compressors.formats.spqr import SpQRWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.quant.rtn import RTN
from presso.compressors.quant.spqr import SpQR


@pytest.fixture
def layer_with_outliers(correlated_layer):
    """The correlated layer plus a few large weights, the kind SpQR keeps in fp16."""
    w, x = correlated_layer
    w = w.clone()
    gen = torch.Generator().manual_seed(1)
    w[torch.rand(w.shape, generator=gen) < 0.005] *= 8
    st = HessianStats.empty(x.shape[1])
    st.update(x)
    return w, x, st


def _output_error(x, w, record):
    return float(((x @ (record.dequantize() - w).T) ** 2).mean())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_spqr_beats_rtn_at_the_same_group_size(layer_with_outliers, bits, symmetric):
    """The claim behind the method: small groups with quantized statistics and ~1 % fp16
    outliers, solved GPTQ-style, must clearly beat plain RTN on the same 16-wide groups."""
    w, x, st = layer_with_outliers
    spqr = SpQR(bits=bits, group_size=16, symmetric=symmetric).compress(w, st)
    rtn = RTN(bits=bits, group_size=16, symmetric=symmetric).compress(w)
    assert _output_error(x, w, spqr) < 0.6 * _output_error(x, w, rtn)


def test_outliers_lower_the_error_and_hit_their_budget(layer_with_outliers):
    """Keeping the most sensitive 1 % in fp16 must pay for itself in output error, and every
    16-column group keeps exactly round(1 % of its weights) so the size is predictable."""
    w, x, st = layer_with_outliers
    with_out = SpQR(bits=3, outlier_fraction=0.01).compress(w, st)
    without = SpQR(bits=3, outlier_fraction=0.0).compress(w, st)
    assert _output_error(x, w, with_out) < 0.85 * _output_error(x, w, without)
    per_group = round(0.01 * w.shape[0] * 16)
    assert with_out.outliers.values.numel() <= per_group * (w.shape[1] // 16)
    assert without.outliers.values.numel() == 0


def test_statistics_are_quantized_and_every_byte_is_counted(layer_with_outliers):
    """Scales and zero points must really be 3-bit codes (at most 8 values per run of 16 rows
    and group), and the stored size must be the sum of codes, statistics and outliers."""
    w, _, st = layer_with_outliers
    n, k = w.shape
    rec = SpQR(bits=3, group_size=16, stat_bits=3, stat_group=16).compress(w, st)
    scale, zero = rec.grid()
    for stat in (scale, zero.float()):
        runs = stat.reshape(n // 16, 16, k // 16)
        distinct = max(len(runs[r, :, g].unique()) for r in range(n // 16) for g in range(k // 16))
        assert distinct <= 8
    assert (zero == zero.round()).all()  # integer zero points: the plain pack-quantized layout
    expected_bits = (
        n * k * 3  # codes
        + 2 * (k // 16) * 32 * math.ceil(n * 3 / 32)  # scale and zero codes, packed along N
        + 4 * (n // 16) * (k // 16) * 16  # fp16 lo and step, for scales and for zeros
        + rec.outliers.values.numel() * (16 + 16)  # fp16 value + int16 column
        + (n + 1) * 32  # CSR row pointers
        + 2 * 64  # the weight shape
    )
    stored = sum(t.numel() * t.element_size() * 8 for t in rec.tensors().values())
    assert stored == expected_bits


def test_record_round_trips_and_its_module_computes_the_same(layer_with_outliers):
    """What is saved is exactly what was solved, and the loaded layer (dense kernel plus the
    sparse outlier list) computes the same product as the dequantized weight."""
    w, x, st = layer_with_outliers
    rec = SpQR(bits=4).compress(w, st)
    back = SpQRWeight.from_tensors(rec.tensors(), rec.scheme())
    assert torch.equal(back.dequantize(), rec.dequantize())
    bias = torch.randn(w.shape[0])
    y = back.module(bias)(x[:8])
    assert torch.allclose(y, torch.nn.functional.linear(x[:8], rec.dequantize(), bias), atol=1e-5)


def test_stat_group_must_divide_the_rows():
    with pytest.raises(UnsupportedError, match="stat_group"):
        SpQR(stat_group=16).check_shape(40, 64, "layer")
