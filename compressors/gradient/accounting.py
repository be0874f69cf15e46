"""Exact byte accounting for gradient communication.

Every communicator counts, at the call site of each collective, the bytes of the tensor this
worker hands to it (its payload) and the kind of collective, and what a dense fp32 all-reduce of
the same gradients would have handed over. Payloads are not what crosses the network: an
all-gather's payload goes to every other worker, so its wire bytes grow with the number of
workers while an all-reduce's do not. :func:`wire_bytes` turns payloads into bytes on the wire
for any number of workers, and the compression ratio is taken on those, at the run's own size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def payload_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as it is handed to a collective."""
    return tensor.numel() * tensor.element_size()


def wire_bytes(all_reduce: float, all_gather: float, broadcast: float, workers: int) -> float:
    """Bytes one worker sends on the network for the given payloads among ``workers``, by the
    ring algorithms NCCL and gloo use for large messages: an all-reduce sends 2(n-1)/n of its
    payload (reduce-scatter, then all-gather of the reduced parts), an all-gather n-1 times the
    worker's own part (every other worker needs it), a pipelined broadcast the payload once."""
    n = workers
    if n < 2:
        return 0.0
    return 2 * (n - 1) / n * all_reduce + (n - 1) * all_gather + broadcast


@dataclass
class CommStats:
    """Bytes one worker sends during the current step, and the per-layer choices in force.
    ``workers`` (the group's size) turns payloads into wire bytes for the compression ratio."""

    workers: int = 2
    bytes_sent: int = 0
    gathered_bytes: int = 0  # of bytes_sent: payloads of all-gathers
    broadcast_bytes: int = 0  # of bytes_sent: payloads of broadcasts
    dense_bytes: int = 0
    choices: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    total_bytes_sent: int = 0
    total_dense_bytes: int = 0

    def record(self, sent: int, dense: int, kind: str = "all_reduce") -> None:
        """``sent`` bytes handed to a collective of ``kind`` (all_reduce, all_gather or
        broadcast); ``dense`` bytes a plain all-reduce would have handed over instead."""
        self.bytes_sent += int(sent)
        self.dense_bytes += int(dense)
        if kind == "all_gather":
            self.gathered_bytes += int(sent)
        elif kind == "broadcast":
            self.broadcast_bytes += int(sent)
        elif kind != "all_reduce":
            raise ValueError(f"unknown collective {kind!r}")

    def end_step(self) -> dict[str, float]:
        """Close the step: return its metrics and start counting the next one."""
        reduced = self.bytes_sent - self.gathered_bytes - self.broadcast_bytes
        wire = wire_bytes(reduced, self.gathered_bytes, self.broadcast_bytes, self.workers)
        dense_wire = wire_bytes(self.dense_bytes, 0, 0, self.workers)
        if self.workers < 2:  # nothing crosses a network: compare payloads
            wire, dense_wire = self.bytes_sent, self.dense_bytes
        metrics = {
            "comm/bytes_sent": float(self.bytes_sent),
            "comm/bytes_all_gather": float(self.gathered_bytes),
            "comm/bytes_broadcast": float(self.broadcast_bytes),
            "comm/dense_bytes": float(self.dense_bytes),
            "comm/wire_bytes": float(wire),
            "comm/compression_ratio": dense_wire / wire if wire else 1.0,
        }
        self.steps += 1
        self.total_bytes_sent += self.bytes_sent
        self.total_dense_bytes += self.dense_bytes
        self.bytes_sent = self.gathered_bytes = self.broadcast_bytes = self.dense_bytes = 0
        return metrics
