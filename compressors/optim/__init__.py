"""Low-rank optimizers: GaLore and GradNormLoRP (fp32 or 8-bit states), their config, and
GaLore's projected-gradient all-reduce for DDP.

    optimizer = build_optimizer(OptimizerConfig(name="galore", rank=128), model)
    comm = build_galore_communicator(optimizer, ddp_model)
    comm.register(ddp_model)
"""

from presso.compressors.optim.build import build_optimizer, low_rank_parameters, state_bytes
from presso.compressors.optim.comm import GaLoreCommunicator, build_galore_communicator
from presso.compressors.optim.config import OptimizerConfig
from presso.compressors.optim.galore import GaLoreAdamW
from presso.compressors.optim.gradnormlorp import GradNormLoRP

__all__ = [
    "GaLoreAdamW",
    "GaLoreCommunicator",
    "GradNormLoRP",
    "OptimizerConfig",
    "build_galore_communicator",
    "build_optimizer",
    "low_rank_parameters",
    "state_bytes",
]
