"""The runtime modules a loaded artifact computes with: one ``nn.Module`` per stored format.

Each keeps its format's stored tensors as buffers and computes through ``presso.kernels`` (which
picks a Triton kernel or its torch reference); :class:`RecordLinear` is the reference path any
record can fall back on. The records themselves (what is stored, and how it is read back) live in
the sibling format modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from presso.compressors.quant.primitives import dequantize
from presso.kernels.outliers import Outliers
from presso.kernels.packing import unpack_int32
from presso.kernels.sparse24 import sparse24_matmul
from presso.kernels.wquant_matmul import dequant_matmul, prepare_weight

if TYPE_CHECKING:  # the record types import this module for their runtime modules
    from presso.compressors.formats.spqr import SpQRWeight


class RecordLinear(torch.nn.Module):
    """Keeps a record's stored tensors as buffers and rebuilds the dense weight on each call.

    A reference path, correct on any device; packed kernels are ``presso.kernels``' concern.
    """

    def __init__(self, record, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.record_type, self.scheme = type(record), record.scheme()
        self.names = list(record.tensors())
        for name, t in record.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def weight_dense(self) -> torch.Tensor:
        tensors = {name: getattr(self, name) for name in self.names}
        return self.record_type.from_tensors(tensors, self.scheme).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_dense().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"format={self.record_type.format}, scheme={self.scheme}"


class QuantizedLinear(torch.nn.Module):
    """A linear layer that keeps its weight packed and computes through ``presso.kernels``."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], bits: int, group_size: int, bias=None
    ) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = (int(v) for v in tensors["weight_shape"])
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            self.register_buffer(name, tensors.get(name))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._prepared = None  # the kernels' repacked layout, built on first use on a GPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = None
        if x.is_cuda:
            if self._prepared is None or self._prepared.words.device != x.device:
                self._prepared = prepare_weight(
                    self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits
                )
            prepared = self._prepared
        return dequant_matmul(
            x,
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bits,
            self.group_size,
            self.bias,
            prepared=prepared,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class QuantizedEmbedding(torch.nn.Module):
    """A token embedding kept in the ``pack-quantized`` layout: a lookup gathers the packed rows
    of its tokens and dequantizes only those. ``dtype`` is the dtype of what it returns (the
    model's). A tied ``lm_head`` is a :class:`QuantizedLinear` over the very same tensors."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.num_embeddings, self.embedding_dim = (int(v) for v in tensors["weight_shape"])
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            self.register_buffer(name, tensors.get(name))

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("weight_packed", "weight_scale", "weight_zero_point")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat, offset = ids.reshape(-1), 1 << (self.bits - 1)
        q = unpack_int32(self.weight_packed[flat], self.bits, self.embedding_dim).to(torch.int32)
        scale = self.weight_scale[flat]
        if self.weight_zero_point is None:
            zero = torch.full(scale.shape, offset, dtype=torch.int32, device=q.device)
        else:  # packed along the rows: unpack all (one code per group), then gather
            zero = unpack_int32(self.weight_zero_point, self.bits, self.num_embeddings, dim=0)
            zero = zero[flat].to(torch.int32)
        rows = dequantize(q - offset, scale, zero - offset, self.group_size)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


class SpQRLinear(torch.nn.Module):
    """Computes through ``dequant_matmul`` with the statistics expanded once, at load."""

    def __init__(self, record: SpQRWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bits, self.group_size = record.bits, record.group_size
        self.out_features, self.in_features = record.shape
        packed, scale, zero = record.dense_tensors()
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero)
        for name, t in zip(Outliers._fields, record.outliers):
            self.register_buffer(f"outlier_{name}", t)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = Outliers(*(getattr(self, f"outlier_{f}") for f in Outliers._fields))
        return dequant_matmul(
            x,
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bits,
            self.group_size,
            self.bias,
            outliers,
        )


class Sparse24Linear(torch.nn.Module):
    """A 2:4 + quantized linear layer computing through ``presso.kernels.sparse24``."""

    def __init__(self, tensors: dict, bits: int, group_size: int, bias=None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = (int(v) for v in tensors["weight_shape"])
        for name in ("weight_values", "weight_positions", "weight_scale", "weight_zero_point"):
            self.register_buffer(name, tensors.get(name))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_matmul(
            x,
            self.weight_values,
            self.weight_positions,
            self.weight_scale,
            self.weight_zero_point,
            self.bits,
            self.group_size,
            self.bias,
        )


class LowRankLinear(torch.nn.Module):
    """``y = x Vᵀ (US)ᵀ + b``: two thin products, never the dense weight."""

    def __init__(self, us: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_us", us)
        self.register_buffer("weight_v", v)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.weight_v.to(x.dtype)), self.weight_us.to(x.dtype), bias)

    def extra_repr(self) -> str:
        (rank, k), n = self.weight_v.shape, self.weight_us.shape[0]
        return f"in_features={k}, out_features={n}, rank={rank}"
