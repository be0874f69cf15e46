"""A PTQ recipe: zero or more block transforms followed by exactly one layer solver.

A recipe is a list of algorithms: *transforms* (entries with a ``transform_block`` method:
``awq``) followed by one *solver* (any entry with ``compress``: ``rtn``, ``gptq``, ``spqr``,
``adadim``, ``magnitude``, ``wanda``, ``sparsegpt``, ``lowrank``). Transforms run in order on each
block, then the last entry solves every layer. A transform that is also the last entry (``[awq]``)
solves with its own data-free rounding. Joint prune + quantize is one solver (``sparsegpt`` with
``bits``), not a pruner followed by a quantizer: only inside one sweep can the quantization
error be compensated together with the pruning error.

An ``embedding`` entry (:mod:`presso.compressors.quant.embedding`) may stand anywhere: it
quantizes the token embedding and lm_head after the solver, and is kept apart as ``embedding``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from presso import ConfigError
from presso.compressors.registry import build


@dataclass
class Recipe:
    transforms: list  # block transforms, applied in order (AWQ)
    solver: object  # the algorithm that turns each layer into a stored record
    embedding: object | None = None  # quantizes the embedding and lm_head afterwards (opt-in)

    @classmethod
    def parse(cls, entries: Sequence, prefix: str = "compress.recipe") -> Recipe:
        """Entries are algorithm objects or ``{name: {setting: value}}`` mappings (YAML)."""
        algos = []
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping):  # a dict, or an OmegaConf DictConfig
                if len(entry) != 1:
                    raise ConfigError(f"{prefix}[{i}]: expected one {{algorithm: settings}} pair")
                ((name, params),) = entry.items()
                entry = build(name, dict(params or {}), f"{prefix}[{i}]")
            algos.append(entry)
        embeddings = [a for a in algos if getattr(a, "quantizes_embeddings", False)]
        if len(embeddings) > 1:
            raise ConfigError(f"{prefix}: more than one embedding entry; keep one")
        algos = [a for a in algos if a not in embeddings]
        if not algos:
            raise ConfigError(f"{prefix}: empty; give at least one algorithm, e.g. [{{rtn: {{}}}}]")
        for i, algo in enumerate(algos[:-1]):
            if not hasattr(algo, "transform_block"):
                raise ConfigError(
                    f"{prefix}[{i}]: {getattr(algo, 'name', algo)} solves layers, so it must be "
                    "the last entry; only block transforms (awq) may come before the solver"
                )
        if not hasattr(algos[-1], "compress"):
            raise ConfigError(f"{prefix}[{len(algos) - 1}]: the last entry must solve layers")
        transforms = [a for a in algos if hasattr(a, "transform_block")]
        return cls(transforms, algos[-1], embeddings[0] if embeddings else None)

    def solver_stats(self):
        """The solver's statistic factory, or ``None`` when it solves without data."""
        if hasattr(self.solver, "transform_block"):  # a transform solves data-free (AWQ → RTN)
            return None
        return getattr(self.solver, "make_stats", None)

    @property
    def needs_data(self) -> bool:
        return bool(self.transforms) or self.solver_stats() is not None
