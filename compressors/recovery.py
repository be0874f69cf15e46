"""Recovery: train a compressed model back toward its dense teacher without touching its codes.

Every stored record splits into a fixed part (integer codes, sparsity masks, outlier positions)
and continuous parts that may learn:

- ``scales``: the per-group scales of a quantization grid (SpQR: the second-level ``lo``/``step``
  the scales are decoded from, so the scale codes stay fixed too);
- ``zeros``: the zero points of an asymmetric grid, learned through a straight-through rounding
  and stored rounded to the grid's integer range;
- ``norms``: the weights (and biases) of the model's normalization layers;
- ``sparse_values``: the kept values of a pruned layer and SpQR's outlier values.

:func:`make_recoverable` swaps each compressed layer of a model for a :class:`RecoverableLinear`
built from its record; :func:`export_records` turns them back into records of the same type and
dtypes, so the artifact is written in the same packed format, to the byte the same size.
:func:`kd_loss` is the loss: KL from the teacher's token distribution to the student's.
Plain PyTorch, usable from a notebook: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from presso import ConfigError
from presso.compressors.formats.quantized import InputChannelQuantizedWeight, QuantizedWeight
from presso.compressors.formats.sparse import SparseQuantizedWeight, SparseWeight
from presso.compressors.formats.spqr import SpQRWeight, dequantize_stats
from presso.kernels.outliers import Outliers

LEARNABLE = ("scales", "zeros", "norms", "sparse_values")


def check_learn(learn: Iterable[str], key: str = "learn") -> None:
    unknown = sorted(set(learn) - set(LEARNABLE))
    if unknown or not learn:
        raise ConfigError(f"{key}: choose from {list(LEARNABLE)}, got {list(learn)}")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0):
    """Mean over tokens of KL(teacher ‖ student) on ``[..., vocab]`` logits, scaled by T²."""
    t = F.log_softmax(teacher.detach().float().flatten(0, -2) / temperature, dim=-1)
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _dequant(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group_size: int):
    """``(q - zero) · scale`` with the ``[N, G]`` statistics spread over their groups (a ragged
    last group included), in fp32: what the kernels' reference dequantization computes."""
    k = q.shape[1]
    spread = [t.repeat_interleave(group_size, dim=1)[:, :k] for t in (zero, scale)]
    return (q.float() - spread[0]) * spread[1]


def _learnable(t: torch.Tensor, learn: bool) -> nn.Parameter:
    """An fp32 copy of a stored continuous tensor; it learns only when chosen."""
    return nn.Parameter(t.detach().float().clone(), requires_grad=learn)


class _Grid(nn.Module):
    """A :class:`QuantizedWeight`'s grid: codes fixed; scales and zero points may learn."""

    def __init__(self, record: QuantizedWeight, learn: set[str]) -> None:
        super().__init__()
        self.record = record  # the template exported records copy their fixed fields from
        self.register_buffer("q", record.q.clone())
        self.scale = _learnable(record.scale, "scales" in learn)
        self.zero = _learnable(record.zero, "zeros" in learn and not record.symmetric)
        half = 1 << (record.bits - 1)
        self.zero_range = (-half, half - 1)

    def zero_points(self) -> torch.Tensor:
        rounded = self.zero.round().clamp(*self.zero_range)
        return self.zero + (rounded - self.zero).detach()  # straight-through rounding

    def weight(self) -> torch.Tensor:
        return _dequant(self.q, self.zero_points(), self.scale, self.record.group_size)

    def export(self, q: torch.Tensor | None = None) -> QuantizedWeight:
        r = self.record
        zero = self.zero.detach().round().clamp(*self.zero_range).to(r.zero.dtype)
        scale = self.scale.detach().to(r.scale.dtype)
        return QuantizedWeight(
            self.q if q is None else q, scale, zero, r.bits, r.group_size, r.symmetric
        )


class RecoverableLinear(nn.Module):
    """A compressed linear layer whose fixed parts are buffers and continuous parts parameters.

    ``weight()`` rebuilds the dense weight exactly as the record dequantizes it (at the start of
    training, before any step, the layer computes what the artifact computes); ``export()``
    returns a record of the original type with the learned values in the stored dtypes."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def export(self):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)


class QuantizedRecoverable(RecoverableLinear):
    def __init__(self, record: QuantizedWeight, bias, learn: set[str]) -> None:
        super().__init__(bias)
        self.grid = _Grid(record, learn)

    def weight(self) -> torch.Tensor:
        return self.grid.weight()

    def export(self) -> QuantizedWeight:
        return self.grid.export()


class InputChannelRecoverable(QuantizedRecoverable):
    """AdaDim's input-channel grouping: the grid of the transposed weight."""

    def __init__(self, record: InputChannelQuantizedWeight, bias, learn: set[str]) -> None:
        super().__init__(record.transposed, bias, learn)

    def weight(self) -> torch.Tensor:
        return self.grid.weight().T

    def export(self) -> InputChannelQuantizedWeight:
        return InputChannelQuantizedWeight(self.grid.export())


