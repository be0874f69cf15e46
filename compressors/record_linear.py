"""A linear layer computing through any stored record's torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
