"""Sparse stored formats: exact round trips and compressed-tensors' bitmask layout."""

import numpy as np
import pytest
import torch

from presso.compressors.formats.sparse import (
    Sparse24QuantizedWeight,
    Sparse24Weight,
    SparseQuantizedWeight,
    SparseWeight,
    pack_bitmask,
    unpack_bitmask,
)
from presso.compressors.prune.masks import nm_mask
from presso.compressors.quant.rtn import RTN


def test_bitmask_is_numpy_packbits_little_endian():
    """compressed-tensors packs masks with numpy.packbits(bitorder="little"); ours must match bit
    for bit so its tools read our artifacts, including widths that are not a multiple of 8."""
    torch.manual_seed(0)
    mask = torch.rand(5, 37) < 0.5
    ours = pack_bitmask(mask)
    theirs = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(ours.numpy(), theirs)
    assert torch.equal(unpack_bitmask(ours, 37), mask)


def _records():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    mask = nm_mask(w.abs(), 2, 4)
    unstructured = w.abs() > 0.7
    grid = RTN(bits=4, group_size=32, symmetric=False).compress(w * mask)
    grid_u = RTN(bits=3, group_size=-1).compress(w * unstructured)
    return [
        SparseWeight.from_dense(w, unstructured),
        Sparse24Weight.from_dense(w, mask),
        Sparse24QuantizedWeight(mask, grid),
        SparseQuantizedWeight(unstructured, grid_u),
    ]


@pytest.mark.parametrize("record", _records(), ids=lambda r: r.format)
def test_round_trip_is_exact_and_pruned_weights_are_zero(record):
    """What is saved must be what was evaluated, and a pruned weight must be exactly zero."""
    back = type(record).from_tensors(record.tensors(), record.scheme())
    assert torch.equal(back.mask, record.mask)
    assert torch.equal(back.dequantize(), record.dequantize())
    assert (back.dequantize()[~record.mask] == 0).all()
    x = torch.randn(3, record.shape[1])
    y = back.module(None)(x)
    assert torch.allclose(y, x @ record.dequantize().T, atol=1e-5)


def test_sparse_bitmask_layout_matches_compressed_tensors():
    """Names and shapes of compressed-tensors' sparse-bitmask: 1-D values, row offsets."""
    rec = _records()[0]
    t = rec.tensors()
    assert set(t) == {"shape", "compressed", "bitmask", "row_offsets"}
    assert t["compressed"].dim() == 1 and t["bitmask"].dtype == torch.uint8
    counts = rec.mask.sum(1)
    assert torch.equal(t["row_offsets"], torch.cumsum(counts, 0) - counts)
    t24 = _records()[1].tensors()
    assert t24["compressed"].shape == (16, 32) and t24["shape"].shape == (2, 1)
