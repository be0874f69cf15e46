"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` is set per test (not at import), so it never leaks into other folders'
tests; the kernel modules are imported lazily through ``presso.kernels.dispatch.triton_module``,
which rebuilds them if they were first built in the other mode. Tests marked ``gpu`` run the
compiled kernels on CUDA (the root conftest skips them without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from presso.kernels.packing import pack_int32

# Tolerances against the fp32 torch references, relative to the largest output: fp32 keeps
# ~1e-6; fp16 / bf16 outputs round to 11 / 8 significant bits (and the tl.dot path rounds the
# dequantized weights to that dtype too), so a few units in the last place.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.node.get_closest_marker("gpu"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def make_quantized():
    """``make(n, k, bits, group, asym, seed)`` -> random packed ``(weight, scale, zero_point)``."""

    def make(n, k, bits, group, asym, seed=0, scale_dtype=torch.float16, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        groups = -(-k // group)
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
        scale = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).to(scale_dtype)
        zp = None
        if asym:
            zp = pack_int32(torch.randint(0, 1 << bits, (n, groups), generator=gen), bits, dim=0)
            zp = zp.to(device)
        return pack_int32(codes, bits).to(device), scale.to(device), zp

    return make


@pytest.fixture
def assert_close():
    """Compare a kernel's output with its reference within ``TOLERANCE`` of the output dtype."""

    def check(y: torch.Tensor, ref: torch.Tensor) -> None:
        assert y.dtype == ref.dtype and y.shape == ref.shape
        tol = TOLERANCE[ref.dtype]
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)

    return check
