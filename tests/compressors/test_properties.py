"""Property tests: for any input hypothesis finds, each compressor keeps its stated promise."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from presso.compressors.gradient.powersgd import PowerSGD, matrix_shape, orthonormalize
from presso.compressors.gradient.topk import TopK
from presso.compressors.quant.primitives import code_range
from presso.compressors.quant.rtn import RTN
from presso.kernels.grad_quant import quantize_pack_reference, unpack_dequantize_reference
from presso.kernels.packing import pack_int32, unpack_int32

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def matrices(min_side=1, max_side=40):
    shape = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=finite))


@FAST
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_packing_round_trips(bits, rows, cols, dim, seed):
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    n = codes.shape[dim]
    assert torch.equal(unpack_int32(pack_int32(codes, bits, dim), bits, n, dim).long(), codes)


@FAST
@given(w=matrices(), bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans())
@example(w=np.array([[1e-5]], dtype=np.float32), bits=8, symmetric=True)  # fp16-subnormal scale
def test_rtn_error_is_within_half_a_step(w, bits, symmetric):
    """Per-channel RTN: a weight inside the grid's range moves at most half a step. The grid
    stores an integer zero point (and fp16 scales), so the range can miss an extreme weight by up
    to one more half step: those are clipped to the last code, at most one step away."""
    w = torch.from_numpy(w)
    qw = RTN(bits=bits, group_size=-1, symmetric=symmetric).compress(w)
    step = qw.scale.float().expand_as(w)
    zero = qw.zero.float().expand_as(w)
    qmin, qmax = code_range(bits)
    inside = (w >= (qmin - zero) * step) & (w <= (qmax - zero) * step)
    err = (qw.dequantize() - w).abs()
    slack = 1e-6 + 2e-3 * step  # fp16 rounding of the scale
    assert (err[inside] <= step[inside] / 2 + slack[inside]).all()
    assert (err[~inside] <= step[~inside] + slack[~inside]).all()


@FAST
@given(
    x=arrays(np.float32, st.integers(1, 700), elements=finite),
    bits=st.sampled_from([2, 3, 4, 8]),
    seed=st.integers(0, 1000),
)
def test_stochastic_rounding_stays_within_one_step(x, bits, seed):
    x = torch.from_numpy(x)
    packed, meta = quantize_pack_reference(x, bits, 64, seed=seed)
    y = unpack_dequantize_reference(packed, meta, bits, 64, x.numel())
    step = meta[:, 1].repeat_interleave(64)[: x.numel()]
    assert (torch.abs(y - x) <= step * (1 + 1e-5) + 1e-6).all()


@FAST
@given(x=arrays(np.float32, st.integers(1, 500), elements=finite), density=st.floats(0.001, 1.0))
def test_topk_keeps_the_largest_and_its_error_is_the_rest(x, density):
    x = torch.from_numpy(x)
    topk = TopK()
    out = torch.zeros_like(x)
    topk.decode_add(topk.encode(x, density, seed=0), density, out)
    kept = out != 0
    k = topk.kept(x.numel(), density)
    assert int(kept.sum()) <= k
    assert torch.equal(out[kept], x[kept])  # kept entries travel exactly
    if (~kept).any() and kept.any():
        assert x[~kept].abs().max() <= x[kept].abs().min()
    (reported,) = topk.errors(x, [density])
    # errors() subtracts the kept energy from the total: exact up to fp64 rounding of the total
    energy = float(x.double().square().sum())
    assert reported == pytest.approx(float((x - out).double().square().sum()), abs=1e-12 * energy)


@FAST
@given(m=matrices(2, 24))
def test_full_rank_powersgd_reconstructs_the_matrix(m):
    """At rank min(m, n) one power step with an orthonormalised P spans the whole column space."""
    m = torch.from_numpy(m).double()
    rows, cols = matrix_shape(m.shape)
    rank = PowerSGD().clamp(m.shape, 10**6)
    q = torch.randn(cols, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = orthonormalize(m @ q)
    approx = p @ (m.T @ p).T
    assert torch.allclose(approx, m, atol=1e-6 * (1 + m.abs().max().item()))
