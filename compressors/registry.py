"""One registry pattern for every selectable component.

A component is chosen by name from a config: PTQ algorithms, stored formats, gradient methods and
families, optimizers. Each registry entry is a dataclass whose fields are the component's
settings (its *config*), the callable that builds the component from it, and a one-line
description. Config validation, ``presso algorithms``-style listings and the README catalogue all
read the same entries (:func:`catalogue`)::

    ALGORITHMS.names()                 # ['adadim', 'awq', 'gptq', ...]
    ALGORITHMS.settings("gptq")        # [Setting('bits', 'int', 4), ...]
    build("gptq", {"bits": 3})         # a checked GPTQ(bits=3, ...)

For PTQ algorithms the config *is* the object (``GPTQ(bits=4).compress(...)``); for the others
``build`` is a function of the config (and of what else the component needs, e.g. the model).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from presso import ConfigError, IntegrityError

REGISTRIES: list[Registry] = []  # every registry, in creation order (for catalogue())


@dataclass(frozen=True)
class Setting:
    name: str
    type: str
    default: object
    help: str = ""  # what it does: the field's trailing comment in its dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    config: type  # a dataclass: its fields are the settings
    build: (
        Callable  # builds the component from a config (the config class itself when they are one)
    )
    description: str  # one line

    def settings(self) -> list[Setting]:
        out, helps = [], field_comments(self.config)
        for f in dataclasses.fields(self.config):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out.append(Setting(f.name, str(f.type), default, helps.get(f.name, "")))
        return out


_FIELD_LINE = re.compile(r"^    (\w+)\s*:[^#]*#\s*(.+)$")  # `    name: type = default  # help`


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing comment, from the class and the dataclasses it extends:
    the settings are documented once, where they are declared."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen install): no help texts
            continue
        for line in source.splitlines():
            m = _FIELD_LINE.match(line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


class Registry:
    """Name → :class:`Entry` for one kind of component. ``modules`` are imported before any lookup,
    so a fresh process finds every name whatever it happened to import before."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind, self.modules = kind, modules
        self._entries: dict[str, Entry] = {}
        REGISTRIES.append(self)

    def add(self, name: str, config: type, build: Callable | None = None, description: str = ""):
        doc = (config.__doc__ or "").strip().split("\n")[0]
        if doc.startswith(f"{config.__name__}("):  # the signature dataclass writes, not a text
            doc = ""
        if not (description or doc):
            raise TypeError(f"{self.kind} {name!r}: give a one-line description (or a docstring)")
        self._entries[name] = Entry(name, config, build or config, description or doc)
        return self._entries[name]

    def register(self, name: str, description: str = ""):
        """Class decorator: the class is both the config and the component."""

        def add(cls):
            self.add(name, cls, cls, description)
            return cls

        return add

    def _load(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        """In registration order."""
        self._load()
        return list(self._entries)

    def get(self, name: str, prefix: str) -> Entry:
        """The entry ``name``; unknown names fail naming ``prefix`` and the known names."""
        self._load()
        if name not in self._entries:
            raise ConfigError(
                f"{prefix}: unknown {self.kind} {name!r}; known: {sorted(self._entries)}"
            )
        return self._entries[name]

    def settings(self, name: str) -> list[Setting]:
        return self.get(name, self.kind).settings()


ALGORITHMS = Registry(
    "algorithm",
    tuple(
        f"presso.compressors.{name}"
        for name in (
            "quant.rtn", "quant.gptq", "quant.awq", "quant.spqr", "quant.adadim", "quant.embedding",
            "prune.magnitude", "prune.wanda", "prune.sparsegpt", "factor.lowrank",
        )
    ),
)  # fmt: skip
FORMATS = Registry(
    "stored format",
    tuple(
        f"presso.compressors.formats.{name}" for name in ("quantized", "sparse", "spqr", "lowrank")
    ),
)


def register(name: str, description: str = ""):
    """Class decorator: make a PTQ algorithm buildable as ``name`` from a config;
    ``description``: one line on what it is for (else the class docstring's first line)."""

    def add(cls):
        cls.name = name
        return ALGORITHMS.register(name, description)(cls)

    return add


def register_format(cls):
    """Class decorator: make a stored record loadable from an artifact by its ``format``."""
    return FORMATS.register(cls.format)(cls)


def build(name: str, params: dict, prefix: str = "compress.recipe"):
    """Instantiate algorithm ``name`` with ``params``; unknown names and keys fail with the key."""
    cls = ALGORITHMS.get(name, prefix).config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{name}.{key}: unknown setting; known: {sorted(fields)}")
        expected = fields[key].type
        if expected in ("int", "float", "bool", "str") and not _fits(value, expected):
            raise ConfigError(f"{prefix}.{name}.{key}: expected {expected}, got {value!r}")
    algo = cls(**params)
    if hasattr(algo, "validate"):
        algo.validate(f"{prefix}.{name}")
    return algo


def stored_format(name: str) -> type:
    """The record class that reads layers stored as ``name`` from an artifact."""
    if name not in FORMATS:
        raise IntegrityError(
            f"unknown stored format {name!r}; known: {sorted(FORMATS.names())} — the artifact was "
            "written by another presso version: load it with that version or compress the model "
            "again"
        )
    return FORMATS.get(name, "format").config


def catalogue() -> dict[str, list[Entry]]:
    """Every registry's entries by kind: what a listing or the README's catalogue shows."""
    for module in ("presso.compressors.gradient.config", "presso.compressors.optim.config"):
        importlib.import_module(module)
    return {r.kind: [r.get(n, r.kind) for n in r.names()] for r in REGISTRIES}


def _fits(value, type_name: str) -> bool:
    if type_name == "str":
        return isinstance(value, str)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_range(prefix: str, value, lo, hi, what: str = "") -> None:
    """Raise a ConfigError naming ``prefix`` unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        raise ConfigError(f"{prefix}: must be in [{lo}, {hi}]{what}, got {value}")
