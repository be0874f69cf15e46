"""Settings of gradient compression (``train.grad_compression`` in a job file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from presso import ConfigError


class Method(StrEnum):
    none = "none"  # plain DDP all-reduce, no hook
    powersgd = "powersgd"  # Presso PowerSGD at one rank for every layer
    uniform = "uniform"  # any family at its default parameter for every layer
    lgreco = "lgreco"  # per-layer parameters re-planned by L-GreCo during training
    torch_powersgd = "torch_powersgd"  # torch's built-in powerSGD_hook (the peer baseline)
    galore = "galore"  # GaLore projected all-reduce, built with the optimizer (issue 4)


class Family(StrEnum):
    powersgd = "powersgd"  # low rank: P then Q all-reduced
    topk = "topk"  # largest-magnitude entries: values + indices all-gathered
    quant = "quant"  # stochastic rounding to few bits per bucket: packed codes all-gathered


QUANT_BITS = (2, 3, 4, 8)


@dataclass
class GradCompressionConfig:
    method: Method = Method.none  # how gradients are exchanged (see Method)
    family: Family = Family.powersgd  # compressor for methods uniform and lgreco
    rank: int = 4  # PowerSGD rank: uniform setting and L-GreCo's reference
    rank_candidates: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # L-GreCo
    density: float = 0.01  # top-k fraction of entries kept: uniform setting and reference
    density_candidates: list[float] = field(
        default_factory=lambda: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    )  # L-GreCo's top-k densities
    bits: int = 4  # quantization bits: uniform setting and reference
    bits_candidates: list[int] = field(default_factory=lambda: list(QUANT_BITS))  # L-GreCo
    alpha: float = 1.0  # L-GreCo budget: total error <= alpha x error of the uniform reference
    adjust_every: int = 100  # steps between L-GreCo re-plans
    warmup_steps: int = 10  # dense all-reduce steps before any compression starts
    measure_steps: int = 3  # steps of error-compensated gradient summed before each re-plan
    bucket_size: int = 512  # quantization values sharing one (min, scale); multiple of 32
    min_numel: int = 1024  # smaller tensors and all 1-D tensors go in the dense flat all-reduce
    seed: int = 0  # shared PowerSGD init and stochastic-rounding streams

    def __post_init__(self) -> None:
        # Accept plain strings from Python callers; validate() reports values that are not members.
        for name, enum in (("method", Method), ("family", Family)):
            value = getattr(self, name)
            if isinstance(value, str) and value in enum._value2member_map_:
                setattr(self, name, enum(value))

    def default(self):
        """The uniform parameter of the chosen family."""
        return {Family.powersgd: self.rank, Family.topk: self.density, Family.quant: self.bits}[
            self.family
        ]

    def candidates(self) -> list:
        """L-GreCo's candidate parameters of the chosen family."""
        return {
            Family.powersgd: self.rank_candidates,
            Family.topk: self.density_candidates,
            Family.quant: self.bits_candidates,
        }[self.family]

    def validate(self, prefix: str) -> None:
        for name, enum in (("method", Method), ("family", Family)):
            if not isinstance(getattr(self, name), enum):
                raise ConfigError(
                    f"{prefix}.{name}: must be one of {[m.value for m in enum]}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.method is Method.powersgd and self.family is not Family.powersgd:
            raise ConfigError(
                f"{prefix}.family: method 'powersgd' is uniform PowerSGD; for uniform "
                f"{self.family.value} set method: uniform"
            )
        _check(f"{prefix}.rank", self.rank, self.rank >= 1, "must be >= 1")
        _check(f"{prefix}.density", self.density, 0 < self.density <= 1, "must be in (0, 1]")
        _check(f"{prefix}.bits", self.bits, self.bits in QUANT_BITS, f"must be one of {QUANT_BITS}")
        for i, r in enumerate(self.rank_candidates):
            _check(f"{prefix}.rank_candidates[{i}]", r, r >= 1, "must be >= 1")
        for i, d in enumerate(self.density_candidates):
            _check(f"{prefix}.density_candidates[{i}]", d, 0 < d <= 1, "must be in (0, 1]")
        for i, b in enumerate(self.bits_candidates):
            _check(
                f"{prefix}.bits_candidates[{i}]", b, b in QUANT_BITS, f"must be one of {QUANT_BITS}"
            )
        _check(f"{prefix}.alpha", self.alpha, self.alpha > 0, "must be > 0")
        _check(f"{prefix}.adjust_every", self.adjust_every, self.adjust_every >= 1, "must be >= 1")
        _check(f"{prefix}.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0")
        _check(
            f"{prefix}.measure_steps",
            self.measure_steps,
            1 <= self.measure_steps <= self.adjust_every,
            "must be in [1, adjust_every]",
        )
        _check(
            f"{prefix}.bucket_size",
            self.bucket_size,
            self.bucket_size > 0 and self.bucket_size % 32 == 0,
            "must be a positive multiple of 32",
        )
        _check(f"{prefix}.min_numel", self.min_numel, self.min_numel >= 0, "must be >= 0")
        if self.method is Method.lgreco:
            key = {Family.powersgd: "rank", Family.topk: "density", Family.quant: "bits"}
            name = key[self.family]
            if not self.candidates():
                raise ConfigError(f"{prefix}.{name}_candidates: L-GreCo needs at least one")
            if self.default() not in self.candidates():
                raise ConfigError(
                    f"{prefix}.{name}: L-GreCo's reference {self.default()} must be one of "
                    f"{name}_candidates {self.candidates()}; add it there"
                )


def _check(key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")
