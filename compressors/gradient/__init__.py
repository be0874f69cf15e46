"""Gradient compression for data-parallel training: PowerSGD, top-k and quantization per layer,
L-GreCo's adaptive per-layer plan, and torch's PowerSGD hook as the baseline, all as DDP comm
hooks with exact byte accounting.

    comm = build_communicator(cfg, ddp_model)   # None for method "none"
    comm.register(ddp_model)
    ... loss.backward(); optimizer.step(); metrics = comm.end_step()
"""

from __future__ import annotations

from presso import UnsupportedError
from presso.compressors.gradient.config import Family, GradCompressionConfig, Method


def build_communicator(cfg: GradCompressionConfig, ddp_model, process_group=None):
    """The communicator ``cfg.method`` asks for, not yet registered (call ``.register``); ``None``
    for ``method: none`` (plain DDP). ``process_group`` must be the one DDP was built with."""
    cfg.validate("grad_compression")
    if cfg.method is Method.none:
        return None
    if cfg.method is Method.galore:
        raise UnsupportedError(
            "grad_compression.method 'galore' is built with its optimizer: use "
            "presso.compressors.optim's build_galore_communicator(optimizer, ddp_model)"
        )
    if cfg.method is Method.torch_powersgd:
        from presso.compressors.gradient.torch_powersgd import TorchPowerSGDCommunicator

        return TorchPowerSGDCommunicator(cfg, ddp_model, process_group)
    from presso.compressors.gradient.communicator import Communicator

    return Communicator(cfg, ddp_model, process_group)


__all__ = ["Family", "GradCompressionConfig", "Method", "build_communicator"]
