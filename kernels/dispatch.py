"""Choosing between a Triton kernel and its torch reference.

On a GPU a Triton kernel is used only where ``bench/kernel_speed.py`` measured it faster than
dequantizing the weight and calling cuBLAS, on that GPU model, for that kernel, batch size and
shape (the nearest measured ones): the tables are in ``kernels/measured/``, one JSON file per GPU
model. A GPU without a table gets dequantize-then-cuBLAS; measuring it
(``python bench/kernel_speed.py``) writes its table.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled for the GPU or run
by its CPU interpreter (``TRITON_INTERPRET=1``). So the kernels live in private modules that are
imported only when first needed, through :func:`triton_module`, which re-imports a module whose
kernels were built in the other mode. Importing ``presso.kernels`` itself never imports Triton.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
from pathlib import Path
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


MEASURED = Path(__file__).parent / "measured"


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` → ``"nvidia-h200"``: the table's file name for a GPU model."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def measured_table(device_name: str) -> dict | None:
    """``{kernel: [(M, K, N, speedup over cuBLAS fp16), ...]}`` for this GPU model, or None."""
    path = MEASURED / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["speedup"]
    return {kernel: [tuple(r) for r in entries] for kernel, entries in rows.items()}


def measured_speedup(table: dict | None, kernel: str, m: int, k: int, n: int) -> float | None:
    """The speedup measured for ``kernel`` at the nearest shape (log distance in K and N) and
    the smallest measured batch at least ``m`` (the largest if none is): kernels gain less as the
    batch grows, so rounding the batch up never overstates them."""
    entries = (table or {}).get(kernel)
    if not entries:
        return None
    batches = sorted({e[0] for e in entries})
    batch = next((b for b in batches if b >= m), batches[-1])
    at_batch = [e for e in entries if e[0] == batch]
    nearest = min(at_batch, key=lambda e: abs(math.log(e[1] / k)) + abs(math.log(e[2] / n)))
    return nearest[3]


def triton_pays(kernel: str, x: torch.Tensor, k: int, n: int) -> bool:
    """On CUDA: whether ``kernel`` was measured faster than dequantize-then-cuBLAS here.
    Elsewhere (the interpreter on CPU) the question does not arise: True."""
    if not x.is_cuda:
        return True
    m = x.numel() // max(1, x.shape[-1])
    speedup = measured_speedup(
        measured_table(torch.cuda.get_device_name(x.device)), kernel, m, k, n
    )
    return speedup is not None and speedup > 1.0