class SparseRecoverable(RecoverableLinear):
    """A pruned layer: the mask is fixed, the kept values may learn."""

    def __init__(self, record: SparseWeight, bias, learn: set[str]) -> None:
        super().__init__(bias)
        self.record = record
        self.register_buffer("mask", record.mask.clone())
        self.values = _learnable(record.values, "sparse_values" in learn)

    def weight(self) -> torch.Tensor:
        return torch.zeros(self.mask.shape, dtype=self.values.dtype).masked_scatter(
            self.mask, self.values
        )

    def export(self) -> SparseWeight:
        return type(self.record)(self.mask, self.values.detach().to(self.record.values.dtype))


class SparseQuantizedRecoverable(RecoverableLinear):
    """A pruned layer on a grid: mask and kept codes fixed; the grid may learn. Pruned
    positions stay exactly 0 (the mask multiplies), and are exported holding the new zero point,
    as the format requires."""

    def __init__(self, record: SparseQuantizedWeight, bias, learn: set[str]) -> None:
        super().__init__(bias)
        self.record = record
        self.register_buffer("mask", record.mask.clone())
        self.grid = _Grid(record.grid, learn)

    def weight(self) -> torch.Tensor:
        return self.grid.weight() * self.mask

    def export(self) -> SparseQuantizedWeight:
        g = self.record.grid
        zero = self.grid.export().zero.repeat_interleave(g.group_size, dim=1).to(g.q.dtype)
        return type(self.record)(self.mask, self.grid.export(torch.where(self.mask, g.q, zero)))


class SpQRRecoverable(RecoverableLinear):
    """SpQR: codes, scale codes, zero points and outlier positions fixed; the scales' second-level
    grid (``lo``, ``step``) and the outlier values may learn."""

    def __init__(self, record: SpQRWeight, bias, learn: set[str]) -> None:
        super().__init__(bias)
        self.record = record
        self.register_buffer("q", record.q.clone())
        self.register_buffer("zero", record.grid()[1])
        self.scale_lo = _learnable(record.scale_lo, "scales" in learn)
        self.scale_step = _learnable(record.scale_step, "scales" in learn)
        self.outlier_values = _learnable(record.outliers.values, "sparse_values" in learn)
        o, n = record.outliers, record.shape[0]
        counts = (o.row_ptr[1:] - o.row_ptr[:-1]).long()
        self.register_buffer("outlier_rows", torch.repeat_interleave(torch.arange(n), counts))

    def weight(self) -> torch.Tensor:
        r = self.record
        scale = dequantize_stats(r.scale_codes, self.scale_lo, self.scale_step)
        w = _dequant(self.q, self.zero, scale, r.group_size)
        cols = r.outliers.col_idx.long()
        return w.index_put((self.outlier_rows, cols), self.outlier_values, accumulate=True)

    def export(self) -> SpQRWeight:
        r = self.record
        lo = self.scale_lo.detach().to(r.scale_lo.dtype)
        step = self.scale_step.detach().to(r.scale_step.dtype)
        values = self.outlier_values.detach().to(r.outliers.values.dtype)
        outliers = Outliers(r.outliers.row_ptr, r.outliers.col_idx, values)
        return SpQRWeight(
            r.q, r.scale_codes, lo, step, r.zero_codes, r.zero_lo, r.zero_step, outliers,
            r.bits, r.group_size, r.stat_bits,
        )  # fmt: skip


# Most specific first: the 2:4 record types subclass the general sparse ones.
_RECOVERABLE = (
    (SparseQuantizedWeight, SparseQuantizedRecoverable),
    (SparseWeight, SparseRecoverable),
    (InputChannelQuantizedWeight, InputChannelRecoverable),
    (QuantizedWeight, QuantizedRecoverable),
    (SpQRWeight, SpQRRecoverable),
)


class FrozenRecord(nn.Module):
    """A format with nothing to learn here (low-rank factors): its own runtime module, frozen;
    it exports its record unchanged."""

    def __init__(self, record, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.record, self.inner = record, record.module(bias)
        self.inner.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def export(self):
        return self.record


def recoverable(record, bias: torch.Tensor | None, learn: Iterable[str]) -> nn.Module:
    """The trainable form of ``record`` (a :class:`FrozenRecord` if it has none)."""
    for record_type, cls in _RECOVERABLE:
        if isinstance(record, record_type):
            return cls(record, bias, set(learn))
    return FrozenRecord(record, bias)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, and the RMSNorms of Hugging Face models (``LlamaRMSNorm`` and kin)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith("Norm")


def make_recoverable(model: nn.Module, records: dict, learn: Iterable[str]) -> nn.Module:
    """In place: freeze ``model``, replace each layer named in ``records`` by its trainable form,
    and let only the parts chosen in ``learn`` require gradients."""
    learn = set(learn)
    check_learn(learn)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, record in records.items():
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, recoverable(record, old.bias, learn))
    if "norms" in learn:
        for module in model.modules():
            if is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    return model


def export_records(model: nn.Module, names: Iterable[str]) -> dict:
    """The records of the layers ``names`` of a recoverable model, with what they learned."""
    return {name: model.get_submodule(name).export() for name in names}
