"""Magnitude, Wanda, SparseGPT: exact sparsity and N:M patterns, and the expected error order."""

import pytest
import torch

from presso import ConfigError, UnsupportedError
from presso.compressors.formats.sparse import (
    Sparse24QuantizedWeight,
    Sparse24Weight,
    SparseQuantizedWeight,
    SparseWeight,
)
from presso.compressors.prune.magnitude import Magnitude
from presso.compressors.prune.sparsegpt import SparseGPT
from presso.compressors.prune.wanda import Wanda
from presso.compressors.ptq.calibration import HessianStats, NormStats
from presso.compressors.quant.rtn import RTN
from presso.compressors.registry import build

PRUNERS = [Magnitude, Wanda, SparseGPT]


def _stats(x):
    st = HessianStats.empty(x.shape[1])
    st.update(x)
    return st


def _output_error(x, w, record):
    return float(((x @ (record.dequantize() - w).T) ** 2).mean())


@pytest.mark.parametrize("cls", PRUNERS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact(correlated_layer, cls, sparsity):
    """A 50 % model must be 50 % sparse, not about 50 %: sizes and speed-ups are quoted from it.
    (Wanda compares within rows, so its count is exact per row.)"""
    w, x = correlated_layer
    rec = cls(sparsity=sparsity).compress(w, _stats(x))
    n, k = w.shape
    expected = n * round(sparsity * k) if cls is Wanda else round(sparsity * n * k)
    assert int((~rec.mask).sum()) == expected
    assert (rec.dequantize()[~rec.mask] == 0).all()


@pytest.mark.parametrize("cls", PRUNERS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_pattern_holds_in_every_run(correlated_layer, cls, pattern):
    """Sparse tensor cores need exactly N kept in every M consecutive inputs of every row."""
    w, x = correlated_layer
    n_keep, m = (int(v) for v in pattern.split(":"))
    rec = cls(pattern=pattern).compress(w, _stats(x))
    runs = rec.mask.reshape(w.shape[0], -1, m).sum(-1)
    assert (runs == n_keep).all()
    assert isinstance(rec, Sparse24Weight) == (pattern == "2:4")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(correlated_layer, pattern):
    """The ranking the methods exist for: weighting by input norms (Wanda) beats magnitudes,
    and updating the surviving weights with second-order information (SparseGPT) beats both."""
    w, x = correlated_layer
    st = _stats(x)
    errors = [_output_error(x, w, cls(pattern=pattern).compress(w, st)) for cls in PRUNERS]
    magnitude, wanda, sparsegpt = errors
    assert wanda < 0.9 * magnitude
    assert sparsegpt < 0.9 * wanda


def test_wanda_needs_only_column_norms(correlated_layer):
    """Wanda's cheap statistic (per-column norms) must give the same mask as a full Hessian."""
    w, x = correlated_layer
    norms = NormStats.empty(x.shape[1])
    norms.update(x)
    assert torch.equal(Wanda().compress(w, norms).mask, Wanda().compress(w, _stats(x)).mask)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_prune_quantize_beats_prune_then_round(correlated_layer, pattern):
    """Why joint pruning and quantization is one algorithm: rounding inside the sweep lets the
    remaining weights absorb the rounding error too, which rounding afterwards cannot."""
    w, x = correlated_layer
    st = _stats(x)
    joint = SparseGPT(pattern=pattern, bits=4, group_size=32).compress(w, st)
    assert isinstance(joint, Sparse24QuantizedWeight if pattern == "2:4" else SparseQuantizedWeight)
    pruned = SparseGPT(pattern=pattern).compress(w, st)
    rounded = RTN(bits=4, group_size=32).compress(pruned.dequantize()).dequantize() * pruned.mask
    assert torch.equal(joint.mask.sum(), pruned.mask.sum())
    assert (joint.dequantize()[~joint.mask] == 0).all()
    joint_err = _output_error(x, w, joint)
    assert joint_err < float(((x @ (rounded - w).T) ** 2).mean())


def test_pattern_and_shape_errors_name_the_problem():
    with pytest.raises(ConfigError, match="compress.recipe.sparsegpt.pattern"):
        build("sparsegpt", {"pattern": "4:2"})
    with pytest.raises(ConfigError, match="sparsity"):
        build("wanda", {"sparsity": 1.5})
    with pytest.raises(UnsupportedError, match="multiple of 4"):
        Magnitude(pattern="2:4").check_shape(8, 30, "layer")


@pytest.mark.parametrize("cls", [SparseWeight, Sparse24Weight])
def test_values_are_stored_in_the_chosen_dtype(correlated_layer, cls):
    """Kept values in fp16 halve the bytes; SparseGPT compensates that rounding in its sweep,
    so its stored record, not a pre-rounding copy, is what the error is measured on."""
    w, x = correlated_layer
    rec = SparseGPT(pattern="2:4" if cls is Sparse24Weight else "unstructured").compress(
        w, _stats(x)
    )
    assert type(rec) is cls and rec.values.dtype == torch.float16
    assert rec.tensors()["compressed"].dtype == torch.float16
