"""RTN on the compressed-tensors grid: exact pack/unpack and the half-step error bound."""

import pytest
import torch

from presso import UnsupportedError
from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.quant.primitives import code_range
from presso.compressors.quant.rtn import RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_pack_unpack_round_trip_is_exact(bits, symmetric, group_size):
    """What is stored must be what was evaluated: codes, scales and zeros survive packing."""
    torch.manual_seed(bits)
    w = torch.randn(24, 96)
    qw = RTN(bits=bits, group_size=group_size, symmetric=symmetric).compress(w)
    back = QuantizedWeight.from_tensors(qw.tensors(), qw.scheme())
    assert torch.equal(back.q, qw.q)
    assert torch.equal(back.scale, qw.scale)
    assert torch.equal(back.zero, qw.zero)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_at_most_half_a_step(bits, symmetric):
    """Round to nearest: inside the grid's range no weight moves more than half a scale step."""
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    qw = RTN(bits=bits, group_size=64, symmetric=symmetric).compress(w)
    step = qw.scale.float().repeat_interleave(64, dim=1)
    err = (qw.dequantize() - w).abs()
    qmin, qmax = code_range(bits)
    # Symmetric grids give up the top code for the positive extreme (compressed-tensors' choice):
    # that one value may sit a full half step beyond the grid, so allow one step there.
    clipped = qw.q.int() == qmax if symmetric else torch.zeros_like(err, dtype=torch.bool)
    assert (err[~clipped] <= step[~clipped] / 2 * (1 + 1e-3)).all()
    assert (err[clipped] <= step[clipped] * (1 + 1e-3)).all()
    assert qw.q.min() >= qmin and qw.q.max() <= qmax


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errors = [
        (RTN(bits=b, group_size=64).compress(w).dequantize() - w).norm() for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True)


def test_packed_layout_is_compressed_tensors():
    """int4 codes pack 8 per int32 along K; zero points pack along N (compressed-tensors)."""
    w = torch.randn(16, 64)
    t = RTN(bits=4, group_size=32, symmetric=False).compress(w).tensors()
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (16, 8)
    assert t["weight_scale"].shape == (16, 2)
    assert t["weight_zero_point"].shape == (2, 2)
    assert t["weight_shape"].tolist() == [16, 64]


def test_group_size_must_divide_the_width():
    with pytest.raises(UnsupportedError, match="group_size 128 does not divide its 576 input"):
        RTN(bits=4, group_size=128).compress(torch.randn(8, 576), name="q_proj")


def test_constant_and_zero_groups():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    qw = RTN(bits=4, group_size=32, symmetric=False).compress(w)
    assert torch.allclose(qw.dequantize(), w, atol=1e-3)
    assert torch.isfinite(qw.scale.float()).all()
