"""Name → algorithm and name → stored-format registries.

An algorithm is a dataclass whose fields are its settings and whose ``compress`` method turns
one layer's weight (plus calibration statistics, if it needs them) into a stored record. A stored
format is a record class with ``tensors()``, ``scheme()``, ``from_tensors()`` and ``module()``.
The orchestrator builds both by name from the config; adding an algorithm touches its own module.
"""

from __future__ import annotations

import dataclasses
import importlib

from presso import ConfigError, IntegrityError

ALGORITHMS: dict[str, type] = {}
FORMATS: dict[str, type] = {}

# The modules whose import registers algorithms and stored formats. Every lookup imports them
# first, so a fresh process (``presso.load_compressed``, the MLflow pyfunc model) finds every name
# without depending on what happened to be imported before.
REGISTERING_MODULES = tuple(
    f"presso.compressors.{name}"
    for name in (
        "quant.rtn", "quant.gptq", "quant.awq", "quant.spqr", "quant.adadim",
        "prune.magnitude", "prune.wanda", "prune.sparsegpt", "factor.lowrank",
        "formats.quantized", "formats.sparse", "formats.spqr", "formats.lowrank",
    )
)  # fmt: skip


def _import_registering_modules() -> None:
    for module in REGISTERING_MODULES:
        importlib.import_module(module)


def register(name: str):
    """Class decorator: make an algorithm buildable as ``name`` from a config."""

    def add(cls):
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return add


def register_format(cls):
    """Class decorator: make a stored record loadable from an artifact by its ``format``."""
    FORMATS[cls.format] = cls
    return cls


def build(name: str, params: dict, prefix: str = "compress.recipe"):
    """Instantiate algorithm ``name`` with ``params``; unknown names and keys fail with the key."""
    _import_registering_modules()
    if name not in ALGORITHMS:
        raise ConfigError(f"{prefix}: unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{name}.{key}: unknown setting; known: {sorted(fields)}")
        expected = fields[key].type
        if expected in ("int", "float", "bool") and not _fits(value, expected):
            raise ConfigError(f"{prefix}.{name}.{key}: expected {expected}, got {value!r}")
    algo = cls(**params)
    if hasattr(algo, "validate"):
        algo.validate(f"{prefix}.{name}")
    return algo


def stored_format(name: str) -> type:
    """The record class that reads layers stored as ``name`` from an artifact."""
    _import_registering_modules()
    if name not in FORMATS:
        raise IntegrityError(
            f"unknown stored format {name!r}; known: {sorted(FORMATS)} — the artifact was written "
            "by another presso version: load it with that version or compress the model again"
        )
    return FORMATS[name]


def _fits(value, type_name: str) -> bool:
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_range(prefix: str, value, lo, hi, what: str = "") -> None:
    """Raise a ConfigError naming ``prefix`` unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        raise ConfigError(f"{prefix}: must be in [{lo}, {hi}]{what}, got {value}")
