"""Choosing Triton or the torch reference, and building kernels for the right mode."""

from __future__ import annotations

import pytest
import torch

from presso.kernels import dispatch, grad_quant, sparse24, wquant_matmul


def _refuse(*args, **kwargs):
    raise AssertionError("the torch reference ran where the Triton kernel should have")


def test_interpreter_runs_the_kernels_not_the_references(monkeypatch, make_quantized):
    """Under TRITON_INTERPRET=1 the public functions really launch the kernels, so the other
    tests in this folder compare kernel against reference, not reference against itself."""
    for module, name in [
        (wquant_matmul, "dequant_matmul_reference"),
        (sparse24, "sparse24_matmul_reference"),
        (grad_quant, "quantize_pack_reference"),
        (grad_quant, "unpack_dequantize_reference"),
    ]:
        monkeypatch.setattr(module, name, _refuse)
    wp, scale, zp = make_quantized(16, 64, 4, 32, True)
    wquant_matmul.dequant_matmul(torch.randn(2, 64), wp, scale, zp, 4, 32)
    mask = torch.zeros(16, 64, dtype=torch.bool)
    mask[:, ::2] = True
    values, positions = sparse24.compress_24(torch.ones(16, 64, dtype=torch.long), mask)
    sparse24.sparse24_matmul(torch.randn(2, 64), values, positions, scale, zp, 4, 32)
    packed, meta = grad_quant.quantize_pack(torch.randn(100), 4, 64)
    grad_quant.unpack_dequantize(packed, meta, 4, 64, 100)


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    """On the CPU without the interpreter nothing imports or launches Triton kernels."""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(torch.zeros(1))


def test_kernel_module_is_rebuilt_for_the_current_mode(monkeypatch):
    """A kernel module first imported in one mode is re-imported in the other, so the order in
    which test folders import presso.kernels cannot leave compiled kernels for a CPU test (they
    would fail with "0 active drivers") or interpreted ones for a GPU run."""
    assert dispatch.triton_module("_wquant_triton").INTERPRETED
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = dispatch.triton_module("_sparse24_triton")  # imports _wquant_triton itself
    assert not compiled.INTERPRETED and not compiled._dense.INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_module("_sparse24_triton").INTERPRETED
    assert dispatch.triton_module("_wquant_triton").INTERPRETED


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 4), (4, 36)])
def test_layouts_the_kernels_do_not_read_fall_back(bits, group, make_quantized, monkeypatch):
    """Widths whose codes straddle words, or groups that split a word, go to the reference."""
    monkeypatch.setattr(dispatch, "triton_module", _refuse)
    monkeypatch.setattr(wquant_matmul, "triton_module", _refuse)
    wp, scale, zp = make_quantized(8, 72, bits, group, True)
    x = torch.randn(1, 72)
    y = wquant_matmul.dequant_matmul(x, wp, scale, zp, bits, group)
    ref = wquant_matmul.dequant_matmul_reference(x, wp, scale, zp, bits, group)
    assert torch.equal(y, ref)
