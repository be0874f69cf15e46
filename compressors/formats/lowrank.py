"""Low-rank factors ``US`` [N, r] and ``V`` [r, K] in fp16, computed as two thin products."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.linear import LowRankLinear
from presso.compressors.registry import register_format


@register_format
@dataclass
class LowRankWeight:
    """A weight stored as ``US @ V``; the factors are kept in fp16."""

    us: torch.Tensor  # [N, r]
    v: torch.Tensor  # [r, K]

    format = "presso-lowrank"

    @property
    def shape(self) -> tuple[int, int]:
        return self.us.shape[0], self.v.shape[1]

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    def dequantize(self) -> torch.Tensor:
        return self.us.float() @ self.v.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight_us": self.us,
            "weight_v": self.v,
            "weight_shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    def scheme(self) -> dict:
        return {"format": self.format, "rank": self.rank, "dtype": str(self.us.dtype)[6:]}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict) -> LowRankWeight:
        return cls(t["weight_us"], t["weight_v"])

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return LowRankLinear(self.us, self.v, bias)
