"""AWQ: the scale fold is exact before quantization, and it lowers the quantized error."""

import copy

import pytest
import torch

from presso.compressors.ptq.architectures import LLAMA
from presso.compressors.ptq.blocks import (
    Recipe,
    accumulate_stats,
    block_outputs,
    capture_block_inputs,
    compress_model,
    select_layers,
)
from presso.compressors.quant.awq import AWQ


def _loud(model):
    """The tiny Llama with a few loud activation channels, as trained LLMs have (AWQ's
    premise); random init alone gives flat activations where scaling has nothing to gain."""
    loud = torch.ones(64)
    loud[torch.randperm(64)[:4]] = 20.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(loud)
            layer.post_attention_layernorm.weight.mul_(loud)
    return model


def _calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 24), generator=gen) for _ in range(3)]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_scaling_is_an_exact_fold(kv_heads, make_llama):
    """Before any rounding, scaling weights up and folding the inverse into the preceding norm or
    linear must leave the block computing the same function; otherwise AWQ would trade
    quantization error for a systematic one. With grouped KV heads the v → o fold is skipped."""
    torch.set_num_threads(1)
    model = _loud(make_llama(kv_heads=kv_heads, tied=False))
    awq = AWQ(bits=3, group_size=32, clip=False)
    (prefix, names), _ = select_layers(model, Recipe([awq], awq), ()).blocks
    block, linears = model.get_submodule(prefix), {n: model.get_submodule(n) for n in names}
    inputs = capture_block_inputs(model, _calib())
    before = block_outputs(block, inputs).hidden
    norm_before = block.input_layernorm.weight.clone()
    stats = accumulate_stats(block, inputs, awq.make_stats, linears)
    alphas = awq.transform_block(block, stats, prefix, LLAMA)
    after = block_outputs(block, inputs).hidden
    assert ("self_attn.v_proj" in alphas) == (kv_heads == 4)
    assert not torch.equal(block.input_layernorm.weight, norm_before)  # something was scaled
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _logit_error(model, recipe, calib, test):
    with torch.no_grad():
        ref = model(test).logits
    m = copy.deepcopy(model)
    compress_model(m, recipe, calib)
    with torch.no_grad():
        return float(((m(test).logits - ref) ** 2).mean())


def test_awq_lowers_the_quantized_error(make_llama):
    """With loud activation channels, AWQ (scales + clipping, then RTN) must beat plain RTN on
    the same grid: the reason to run it at all."""
    torch.set_num_threads(1)
    model = _loud(make_llama(kv_heads=4, tied=False))
    calib, test = _calib(), torch.randint(0, 96, (2, 24))
    grid = {"bits": 3, "group_size": 32}
    rtn = _logit_error(model, [{"rtn": grid}], calib, test)
    awq = _logit_error(model, [{"awq": grid}], calib, test)
    assert awq < 0.8 * rtn
