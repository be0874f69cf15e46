"""Fused stochastic-rounding quantize+pack and unpack+dequantize kernels for gradients."""

from __future__ import annotations

import pytest
import torch

from presso.kernels import grad_quant as gq


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("bucket,n", [(32, 1), (96, 500), (512, 1300)])
def test_bit_identical_to_reference(bits, bucket, n):
    """With the same uniforms the kernels reproduce the reference word for word, including the
    padded tail of the last bucket and widths whose codes straddle int32 words (3, 5, 6, 7):
    workers mixing the two paths still agree bit for bit."""
    gen = torch.Generator().manual_seed(bits * n)
    x = torch.randn(n, generator=gen) * 3
    noise = gq.uniform_noise(max(1, -(-n // bucket)), bucket, seed=bits)
    packed, meta = gq.quantize_pack(x, bits, bucket, noise=noise)
    ref_packed, ref_meta = gq.quantize_pack_reference(x, bits, bucket, noise=noise)
    assert torch.equal(packed, ref_packed) and torch.equal(meta, ref_meta)
    y = gq.unpack_dequantize(packed, meta, bits, bucket, n)
    assert torch.equal(y, gq.unpack_dequantize_reference(packed, meta, bits, bucket, n))


def test_round_trip_error_within_one_step():
    """Stochastic rounding moves each value by less than one quantization step of its bucket."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0)).half()
    packed, meta = gq.quantize_pack(x, 4, 256, seed=7)
    y = gq.unpack_dequantize(packed, meta, 4, 256, x.numel())
    step = meta[:, 1].repeat_interleave(256)[: x.numel()]
    assert ((y - x.float()).abs() < step * (1 + 1e-6)).all()


def test_in_kernel_noise_is_seeded_and_unbiased():
    """Without explicit noise the kernel draws Philox uniforms: the same seed repeats, another
    seed differs, and the mean of many stochastically rounded copies of 0.3 on a grid of step 1
    is 0.3 (unbiased; 4 sigma of 4094 Bernoulli(0.3) draws is 0.029)."""
    n = 4096
    x = torch.full((n,), 0.3)
    x[0], x[1] = 0.0, 1.0  # pins the bucket's grid to {0, 1}
    a = gq.quantize_pack(x, 1, n, seed=1)
    assert torch.equal(a[0], gq.quantize_pack(x, 1, n, seed=1)[0])
    assert not torch.equal(a[0], gq.quantize_pack(x, 1, n, seed=2)[0])
    y = gq.unpack_dequantize(*a, 1, n, n)
    assert abs(y[2:].mean().item() - 0.3) < 0.029


def test_bad_bucket_is_rejected_on_every_path():
    """A bucket that is not a multiple of 32 cannot pack into whole words, kernel or not."""
    with pytest.raises(ValueError, match="multiple of 32"):
        gq.quantize_pack(torch.randn(64), 4, 48)
