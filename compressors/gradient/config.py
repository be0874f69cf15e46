"""Settings of gradient compression (``train.grad_compression`` in a job file), and the registries
of its methods and families.

A *method* says how gradients are exchanged; the ``uniform`` and ``lgreco`` methods compress each
layer with a *family*, whose settings are its dataclass below (the job file keeps them flat under
``train.grad_compression``). ``method: powersgd`` is kept as another spelling of ``method: uniform,
family: powersgd`` for existing job files and scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from presso import ConfigError, UnsupportedError
from presso.compressors.gradient.powersgd import PowerSGD
from presso.compressors.gradient.quant import Quantize
from presso.compressors.gradient.topk import TopK
from presso.compressors.registry import Registry

QUANT_BITS = (2, 3, 4, 8)
FAMILIES = Registry("gradient family")
METHODS = Registry("gradient method")
ALIASES = {"powersgd": "uniform"}  # method spelling -> method it runs (with family powersgd)


def _check(key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


@dataclass
class PowerSGDSettings:
    """Low rank: P then Q all-reduced, warm-started and error-compensated."""

    parameter: ClassVar[str] = "rank"
    rank: int = 4  # PowerSGD rank: uniform setting and L-GreCo's reference
    rank_candidates: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # L-GreCo

    def check(self, prefix: str) -> None:
        _check(f"{prefix}.rank", self.rank, self.rank >= 1, "must be >= 1")
        for i, r in enumerate(self.rank_candidates):
            _check(f"{prefix}.rank_candidates[{i}]", r, r >= 1, "must be >= 1")


@dataclass
class TopKSettings:
    """Largest-magnitude entries: values and indices all-gathered."""

    parameter: ClassVar[str] = "density"
    density: float = 0.01  # top-k fraction of entries kept: uniform setting and reference
    density_candidates: list[float] = field(
        default_factory=lambda: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    )  # L-GreCo's top-k densities

    def check(self, prefix: str) -> None:
        _check(f"{prefix}.density", self.density, 0 < self.density <= 1, "must be in (0, 1]")
        for i, d in enumerate(self.density_candidates):
            _check(f"{prefix}.density_candidates[{i}]", d, 0 < d <= 1, "must be in (0, 1]")


@dataclass
class QuantSettings:
    """Stochastic rounding to few bits per bucket: packed codes all-gathered."""

    parameter: ClassVar[str] = "bits"
    bits: int = 4  # quantization bits: uniform setting and reference
    bits_candidates: list[int] = field(default_factory=lambda: list(QUANT_BITS))  # L-GreCo
    bucket_size: int = 512  # quantization values sharing one (min, scale); multiple of 32

    def check(self, prefix: str) -> None:
        rule = f"must be one of {QUANT_BITS}"
        _check(f"{prefix}.bits", self.bits, self.bits in QUANT_BITS, rule)
        for i, b in enumerate(self.bits_candidates):
            _check(f"{prefix}.bits_candidates[{i}]", b, b in QUANT_BITS, rule)
        _check(
            f"{prefix}.bucket_size",
            self.bucket_size,
            self.bucket_size > 0 and self.bucket_size % 32 == 0,
            "must be a positive multiple of 32",
        )


FAMILIES.add("powersgd", PowerSGDSettings, lambda cfg: PowerSGD())
FAMILIES.add("topk", TopKSettings, lambda cfg: TopK())
FAMILIES.add("quant", QuantSettings, lambda cfg: Quantize(cfg.bucket_size))


def _none(cfg, ddp_model, process_group):
    return None


def _communicator(cfg, ddp_model, process_group):
    from presso.compressors.gradient.communicator import Communicator

    return Communicator(cfg, ddp_model, process_group)


def _torch_powersgd(cfg, ddp_model, process_group):
    from presso.compressors.gradient.torch_powersgd import TorchPowerSGDCommunicator

    return TorchPowerSGDCommunicator(cfg, ddp_model, process_group)


def _galore(cfg, ddp_model, process_group):
    raise UnsupportedError(
        "grad_compression.method 'galore' is built with its optimizer: use "
        "presso.compressors.optim's build_galore_communicator(optimizer, ddp_model)"
    )


@dataclass
class LGreCoSettings:
    """Per-layer parameters of the family, re-planned by L-GreCo during training."""

    alpha: float = 1.0  # L-GreCo budget: total error <= alpha x error of the uniform reference
    adjust_every: int = 100  # steps between L-GreCo re-plans
    measure_steps: int = 3  # steps of error-compensated gradient summed before each re-plan


@dataclass
class NoSettings:
    """No settings of its own."""


METHODS.add("none", NoSettings, _none, "Plain DDP all-reduce, no hook.")
METHODS.add("uniform", NoSettings, _communicator, "The family at its setting for every layer.")
METHODS.add("lgreco", LGreCoSettings, _communicator)
METHODS.add("torch_powersgd", PowerSGDSettings, _torch_powersgd, "torch's powerSGD_hook (peer).")
METHODS.add("galore", NoSettings, _galore, "GaLore projected all-reduce, built with the optimizer.")

# OmegaConf checks a YAML value against an Enum type before any of presso's code runs; these are
# made from the registries, so the names live in one place.
Method = StrEnum("Method", {name: name for name in [*METHODS.names(), *ALIASES]})
Family = StrEnum("Family", {name: name for name in FAMILIES.names()})


@dataclass
class GradCompressionConfig(PowerSGDSettings, TopKSettings, QuantSettings, LGreCoSettings):
    method: Method = Method.none  # how gradients are exchanged (see METHODS)
    family: Family = Family.powersgd  # compressor for methods uniform and lgreco
    warmup_steps: int = 10  # dense all-reduce steps before any compression starts
    min_numel: int = 1024  # smaller tensors and all 1-D tensors go in the dense flat all-reduce
    seed: int = 0  # shared PowerSGD init and stochastic-rounding streams

    def __post_init__(self) -> None:
        # Accept plain strings from Python callers; validate() reports values that are not members.
        for name, enum in (("method", Method), ("family", Family)):
            value = getattr(self, name)
            if isinstance(value, str) and value in enum._value2member_map_:
                setattr(self, name, enum(value))

    @property
    def runs(self) -> str:
        """The registered method this config runs (``powersgd`` runs ``uniform``)."""
        return ALIASES.get(self.method.value, self.method.value)

    @property
    def settings(self):
        """The family's settings class: which keys hold its parameter and candidates."""
        return FAMILIES.get(self.family.value, "family").config

    def build_family(self):
        """The family object the communicator compresses with."""
        return FAMILIES.get(self.family.value, "family").build(self)

    def default(self):
        """The uniform parameter of the chosen family."""
        return getattr(self, self.settings.parameter)

    def candidates(self) -> list:
        """L-GreCo's candidate parameters of the chosen family."""
        return getattr(self, f"{self.settings.parameter}_candidates")

    def validate(self, prefix: str) -> None:
        for name, enum in (("method", Method), ("family", Family)):
            if not isinstance(getattr(self, name), enum):
                raise ConfigError(
                    f"{prefix}.{name}: must be one of {[m.value for m in enum]}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.method.value in ALIASES and self.family is not Family.powersgd:
            raise ConfigError(
                f"{prefix}.family: method 'powersgd' is uniform PowerSGD; for uniform "
                f"{self.family.value} set method: uniform"
            )
        for family in (PowerSGDSettings, TopKSettings, QuantSettings):
            family.check(self, prefix)
        _check(f"{prefix}.alpha", self.alpha, self.alpha > 0, "must be > 0")
        _check(f"{prefix}.adjust_every", self.adjust_every, self.adjust_every >= 1, "must be >= 1")
        _check(f"{prefix}.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0")
        _check(
            f"{prefix}.measure_steps",
            self.measure_steps,
            1 <= self.measure_steps <= self.adjust_every,
            "must be in [1, adjust_every]",
        )
        _check(f"{prefix}.min_numel", self.min_numel, self.min_numel >= 0, "must be >= 0")
        if self.method is Method.lgreco:
            name = self.settings.parameter
            if not self.candidates():
                raise ConfigError(f"{prefix}.{name}_candidates: L-GreCo needs at least one")
            if self.default() not in self.candidates():
                raise ConfigError(
                    f"{prefix}.{name}: L-GreCo's reference {self.default()} must be one of "
                    f"{name}_candidates {self.candidates()}; add it there"
                )
