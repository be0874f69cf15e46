"""Exact byte accounting for gradient communication.

Every communicator counts, at the call site of each collective, the bytes of the tensor this
worker hands to it (its payload), and what a dense fp32 all-reduce of the same gradients would
have handed over. Both use the same convention, so their ratio is the compression ratio; the
benchmark turns payload bytes into wire time with a ring all-reduce model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def payload_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as it is handed to a collective."""
    return tensor.numel() * tensor.element_size()


@dataclass
class CommStats:
    """Bytes one worker sends during the current step, and the per-layer choices in force."""

    bytes_sent: int = 0
    dense_bytes: int = 0
    choices: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    total_bytes_sent: int = 0
    total_dense_bytes: int = 0

    def record(self, sent: int, dense: int) -> None:
        self.bytes_sent += int(sent)
        self.dense_bytes += int(dense)

    def end_step(self) -> dict[str, float]:
        """Close the step: return its metrics and start counting the next one."""
        metrics = {
            "comm/bytes_sent": float(self.bytes_sent),
            "comm/dense_bytes": float(self.dense_bytes),
            "comm/compression_ratio": self.dense_bytes / self.bytes_sent
            if self.bytes_sent
            else 1.0,
        }
        self.steps += 1
        self.total_bytes_sent += self.bytes_sent
        self.total_dense_bytes += self.dense_bytes
        self.bytes_sent = 0
        self.dense_bytes = 0
        return metrics
