"""Per-layer candidates of the budget planner: each one's exact stored bytes and its output error.

A layer of ``N`` outputs and ``K`` inputs is offered (a :class:`CandidateGrid` says which):

- **quantized**: bits × group sizes (those dividing ``K``; ``-1`` is one scale per row) ×
  symmetric/asymmetric grids, stored ``pack-quantized``;
- **pruned**: a pattern (``2:4`` or ``unstructured`` at ``sparsity``), with the kept values in
  fp16 or on a grid (joint prune + quantize, e.g. 2:4 + W4);
- **low-rank**: ranks read off the layer's whitened singular-value spectrum
  (:mod:`presso.compressors.factor.lowrank`), ``US`` and ``V`` in fp16;
- **dense**: the layer stays as it is.

The token embedding, when tied to ``lm_head`` (one stored matrix for both), is one more decision:
as stored, or round-to-nearest on ``embedding_bits`` grids of ``embedding_group_size`` columns
(what the ``embedding`` recipe entry ships, so its error is exact): :func:`measure_embedding`.

**Bytes** come from the shape alone (:meth:`Candidate.tensor_specs`): the exact tensors a stored
record holds — codes, scales, zero points, masks, offsets, shape tensors — so a budget can be
checked before any calibration. The tests hold them equal to what ``save_compressed`` stores.

**Errors** are the output error ``‖X Wᵀ - X Ŵᵀ‖²`` per calibration token, ``(Δ H Δᵀ)ᵢᵢ`` per
output ``i`` with the full mean Hessian (fp32 products: a ranking, not a report). ``Δ`` comes
from the data-free version of each candidate (round-to-nearest for grids, magnitude masks for
pruning; the low-rank factors are already the output-optimal ones), and by default
(``solver_scaled``) each layer's data-free errors are then scaled to what the solver that will
ship the layer makes: one GPTQ solve of the layer's median grid candidate and one SparseGPT solve
of its median pruned candidate give the layer's ratio of solver error to data-free error for each
kind. Within a layer that ratio barely moves between candidates (SmolLM2: 0.38-0.42 over every
grid and pattern of a ``down_proj``; rank correlation 0.997-0.999), but between layers it runs
from 0.2 to 0.5, and the knapsack trades bytes *between* layers: planning on data-free errors
alone spends bytes where GPTQ would have repaired the error anyway.
By default (``error: loss``) each output's error is also weighted by the loss's sensitivity to
that output (:func:`~presso.compressors.plan.planner.output_sensitivity`), which makes errors of
different layers comparable; unweighted, a small error in an early block's attention outputs
looks cheap though every later block reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from presso import ConfigError
from presso.compressors.factor.lowrank import LowRank, spectrum_ranks, whitened_svd
from presso.compressors.formats.sparse import (
    Sparse24QuantizedWeight,
    SparseQuantizedWeight,
    sparse_record,
)
from presso.compressors.prune.masks import parse_pattern, prune_mask
from presso.compressors.prune.sparsegpt import SparseGPT
from presso.compressors.ptq.calibration import HessianStats
from presso.compressors.quant.gptq import GPTQ
from presso.compressors.quant.primitives import PER_CHANNEL
from presso.compressors.quant.rtn import RTN
from presso.compressors.registry import check_range

Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # stored tensor suffix → (dtype, shape)


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer. ``bits == 0`` means values are not on an integer grid."""

    bits: int = 0  # code width of the stored values; 0: fp16 (pruned) or untouched (dense)
    group_size: int = PER_CHANNEL  # input columns sharing a scale when bits > 0; -1 per row
    symmetric: bool = True  # zero point fixed at 0 when bits > 0
    pattern: str = ""  # pruning: "2:4" (any "N:M") or "unstructured"; "" keeps every weight
    sparsity: float = 0.0  # fraction removed by the "unstructured" pattern
    rank: int = 0  # > 0: low-rank factors of this rank

    @property
    def kind(self) -> str:
        if self.rank:
            return "lowrank"
        if self.pattern:
            return "sparse"
        return "quant" if self.bits else "dense"

    @property
    def label(self) -> str:
        grid = ""
        if self.bits:
            g = "ch" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
            grid = f"W{self.bits} {g}" + ("" if self.symmetric else " asym")
        if self.rank:
            return f"rank {self.rank}"
        if self.pattern:
            prune = self.pattern if ":" in self.pattern else f"{self.sparsity:.0%}"
            return f"{prune}+{grid}" if grid else prune
        return grid or "dense"

    def _nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    def kept(self, n: int, k: int) -> int:
        """Weights a pruned record keeps (both pruners remove exactly this many)."""
        nm = self._nm()
        if nm is None:
            return n * k - round(self.sparsity * n * k) if self.pattern else n * k
        return n * (k // nm[1]) * nm[0]

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype = torch.float32) -> Specs:
        """The tensors this candidate's record stores for an ``[n, k]`` weight (``dtype``: the
        weight's own, for a layer left dense)."""
        i64, i32, f16 = torch.int64, torch.int32, torch.float16
        shape = {"weight_shape": (i64, (2,))}
        if self.rank:
            return {"weight_us": (f16, (n, self.rank)), "weight_v": (f16, (self.rank, k)), **shape}
        if self.kind == "dense":
            return {"weight": (dtype, (n, k))}
        mask = {"bitmask": (torch.uint8, (n, math.ceil(k / 8)))}
        two_four = self._nm() == (2, 4)
        if not self.bits:  # pruned, fp16 values (sparse-bitmask / sparse-24-bitmask)
            if two_four:
                return {"shape": (i64, (2, 1)), "compressed": (f16, (n, k // 2)), **mask}
            kept = self.kept(n, k)
            return {"shape": (i64, (2,)), "compressed": (f16, (kept,)), **mask,
                    "row_offsets": (i64, (n,))}  # fmt: skip
        b = self.bits
        groups = 1 if self.group_size == PER_CHANNEL else k // self.group_size
        grid = {"weight_scale": (f16, (n, groups)), **shape}
        if not self.symmetric:
            grid["weight_zero_point"] = (i32, (math.ceil(n * b / 32), groups))
        if not self.pattern:
            return {"weight_packed": (i32, (n, math.ceil(k * b / 32))), **grid}
        if two_four:
            return {**grid, "weight_values": (i32, (n, math.ceil(k // 2 * b / 32))),
                    "weight_positions": (i32, (n, math.ceil(k / 32)))}  # fmt: skip
        return {**grid, "weight_packed": (i32, (1, math.ceil(self.kept(n, k) * b / 32))), **mask}

    def nbytes(self, n: int, k: int, dtype: torch.dtype = torch.float32) -> int:
        return spec_bytes(self.tensor_specs(n, k, dtype))

    def solver(self, damp: float = 0.01):
        """The calibrated algorithm that solves this setting for real (``None``: stays dense)."""
        grid = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.rank:
            return LowRank(rank=self.rank, damp=damp)
        if self.pattern:
            prune = {"pattern": self.pattern, "damp": damp}
            if self.pattern == "unstructured":
                prune["sparsity"] = self.sparsity
            return SparseGPT(**prune, **(grid if self.bits else {}))
        return GPTQ(**grid, damp=damp) if self.bits else None  # act-order, GPTQ's default

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The magnitude mask of a pruned candidate's data-free version."""
        return prune_mask(weight.abs(), self.sparsity, self._nm(), per_row=False)

    def proxy(self, weight: torch.Tensor, mask: torch.Tensor | None = None):
        """The data-free record whose error stands in for this candidate's (not low-rank);
        ``mask``: :meth:`mask`'s result, when the caller has it for this pattern already."""
        rtn = RTN(self.bits, self.group_size, self.symmetric) if self.bits else None
        if not self.pattern:
            return rtn.compress(weight)
        nm = self._nm()
        mask = self.mask(weight) if mask is None else mask
        if rtn is None:
            return sparse_record(weight, mask, nm, torch.float16)
        cls = Sparse24QuantizedWeight if nm == (2, 4) else SparseQuantizedWeight
        return cls(mask, rtn.compress(weight * mask))  # pruned weights sit on the zero point


def spec_bytes(specs: Specs) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())


@dataclass
class CandidateGrid:
    """Which settings every planned layer is offered (those its shape allows)."""

    # quantized code widths: every width from 2 to 6, so a plan can sit between two widths
    # without mixing the wider one in (uniform W5/W6 are strong recipes once the embedding is
    # packed: bench/results/budget.txt), and 8 for the layers that need it
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    group_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, -1])  # -1: per row
    # grid variants tried; asymmetric only by default: its zero points cost bits/group_size per
    # weight, and SmolLM2's plans chose it for 91 % of layers when offered both (bench/budget.py,
    # six sizes), while each variant costs the measuring pass a candidate per width and group
    symmetric: list[bool] = field(default_factory=lambda: [False])
    sparse_patterns: list[str] = field(default_factory=lambda: ["2:4", "unstructured"])
    sparsity: float = 0.5  # fraction removed by the "unstructured" pattern
    sparse_bits: list[int] = field(default_factory=lambda: [0, 4])  # pruned values: 0 = fp16
    lowrank_energy: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9, 0.95])
    dense: bool = True  # a layer may stay uncompressed
    damp: float = 0.01  # Hessian dampening of the solvers and the low-rank fit
    # "loss": each output's error weighted by the loss's sensitivity to it (one extra backward
    # pass; errors comparable across layers); "output": plain tr(ΔHΔᵀ), cheaper, often misleads
    error: str = "loss"
    # scale each layer's data-free errors by the shipping solver's ratio on one candidate per
    # kind (GPTQ for grids, SparseGPT for pruning): two solves per layer, see the module docstring
    solver_scaled: bool = True
    # the tied embedding / lm_head: code widths offered ([] keeps it as stored; planned only with
    # error: loss, which prices both of its uses), on groups of this many hidden columns
    embedding_bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    embedding_group_size: int = 64

    def validate(self, prefix: str) -> None:
        for i, b in enumerate(self.bits):
            check_range(f"{prefix}.bits[{i}]", b, 2, 8)
        for i, b in enumerate(self.sparse_bits):
            if b:
                check_range(f"{prefix}.sparse_bits[{i}]", b, 2, 8)
        for i, g in enumerate(self.group_sizes):
            if g != PER_CHANNEL and g <= 0:
                raise ConfigError(f"{prefix}.group_sizes[{i}]: must be positive or -1, got {g}")
        for i, p in enumerate(self.sparse_patterns):
            parse_pattern(p, f"{prefix}.sparse_patterns[{i}]")
        for i, e in enumerate(self.lowrank_energy):
            check_range(f"{prefix}.lowrank_energy[{i}]", e, 1e-6, 1.0)
        check_range(f"{prefix}.sparsity", self.sparsity, 0.01, 0.99)
        check_range(f"{prefix}.damp", self.damp, 0.0, 1.0)
        for i, b in enumerate(self.embedding_bits):
            check_range(f"{prefix}.embedding_bits[{i}]", b, 2, 8)
        if self.embedding_group_size != PER_CHANNEL and self.embedding_group_size <= 0:
            raise ConfigError(
                f"{prefix}.embedding_group_size: must be positive or -1, "
                f"got {self.embedding_group_size}"
            )
        if not isinstance(self.solver_scaled, bool):
            raise ConfigError(f"{prefix}.solver_scaled: expected true or false")
        if self.error not in ("loss", "output"):
            raise ConfigError(f"{prefix}.error: expected 'loss' or 'output', got {self.error!r}")
        if not (self.bits or self.sparse_patterns or self.lowrank_energy or self.dense):
            raise ConfigError(f"{prefix}: offers no candidate; give bits, patterns or ranks")

    def _groups(self, k: int) -> list[int]:
        """Group sizes that fit ``k`` columns; a group as wide as the row is per-row."""
        fits = {PER_CHANNEL if g in (PER_CHANNEL, k) else g for g in self.group_sizes}
        return sorted(g for g in fits if g == PER_CHANNEL or k % g == 0)

    def embedding_candidates(self, k: int) -> list[Candidate]:
        """What a tied embedding of ``k`` hidden columns is offered: its grids, and as stored."""
        g = self.embedding_group_size
        g = g if g != k and (g == PER_CHANNEL or k % g == 0) else PER_CHANNEL
        return [Candidate(b, g) for b in dict.fromkeys(self.embedding_bits)] + [Candidate()]

    def candidates(self, k: int) -> list[Candidate]:
        """Every candidate a layer with ``k`` input columns is offered, except low-rank ones
        (their ranks depend on the layer's spectrum)."""
        groups, variants = self._groups(k), list(dict.fromkeys(self.symmetric))

        def grids(widths: list[int]) -> list[tuple[int, int, bool]]:
            return [(b, g, s) for b in widths for g in groups for s in variants]

        out = [Candidate(b, g, s) for b, g, s in grids(self.bits)]
        for pattern in self.sparse_patterns:
            nm = parse_pattern(pattern)
            if nm is not None and k % nm[1]:
                continue
            sparsity = self.sparsity if nm is None else 0.0
            values = grids([b for b in self.sparse_bits if b])
            if 0 in self.sparse_bits:
                values.insert(0, (0, PER_CHANNEL, True))
            out += [Candidate(b, g, s, pattern, sparsity) for b, g, s in values]
        if self.dense:
            out.append(Candidate())
        return list(dict.fromkeys(out))


@dataclass
class Option:
    """A measured candidate of one layer: what the planner chooses among."""

    candidate: Candidate
    bytes: int  # stored tensor bytes (the record's, or the dense weight's)
    error: float  # proxy output error per calibration token
    format: str | None  # stored record format; None when the layer stays dense
    scheme: dict | None  # the record's scheme, as the artifact's config.json lists it
    specs: Specs  # the stored tensors (suffix → dtype, shape)
    weights: int  # weights of the layer (out × in)


def output_error(
    delta: torch.Tensor, hessian: torch.Tensor, row_weights: torch.Tensor | None = None
) -> float:
    """``tr(Δ H Δᵀ)``: mean squared output error per token of a weight change (fp32 products);
    with ``row_weights`` ``f``, ``Σᵢ fᵢ (Δ H Δᵀ)ᵢᵢ``: each output's error weighted by how much
    the loss cares about that output (see :func:`~presso.compressors.plan.planner.output_sensitivity`)."""
    rows = ((delta @ hessian) * delta).sum(1, dtype=torch.float64)
    return float(rows.sum() if row_weights is None else rows @ row_weights.double())


def measure_layer(
    weight: torch.Tensor,
    stats: HessianStats,
    grid: CandidateGrid,
    name: str = "layer",
    row_weights: torch.Tensor | None = None,
) -> list[Option]:
    """Every candidate of one layer with its exact bytes and error (weighted per output by
    ``row_weights`` if given; scaled to the solver's if ``grid.solver_scaled``); layers are
    independent, so workers can measure them in any order."""
    w = weight.detach().float()
    n, k = w.shape
    h = stats.hessian().float()
    masks: dict[tuple[str, float], torch.Tensor] = {}  # one magnitude mask per pattern

    def records():  # (candidate, record standing in for it); None for a dense layer
        for c in grid.candidates(k):
            if c.kind == "dense":
                yield c, None
                continue
            key = (c.pattern, c.sparsity)
            if c.pattern and key not in masks:  # a top-k over the whole weight: once per pattern
                masks[key] = c.mask(w)
            yield c, c.proxy(w, masks.get(key))
        if grid.lowrank_energy:
            svd = whitened_svd(w, stats.hessian(), grid.damp, name)
            cheaper_than_8bit = n * k // (2 * (n + k))  # a larger rank stores more than W8
            for rank in spectrum_ranks(svd.s, grid.lowrank_energy, cheaper_than_8bit):
                yield Candidate(rank=rank), svd.record(rank)

    options = []
    for c, record in records():
        specs = c.tensor_specs(n, k, weight.dtype)
        if record is None:
            options.append(Option(c, spec_bytes(specs), 0.0, None, None, specs, n * k))
        else:
            error = output_error(record.dequantize() - w, h, row_weights)
            options.append(
                Option(c, spec_bytes(specs), error, record.format, record.scheme(), specs, n * k)
            )
    if grid.solver_scaled:
        for kind in ("quant", "sparse"):
            scale_to_solver(options, kind, weight, stats, grid.damp, name, row_weights)
    return options


def solver_error(
    option: Option,
    weight: torch.Tensor,
    stats: HessianStats,
    damp: float,
    name: str = "layer",
    row_weights: torch.Tensor | None = None,
) -> float:
    """The output error of ``option``'s candidate as its solver (GPTQ, SparseGPT) ships it."""
    record = option.candidate.solver(damp).compress(weight, stats, name)
    return output_error(record.dequantize() - weight.float(), stats.hessian().float(), row_weights)


def scale_to_solver(
    options: list[Option],
    kind: str,
    weight: torch.Tensor,
    stats: HessianStats,
    damp: float,
    name: str = "layer",
    row_weights: torch.Tensor | None = None,
) -> None:
    """Scale the data-free errors of ``kind``'s options in place by the ratio of solver error
    to data-free error of one of them (the median by error: a typical setting, not an extreme)."""
    ranked = sorted((o for o in options if o.candidate.kind == kind), key=lambda o: o.error)
    if not ranked or ranked[len(ranked) // 2].error <= 0:
        return
    anchor = ranked[len(ranked) // 2]
    ratio = solver_error(anchor, weight, stats, damp, name, row_weights) / anchor.error
    for o in ranked:
        o.error *= ratio


@dataclass
class EmbeddingSensitivity:
    """How much the loss cares about a tied embedding's error, in both of its uses: as the
    lookup feeding block 0 (per vocabulary row and hidden column: ``rows``) and as ``lm_head``
    (per logit: ``head``, with the mean Hessian of the head's inputs: ``head_hessian``). Sums
    over calibration tokens while collecting (data-parallel shards add), means once normalized."""

    rows: torch.Tensor  # [V, D]: Σ over the tokens of each row of (∂L/∂e)² (embedding outputs)
    head: torch.Tensor  # [V]: Σ over tokens of (∂L/∂logit)²
    head_hessian: torch.Tensor  # [D, D]: Σ over tokens of x xᵀ, x the lm_head input
    scale: float = 1.0  # what the embedding module multiplies its rows by (Gemma: √D)

    def __add__(self, other):
        if isinstance(other, int) and other == 0:  # sum() starts at 0
            return self
        return EmbeddingSensitivity(self.rows + other.rows, self.head + other.head,
                                    self.head_hessian + other.head_hessian, self.scale)  # fmt: skip

    __radd__ = __add__

    def normalized(self, tokens: int) -> EmbeddingSensitivity:
        """Means per token; the ½ of the second-order loss estimate folded into the weights,
        as :func:`~presso.compressors.plan.planner.output_sensitivity` does."""
        return EmbeddingSensitivity(
            self.rows / (2 * tokens),
            self.head / (2 * tokens),
            self.head_hessian / tokens,
            self.scale,
        )


def measure_embedding(
    weight: torch.Tensor, sensitivity: EmbeddingSensitivity, grid: CandidateGrid
) -> list[Option]:
    """The tied embedding's options: each grid's exact bytes and its estimated loss increase,
    the lookup's ``Σ rows ⊙ (scale·Δ)²`` plus the head's ``Σᵥ headᵥ (Δ H Δᵀ)ᵥᵥ``."""
    w = weight.detach().float()
    n, k = w.shape
    options = []
    for c in grid.embedding_candidates(k):
        specs = c.tensor_specs(n, k, weight.dtype)
        if c.kind == "dense":
            options.append(Option(c, spec_bytes(specs), 0.0, None, None, specs, n * k))
            continue
        record = c.proxy(w)
        delta = record.dequantize() - w
        lookup = float((sensitivity.rows * (sensitivity.scale * delta).double().square()).sum())
        head = output_error(delta, sensitivity.head_hessian.float(), sensitivity.head)
        options.append(
            Option(
                c, spec_bytes(specs), lookup + head, record.format, record.scheme(), specs, n * k
            )
        )
    return options
