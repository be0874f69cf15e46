"""The optimizer's config (``train.optimizer`` in a job), the registry of optimizers it selects
from, and the argument checks it shares with the optimizer classes, so a bad value fails the same
way from YAML and from a notebook."""

from __future__ import annotations

from dataclasses import dataclass, field

from presso import ConfigError
from presso.compressors.optim.quant8 import CODES
from presso.compressors.registry import Registry

# Every entry shares OptimizerConfig's settings; its builder is registered by optim.build.
OPTIMIZERS = Registry("optimizer", ("presso.compressors.optim.build",))
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")
SWITCH_POLICIES = ("keep", "reset", "reproject")
PROJECTOR_DTYPES = ("auto", "float32", "bfloat16")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def check_low_rank_args(
    prefix: str,
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    svd: str,
    moments_on_switch: str,
    state_code: str,
    projector_dtype: str,
) -> None:
    """Raise ``ConfigError`` naming ``prefix.<arg>`` for the first out-of-range low-rank setting."""
    if rank < 1:
        raise ConfigError(f"{prefix}.rank: must be >= 1, got {rank}")
    if update_proj_gap < 1:
        raise ConfigError(f"{prefix}.update_proj_gap: must be >= 1 (steps), got {update_proj_gap}")
    if not scale > 0:
        raise ConfigError(f"{prefix}.scale: must be > 0, got {scale}")
    _one_of(f"{prefix}.proj_type", proj_type, PROJ_TYPES)
    _one_of(f"{prefix}.svd", svd, SVD_METHODS)
    _one_of(f"{prefix}.moments_on_switch", moments_on_switch, SWITCH_POLICIES)
    _one_of(f"{prefix}.state_code", state_code, CODES)
    _one_of(f"{prefix}.projector_dtype", projector_dtype, PROJECTOR_DTYPES)


def check_adam_args(
    prefix: str, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Raise ``ConfigError`` naming ``prefix.<arg>`` for an out-of-range AdamW setting."""
    if not lr > 0:
        raise ConfigError(f"{prefix}.lr: must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{prefix}.betas: must be two values in [0, 1), got {list(betas)}")
    if not eps > 0:
        raise ConfigError(f"{prefix}.eps: must be > 0, got {eps}")
    if weight_decay < 0:
        raise ConfigError(f"{prefix}.weight_decay: must be >= 0, got {weight_decay}")


@dataclass
class OptimizerConfig:
    """Which optimizer trains the model, and its low-rank settings (ignored by ``adamw``)."""

    # adamw | galore | galore8bit | gradnormlorp | gradnormlorp8bit | galore_torch (peer)
    name: str = "adamw"
    # learning rate
    lr: float = 1e-3
    # Adam's (beta1, beta2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Adam's denominator floor
    eps: float = 1e-8
    # decoupled (AdamW) weight decay
    weight_decay: float = 0.0
    # rank r of the gradient subspace (clamped to the smaller side of each weight)
    rank: int = 128
    # steps between two SVDs of the gradient (subspace refreshes)
    update_proj_gap: int = 200
    # factor alpha on the low-rank update
    scale: float = 0.25
    # std: project the smaller side | reverse_std | left | right | full (both sides)
    proj_type: str = "std"
    # exact | randomized (seeded, cheaper for large weights)
    svd: str = "exact"
    # what Adam moments do when the subspace changes: keep | reset | reproject
    moments_on_switch: str = "reproject"
    # 8-bit variants: code book of the block-quantized moments, dynamic | linear
    state_code: str = "dynamic"
    # dtype the projectors are stored in: auto (bfloat16 for 8-bit variants) | float32 | bfloat16
    projector_dtype: str = "auto"
    # seed of the randomized SVD's test matrices
    seed: int = 0
    # fnmatch patterns over module names: nn.Linear layers whose weight goes low-rank
    modules: list[str] = field(default_factory=lambda: ["*"])
    # fnmatch patterns over module names kept on plain AdamW even when ``modules`` matches
    exclude: list[str] = field(default_factory=lambda: ["*lm_head", "*embed*"])

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.name", self.name, tuple(OPTIMIZERS.names()))
        check_adam_args(
            prefix, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        check_low_rank_args(
            prefix,
            rank=self.rank,
            update_proj_gap=self.update_proj_gap,
            scale=self.scale,
            proj_type=self.proj_type,
            svd=self.svd,
            moments_on_switch=self.moments_on_switch,
            state_code=self.state_code,
            projector_dtype=self.projector_dtype,
        )
        if not self.modules:
            raise ConfigError(f"{prefix}.modules: must list at least one pattern (e.g. ['*'])")

    @property
    def eight_bit(self) -> bool:
        return self.name.endswith("8bit")
