"""GPTQ: lower output error than RTN, static act-order groups, and dampening escalation."""

import logging

import pytest
import torch

from presso import ConfigError
from presso.compressors.formats.quantized import QuantizedWeight
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.quant.gptq import GPTQ
from presso.compressors.quant.primitives import fit_grid
from presso.compressors.quant.rtn import RTN
from presso.compressors.quant.spqr import SpQR


def _stats(x):
    st = HessianStats.empty(x.shape[1])
    st.update(x)
    return st


def _output_error(x, w, record):
    return float(((x @ (record.dequantize() - w).T) ** 2).mean())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(
    correlated_layer, bits, group_size, symmetric, act_order
):
    """The point of GPTQ: on correlated inputs, compensating each column's rounding error on
    the later columns must give a clearly smaller output error than rounding each weight alone."""
    w, x = correlated_layer
    grid = dict(bits=bits, group_size=group_size, symmetric=symmetric)
    gptq = GPTQ(**grid, act_order=act_order).compress(w, _stats(x))
    rtn = RTN(**grid).compress(w)
    assert _output_error(x, w, gptq) < 0.8 * _output_error(x, w, rtn)


def test_act_order_uses_static_groups_and_the_plain_layout(correlated_layer):
    """Act-order must not change the stored layout: every grid is the min-max grid of the
    original column group (fixed before the permutation), so inference needs no reordering and
    the record reloads identically from its compressed-tensors tensors."""
    w, x = correlated_layer
    rec = GPTQ(bits=4, group_size=32, act_order=True).compress(w, _stats(x))
    scale, zero = fit_grid(w, 4, 32, True)
    assert torch.equal(rec.scale, scale) and torch.equal(rec.zero, zero)
    assert rec.scheme()["actorder"] is None
    back = QuantizedWeight.from_tensors(rec.tensors(), rec.scheme())
    assert torch.equal(back.q, rec.q) and torch.equal(back.dequantize(), rec.dequantize())


def test_lazy_blocks_do_not_change_the_result(correlated_layer):
    """Lazy batching is an exact reordering of the updates: a block of 32 columns and a block of
    the whole row must give the same codes (up to the odd float tie)."""
    w, x = correlated_layer
    st = _stats(x)
    a = GPTQ(bits=4, group_size=32, blocksize=32).compress(w, st)
    b = GPTQ(bits=4, group_size=32, blocksize=128).compress(w, st)
    assert (a.q != b.q).float().mean() < 1e-3


def test_non_positive_definite_hessian_escalates_dampening(caplog):
    """A Hessian that is not positive definite must not crash or give NaN: the dampening grows
    until the Cholesky succeeds, and the log names the layer so the user can look at it."""
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    st = HessianStats.empty(16)
    st.update(torch.randn(64, 16))
    st.xtx[3, 3] = -float(st.xtx.diagonal().mean())  # an impossible, negative curvature
    with caplog.at_level(logging.WARNING):
        rec = GPTQ(bits=4, group_size=16).compress(w, st, name="blocks.0.q_proj")
    assert "blocks.0.q_proj" in caplog.text and "dampening" in caplog.text
    assert torch.isfinite(rec.dequantize()).all()


def test_inputs_never_seen_are_zeroed_not_nan():
    """An input channel that is zero on every calibration token has a zero Hessian row; its
    weights are unconstrained and must come out finite (zero), not break the factorisation."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 5] = 0
    st = HessianStats.empty(32)
    st.update(x)
    rec = GPTQ(bits=4, group_size=16, damp=0.0).compress(torch.randn(8, 32), st)
    assert torch.isfinite(rec.dequantize()).all()
    assert (rec.dequantize()[:, 5] == 0).all()


def test_defaults_are_the_practitioners():
    """GPTQ out of the box is what llm-compressor and GPTQModel do by default (the module
    docstring gives the sources): static-group act-order, 1 % dampening, 128-column blocks."""
    from presso.compressors.registry import ALGORITHMS

    defaults = {s.name: s.default for s in ALGORITHMS.settings("gptq")}
    assert defaults["act_order"] is True
    assert (defaults["damp"], defaults["blocksize"]) == (0.01, 128)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_scales_are_solved_and_stored_in_the_dtype_asked_for(
    correlated_layer, act_order, scale_dtype
):
    """fp16 scales cost several percent perplexity at 3 bits (README, the W3 study), so the
    scale dtype is a setting: the solver must round against the scales as they will be stored
    (codes chosen on fp32 scales but stored with fp16 ones would not be what was evaluated), and
    the record must reload from its compressed-tensors tensors unchanged."""
    w, x = correlated_layer
    rec = GPTQ(bits=3, group_size=32, act_order=act_order, scale_dtype=scale_dtype).compress(
        w, _stats(x)
    )
    assert rec.scale.dtype == getattr(torch, scale_dtype)
    back = QuantizedWeight.from_tensors(rec.tensors(), rec.scheme())
    assert back.scale.dtype == rec.scale.dtype and torch.equal(back.dequantize(), rec.dequantize())
    # each column's codes are the nearest on the stored grid of its (compensated) values: the
    # stored scale is what the sweep divided by, so re-rounding the dequantized weight is exact
    again = torch.round(rec.dequantize().reshape(w.shape[0], -1, 32) / rec.scale.float()[..., None])
    assert torch.equal(again.reshape(w.shape).to(torch.int8), rec.q)


def test_an_unknown_scale_dtype_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"gptq\.scale_dtype.*float32"):
        GPTQ(scale_dtype="fp8").validate("gptq")
    with pytest.raises(ConfigError, match=r"spqr\.scale_dtype"):
        SpQR(scale_dtype="float32").validate("spqr")
