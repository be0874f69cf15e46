"""2:4 sparse + int4/int8 format and its in-kernel decoding matmul."""

from __future__ import annotations

import pytest
import torch

from presso import UnsupportedError
from presso.kernels import sparse24 as sp
from presso.kernels.packing import pack_int32
from presso.kernels.wquant_matmul import dequantize_weight


def _mask_24(n: int, k: int, seed: int) -> torch.Tensor:
    """Two kept of every four, plus runs that keep one or none (all three encodings)."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, top, True)
    mask[0, :3] = False  # none kept
    mask[1, :3, 1:] = False  # at most one kept (position 0 when it was kept)
    mask[2, :3] = torch.tensor([False, False, False, True])  # one kept at position 3
    return mask.flatten(1)


@pytest.mark.parametrize("bits", [4, 8])
def test_compress_round_trip(bits):
    """compress_24 / decompress_24 return exactly the kept codes and the mask, for runs that keep
    two, one or no weights, at either width."""
    n, k = 6, 72
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(0))
    mask = _mask_24(n, k, 1)
    values, positions = sp.compress_24(codes, mask, bits)
    assert values.shape == (n, -(-(k // 2) * bits // 32)) and positions.shape == (n, -(-k // 32))
    got_codes, got_mask = sp.decompress_24(values, positions, k, bits)
    assert torch.equal(got_mask, mask)
    assert torch.equal(got_codes.long(), codes * mask)


def test_pruned_weights_are_exact_zeros():
    """A pruned weight is 0 whatever the zero point (the format stores no code for it), and a kept
    one dequantizes exactly as in the dense layout."""
    n, k, bits, group = 4, 64, 4, 32
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, 2, generator=gen).half() + 0.1
    zp = pack_int32(torch.randint(1, 16, (n, 2), generator=gen), bits, dim=0)  # nonzero zeros
    mask = _mask_24(n, k, 3)
    w = sp.dequantize_24(*sp.compress_24(codes, mask), scale, zp, bits, group, k)
    dense = dequantize_weight(pack_int32(codes, bits), scale, zp, bits, group, k)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(w[mask], dense[mask])


def test_compact_size():
    """At 4 bits the format is 3 bits per weight (4-bit code + 2-bit position per kept half),
    i.e. 3/4 of dense int4: the bandwidth the kernel saves."""
    n, k = 8, 4096
    codes = torch.zeros(n, k, dtype=torch.long)
    values, positions = sp.compress_24(codes, _mask_24(n, k, 0))
    dense = pack_int32(codes, 4)
    assert (values.numel() + positions.numel()) * 4 == dense.numel() * 3


def test_rejects_non_24_masks():
    """Three kept weights in a run, or K not a multiple of 4, cannot be stored: say where/why."""
    codes = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 4:7] = True
    with pytest.raises(UnsupportedError, match="row 1, columns 4..7 keep 3"):
        sp.compress_24(codes, mask)
    with pytest.raises(UnsupportedError, match="multiple of 4"):
        sp.compress_24(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.bool))


@pytest.mark.parametrize(
    "m,n,k,bits,group,asym,dtype",
    [
        (1, 70, 200, 4, 32, True, torch.float16),
        (3, 64, 128, 8, 64, False, torch.bfloat16),
        (16, 50, 256, 4, 128, True, torch.float32),
        (33, 100, 200, 4, 64, False, torch.float16),
    ],
)
def test_kernel_matches_reference(assert_close, m, n, k, bits, group, asym, dtype):
    """The kernel decodes positions in registers and runs a dense tl.dot: same product as the
    reference for tails that are not multiples of the tile, both widths, with and without zeros."""
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    groups = -(-k // group)
    scale = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).half()
    zp = (
        pack_int32(torch.randint(0, 1 << bits, (n, groups), generator=gen), bits, 0)
        if asym
        else None
    )
    values, positions = sp.compress_24(codes, _mask_24(n, k, m), bits)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = sp.sparse24_matmul(x, values, positions, scale, zp, bits, group, bias)
    ref = sp.sparse24_matmul_reference(x, values, positions, scale, zp, bits, group, bias)
    assert_close(y, ref)
