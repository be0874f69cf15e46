"""Block-wise 8-bit moment storage: the round trip stays within its stated error bound."""

import pytest
import torch

from presso.compressors.optim.quant8 import (
    BLOCK,
    CODES,
    dequantize_blockwise,
    max_abs_error,
    quantize_blockwise,
)


@pytest.mark.parametrize("kind", CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_within_stated_bound(kind, signed):
    """Every value comes back within ``max_abs_error * absmax`` of its block: the bound the
    8-bit optimizers' accuracy argument rests on. The bounds are also pinned to the code books'
    design (1/254 linear, 0.9/128 dynamic) so a broken code book cannot loosen them silently."""
    gen = torch.Generator().manual_seed(0)
    # Blocks with very different scales, and a length that is not a multiple of the block.
    x = torch.randn(37, 301, generator=gen) * torch.logspace(-6, 2, 37)[:, None]
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, kind, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.numel() == -(-x.numel() // BLOCK)
    y = dequantize_blockwise(codes, absmax, kind, signed)
    per_block = torch.nn.functional.pad(x.reshape(-1), (0, absmax.numel() * BLOCK - x.numel()))
    bound = max_abs_error(kind, signed) * per_block.view(-1, BLOCK).abs().amax(1)
    err = torch.nn.functional.pad((x - y).abs().reshape(-1), (0, per_block.numel() - x.numel()))
    assert bool((err.view(-1, BLOCK) <= bound[:, None] * (1 + 1e-5) + 1e-30).all())
    expected = {("linear", True): 1 / 254, ("linear", False): 1 / 510}
    expected.update({("dynamic", True): 0.9 / 128, ("dynamic", False): 0.9 / 256})
    assert max_abs_error(kind, signed) == pytest.approx(expected[kind, signed], rel=1e-5)


def test_dynamic_code_keeps_small_values_linear_does_not():
    """Adam's second moment spans decades inside one block; a value that rounds to zero under a
    non-zero first moment blows the step up. The dynamic code keeps it, the linear one does not."""
    x = torch.tensor([1.0, 1e-4, 3e-6] + [0.5] * 253)
    for kind, survives in (("dynamic", True), ("linear", False)):
        y = dequantize_blockwise(*quantize_blockwise(x, kind, signed=False), kind, signed=False)
        assert bool((y[1:3] > 0).all()) == survives
        if survives:
            assert torch.allclose(y[1:3], x[1:3], rtol=0.5)


def test_zero_and_extreme_blocks():
    """An all-zero block (fresh moments) decodes to exact zeros, and each block's absmax comes
    back exactly (it is a code-book level), so quantization never inflates a moment."""
    x = torch.zeros(3 * BLOCK)
    x[BLOCK + 7] = -3.5
    x[2 * BLOCK :] = torch.linspace(-2, 2, BLOCK)
    codes, absmax = quantize_blockwise(x, "dynamic", signed=True)
    y = dequantize_blockwise(codes, absmax, "dynamic", signed=True)
    assert torch.equal(y[:BLOCK], torch.zeros(BLOCK))
    assert y[BLOCK + 7] == -3.5 and y[2 * BLOCK] == -2 and y[-1] == 2
    assert torch.equal(absmax, torch.tensor([0.0, 3.5, 2.0]))


def test_storage_is_about_one_byte_a_value():
    """1 byte a value plus one fp32 scale per 256: ~25.4 % of fp32, what the memory bounds assume."""
    x = torch.randn(128, 1024)
    codes, absmax = quantize_blockwise(x)
    stored = codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
    assert stored / (x.numel() * 4) == pytest.approx((1 + 4 / 256) / 4)
