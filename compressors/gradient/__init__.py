"""Gradient compression for data-parallel training: PowerSGD, top-k and quantization per layer,
L-GreCo's adaptive per-layer plan, and torch's PowerSGD hook as the baseline, all as DDP comm
hooks with exact byte accounting.

    comm = build_communicator(cfg, ddp_model)   # None for method "none"
    comm.register(ddp_model)
    ... loss.backward(); optimizer.step(); metrics = comm.end_step()
"""

from __future__ import annotations

from presso.compressors.gradient.config import (
    FAMILIES,
    METHODS,
    Family,
    GradCompressionConfig,
    Method,
)


def build_communicator(cfg: GradCompressionConfig, ddp_model, process_group=None):
    """The communicator ``cfg.method`` asks for, not yet registered (call ``.register``); ``None``
    for ``method: none`` (plain DDP). ``process_group`` must be the one DDP was built with."""
    cfg.validate("grad_compression")
    return METHODS.get(cfg.runs, "grad_compression.method").build(cfg, ddp_model, process_group)


__all__ = ["FAMILIES", "METHODS", "Family", "GradCompressionConfig", "Method", "build_communicator"]
