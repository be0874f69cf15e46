"""Top-k sparsification: keep the ``k = ceil(density x numel)`` largest-magnitude entries.

The payload is one int32 vector, ``[values (fp32 bits) | indices]``, so one all-gather moves both;
every worker scatter-adds all workers' entries into the same zero tensor, in rank order, so the
sums agree bit for bit. This worker's own share is its kept entries; error feedback keeps the rest.
"""

from __future__ import annotations

import math

import torch


class TopK:
    """The sparsification family; the parameter is the density."""

    least = 0.0  # strongest compression: a tensor it cannot shrink is sent dense

    def clamp(self, shape: torch.Size, density: float) -> float:
        """Density is at most 1 (every entry)."""
        return min(float(density), 1.0)

    @staticmethod
    def kept(numel: int, density: float) -> int:
        """Entries kept: at least one of a non-empty tensor, at most all of them."""
        return min(numel, max(1, math.ceil(density * numel))) if numel else 0

    def payload_bytes(self, shape: torch.Size, density: float) -> int:
        """4-byte value plus 4-byte index per kept entry."""
        return 8 * self.kept(torch.Size(shape).numel(), density)

    def errors(self, grad: torch.Tensor, densities: list[float]) -> list[float]:
        """Squared error of keeping the top ``k`` entries: the sum of the other squares."""
        sq = grad.reshape(-1).double().square().sort(descending=True).values
        kept_mass = torch.cat([sq.new_zeros(1), sq.cumsum(0)])  # kept_mass[k] = top-k sum
        total = float(kept_mass[-1])
        return [max(0.0, total - float(kept_mass[self.kept(sq.numel(), d)])) for d in densities]

    def encode(self, x: torch.Tensor, density: float, seed: int) -> torch.Tensor:
        """Flat fp32 ``x`` to its int32 payload (``seed`` unused: the selection is deterministic)."""
        k = self.kept(x.numel(), density)
        idx = x.abs().topk(k, sorted=False).indices
        return torch.cat([x[idx].view(torch.int32), idx.to(torch.int32)])

    def decode_add(self, payload: torch.Tensor, density: float, out: torch.Tensor) -> None:
        """Add the entries a payload carries into flat fp32 ``out``."""
        k = payload.numel() // 2
        out.index_add_(0, payload[k:].long(), payload[:k].view(torch.float32))
