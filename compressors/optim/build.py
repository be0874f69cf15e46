"""Building an optimizer from an ``OptimizerConfig``, and measuring what its state costs."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from presso import ConfigError
from presso.compressors.optim.config import OPTIMIZERS, OptimizerConfig
from presso.compressors.optim.galore import GaLoreAdamW
from presso.compressors.optim.gradnormlorp import GradNormLoRP


def low_rank_parameters(
    model: nn.Module, modules: list[str], exclude: list[str]
) -> dict[str, nn.Parameter]:
    """Weights of the ``nn.Linear`` layers whose name matches a ``modules`` pattern and no
    ``exclude`` pattern, by parameter name. A weight shared with an excluded module (a tied
    ``lm_head``/embedding) stays out."""
    excluded_ids = {
        id(p)
        for name, module in model.named_modules()
        if any(fnmatchcase(name, pat) for pat in exclude)
        for p in module.parameters(recurse=False)
    }
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in excluded_ids:
            continue
        if any(fnmatchcase(name, pat) for pat in modules):
            chosen[f"{name}.weight"] = module.weight
    return chosen


def build_optimizer(
    cfg: OptimizerConfig, model: nn.Module, prefix: str = "train.optimizer"
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``model``'s trainable parameters. For the low-rank ones,
    the weights chosen by ``cfg.modules``/``cfg.exclude`` go low-rank, everything else AdamW."""
    cfg.validate(prefix)
    return OPTIMIZERS.get(cfg.name, f"{prefix}.name").build(cfg, model, prefix)


def _adamw(cfg: OptimizerConfig, model: nn.Module, prefix: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def _param_groups(cfg: OptimizerConfig, model: nn.Module, prefix: str) -> list[dict]:
    """The low-rank weights' group, then every other trainable parameter's."""
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = low_rank_parameters(model, cfg.modules, cfg.exclude)
    low_rank_ids = {id(p) for p in chosen.values() if p.requires_grad}
    if not low_rank_ids:
        raise ConfigError(
            f"{prefix}.modules: no trainable nn.Linear matches {list(cfg.modules)} outside "
            f"{list(cfg.exclude)}; list module names of the model, or use name: adamw"
        )
    groups = [
        {"params": [p for p in params if id(p) in low_rank_ids], "low_rank": True},
        {"params": [p for p in params if id(p) not in low_rank_ids], "low_rank": False},
    ]
    return [g for g in groups if g["params"]]


def _low_rank(cls):
    def build(cfg: OptimizerConfig, model: nn.Module, prefix: str) -> torch.optim.Optimizer:
        return cls(
            _param_groups(cfg, model, prefix),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            rank=cfg.rank,
            update_proj_gap=cfg.update_proj_gap,
            scale=cfg.scale,
            proj_type=cfg.proj_type,
            svd=cfg.svd,
            moments_on_switch=cfg.moments_on_switch,
            seed=cfg.seed,
            eight_bit=cfg.eight_bit,
            state_code=cfg.state_code,
            projector_dtype=cfg.projector_dtype,
        )

    return build


def _galore_torch(cfg: OptimizerConfig, model: nn.Module, prefix: str) -> torch.optim.Optimizer:
    """The reference implementation (galore-torch's GaLoreAdamW), for side-by-side runs."""
    try:
        from galore_torch import GaLoreAdamW as PeerGaLoreAdamW
    except ImportError as e:
        raise ConfigError(
            f"{prefix}.name: galore_torch needs galore-torch ({e}); pip install 'presso[peers]'"
        ) from None
    groups = _param_groups(cfg, model, prefix)
    for group in groups:
        low_rank = group.pop("low_rank")
        if low_rank:  # galore-torch marks its low-rank group by the presence of these keys
            group.update(
                rank=cfg.rank,
                update_proj_gap=cfg.update_proj_gap,
                scale=cfg.scale,
                proj_type=cfg.proj_type,
            )
    return PeerGaLoreAdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


OPTIMIZERS.add("adamw", OptimizerConfig, _adamw, "AdamW on every parameter.")
OPTIMIZERS.add("galore", OptimizerConfig, _low_rank(GaLoreAdamW), "GaLore, fp32 states.")
OPTIMIZERS.add("galore8bit", OptimizerConfig, _low_rank(GaLoreAdamW), "GaLore, 8-bit states.")
OPTIMIZERS.add("gradnormlorp", OptimizerConfig, _low_rank(GradNormLoRP), "GradNormLoRP, fp32.")
OPTIMIZERS.add(
    "gradnormlorp8bit", OptimizerConfig, _low_rank(GradNormLoRP), "GradNormLoRP, 8-bit states."
)
OPTIMIZERS.add("galore_torch", OptimizerConfig, _galore_torch, "galore-torch's GaLoreAdamW (peer).")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments, codes, scales, projectors, steps),
    including those an object in the state holds: galore-torch keeps each projector in one."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        for t in ([v] if torch.is_tensor(v) else vars(v).values() if hasattr(v, "__dict__") else [])
        if torch.is_tensor(t)
    )
