"""GaLore's projected-gradient all-reduce: a DDP comm hook that sends ``P^T G``, not ``G``.

Between two subspace refreshes a GaLore step reads a low-rank weight's gradient only through the
projection ``down(G)`` (r x n for the usual left projection of an m x n weight). Projection is
linear, so the mean over workers of ``down(G_k)`` is ``down`` of the mean gradient: each worker
all-reduces its projected gradient and writes ``up(mean)`` back as the gradient, which the
optimizer projects again (``down(up(x)) = x`` for orthonormal ``P``) -- it sees exactly what
GaLore on dense DDP sees. At a refresh step the weight's whole gradient is all-reduced and every
worker fits the subspace to it; rank 0's fit is then broadcast (``broadcast_projectors``) so that
no worker can drift onto a different basis (SVD signs are not portable across machines).

Everything one bucket sends goes in one flat all-reduce: projected gradients and the whole
gradients of other parameters (biases, norms, embeddings) alike. Bytes are counted with the
gradient hooks' accounting (``CommStats``): the payload this worker hands to each collective
(rank 0's projector broadcasts included) against the bucket a dense all-reduce would send.

Gradient clipping after the hook sees the projected gradient's norm, not the dense one's; with
bfloat16 projectors (the 8-bit variants' default) ``down(up(x)) = x`` holds to bf16 precision only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from presso import UnsupportedError
from presso.compressors.gradient.accounting import CommStats, payload_bytes
from presso.compressors.optim.galore import GaLoreAdamW
from presso.compressors.optim.projection import Projection


class GaLoreCommunicator:
    """Registers the projected all-reduce on a DDP model and reports its bytes per step."""

    def __init__(
        self,
        optimizer: GaLoreAdamW,
        names: dict[int, str],
        process_group: dist.ProcessGroup | None = None,
        broadcast_projectors: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.names = names  # id(parameter) -> its name in the model, for choices()
        self.process_group = process_group
        self.broadcast_projectors = broadcast_projectors
        self.stats = CommStats(workers=dist.get_world_size(process_group))
        self._low_rank = {
            id(p) for p, g in optimizer.params_with_groups() if optimizer.is_low_rank(p, g)
        }
        self._refreshed = 0  # low-rank weights sent whole (for a refresh) this step

    def register(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Install the hook on ``ddp_model`` and, if asked, rank 0's projector broadcast."""
        ddp_model.register_comm_hook(self, _comm_hook)
        if self.broadcast_projectors:
            self.optimizer.projection_sync = self._broadcast

    def _broadcast(self, matrix: torch.Tensor) -> None:
        if dist.get_rank(self.process_group) == 0:
            self.stats.record(payload_bytes(matrix), 0, "broadcast")
        dist.broadcast(matrix, group_src=0, group=self.process_group)

    def communicate(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """All-reduce one DDP bucket, sending projected gradients where the next step allows."""
        buffer = bucket.buffer()
        grads = bucket.gradients()  # views into ``buffer``, in bucket order
        params = bucket.parameters()
        projections = self.optimizer.comm_projections(params)
        self._refreshed += sum(
            id(p) in self._low_rank and proj is None for p, proj in zip(params, projections)
        )
        dense = all(proj is None for proj in projections)
        if dense:
            payload = buffer
        else:
            pieces = [
                g if proj is None else proj.down(g.float()).to(g.dtype)
                for g, proj in zip(grads, projections)
            ]
            payload = torch.cat([piece.reshape(-1) for piece in pieces])
        self.stats.record(payload_bytes(payload), payload_bytes(buffer))
        payload.div_(dist.get_world_size(self.process_group))
        work = dist.all_reduce(payload, group=self.process_group, async_op=True)

        def unpack(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            if not dense:
                _scatter_back(fut.value()[0], grads, projections)
            return buffer

        return work.get_future().then(unpack)

    def end_step(self) -> dict[str, float]:
        """Close the step: ``comm/bytes_sent``, ``comm/dense_bytes``, ``comm/compression_ratio``,
        ``comm/refreshed_layers`` (low-rank weights sent whole for a refresh) and
        ``comm/choice/<param>`` (rank in force). Call once a step, after ``optimizer.step()``."""
        metrics = self.stats.end_step()
        metrics["comm/refreshed_layers"] = float(self._refreshed)
        self._refreshed = 0
        metrics.update({f"comm/choice/{n}": v for n, v in self.choices().items()})
        return metrics

    def choices(self) -> dict[str, float]:
        """The rank in force per low-rank weight, by parameter name."""
        ranks = self.optimizer.ranks()
        return {self.names.get(id(p), f"param{i}"): float(r) for i, (p, r) in enumerate(ranks)}

    def state_dict(self) -> dict[str, list[int]]:
        """Byte totals so far; the projectors themselves live in the optimizer's state dict."""
        s = self.stats
        return {"totals": [s.steps, s.total_bytes_sent, s.total_dense_bytes]}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        steps, sent, dense = (int(v) for v in state["totals"])
        self.stats.steps, self.stats.total_bytes_sent, self.stats.total_dense_bytes = (
            steps,
            sent,
            dense,
        )


def _comm_hook(comm, bucket):  # unannotated: DDP compares annotations with types, not strings
    return comm.communicate(bucket)


def _scatter_back(
    reduced: torch.Tensor, grads: list[torch.Tensor], projections: list[Projection | None]
) -> None:
    """Write the averaged payload back into the bucket's gradient views."""
    offset = 0
    for g, proj in zip(grads, projections):
        shape = g.shape if proj is None else _projected_shape(g.shape, proj)
        n = math.prod(shape)
        chunk = reduced[offset : offset + n].view(shape)
        g.copy_(chunk if proj is None else proj.up(chunk.float()))
        offset += n


def _projected_shape(shape: torch.Size, proj: Projection) -> tuple[int, int]:
    m, n = shape
    if proj.left is not None:
        m = proj.left.shape[1]
    if proj.right is not None:
        n = proj.right.shape[1]
    return m, n


def build_galore_communicator(
    optimizer: torch.optim.Optimizer,
    ddp_model: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    broadcast_projectors: bool = True,
) -> GaLoreCommunicator:
    """The projected all-reduce for ``optimizer`` (a GaLoreAdamW, fp32 or 8-bit) on ``ddp_model``.
    Call ``comm.register(ddp_model)`` before the first backward and ``comm.end_step()`` once a
    step, after ``optimizer.step()``."""
    if not getattr(optimizer, "projects_gradient", False):
        raise UnsupportedError(
            "train.grad_compression.method=galore needs train.optimizer.name galore or "
            f"galore8bit (the optimizer is {type(optimizer).__name__}); pick another "
            "grad_compression.method for this optimizer"
        )
    module = getattr(ddp_model, "module", ddp_model)
    names = {id(p): name for name, p in module.named_parameters()}
    return GaLoreCommunicator(optimizer, names, process_group, broadcast_projectors)
