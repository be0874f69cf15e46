"""Choosing between a Triton kernel and its torch reference."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under the interpreter; else the torch reference."""
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and not any(t.is_cuda for t in tensors)
