"""Choosing between a Triton kernel and its torch reference.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled for the GPU or run
by its CPU interpreter (``TRITON_INTERPRET=1``). So the kernels live in private modules that are
imported only when first needed, through :func:`triton_module`, which re-imports a module whose
kernels were built in the other mode. Importing ``presso.kernels`` itself never imports Triton.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

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


def triton_module(name: str) -> ModuleType:
    """``presso.kernels.<name>``, with its kernels built for the current interpreter setting.

    Each kernel module records the mode it was built in as ``INTERPRETED``; a module imported
    while ``TRITON_INTERPRET`` had another value is reloaded, so a test that sets the variable
    works whatever was imported before it.
    """
    module = importlib.import_module(f"presso.kernels.{name}")
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module
