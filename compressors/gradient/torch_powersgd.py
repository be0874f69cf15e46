"""torch's built-in ``powerSGD_hook`` as the peer baseline, with the same communicator interface.

torch's hook hides its collectives, so bytes are counted analytically from its own rule, per bucket,
before delegating to it: while ``state.iter < start_powerSGD_iter`` it all-reduces the bucket dense;
afterwards each gradient viewed as ``[shape[0], -1]`` with rank ``r = min(rows, cols, rank)`` is
compressed iff torch's ``_should_compress`` says so, sending ``(rows + cols) x r`` values (its ``P``
and ``Q`` all-reduces), and every other gradient goes into its dense flat all-reduce. Values have
the bucket's element size. ``tests/compressors/gradient/test_gradcomp_two_ranks.py`` checks this
count against a spy on ``torch.distributed.all_reduce``.

torch keys its error-feedback and warm-start state by bucket index, which is why it needs
``start_powerSGD_iter >= 2`` (DDP regroups buckets after the first iteration); warm-up shorter than
2 steps is raised to 2. A resumed run starts again from DDP's first-iteration layout, so this
wrapper saves that state per parameter and, whenever a bucket index arrives holding other
parameters than torch's state for it describes, re-assembles the entry from per-parameter pieces
(error: the bucket's flat layout; ``Q``: torch's order, compressed tensors grouped by matrix shape).
That makes resume exact.

torch's hook calls ``torch.cuda.synchronize(device)`` whenever CUDA is available, so on a machine
with a GPU it fails for a model kept on the CPU ("Expected a cuda device"); train on the GPU there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

from presso import UnsupportedError
from presso.compressors.gradient.accounting import CommStats, payload_bytes
from presso.compressors.gradient.config import GradCompressionConfig
from presso.compressors.gradient.powersgd import matrix_shape


class TorchPowerSGDCommunicator:
    """Wraps ``torch...powerSGD_hook``; uniform ``cfg.rank``, torch's ``min_compression_rate=2``."""

    def __init__(self, cfg: GradCompressionConfig, ddp_model, process_group=None):
        self.state = torch_psgd.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=cfg.rank,
            start_powerSGD_iter=max(2, cfg.warmup_steps),
            random_seed=cfg.seed,
        )
        self.stats = CommStats(workers=dist.get_world_size(process_group))
        self.step = 0
        self.layout: dict[int, tuple[str, ...]] = {}  # bucket index -> names its state covers
        self.pieces: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # name -> (error, Q)
        self.params = [(n, p) for n, p in ddp_model.module.named_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in self.params}
        self.shapes = {n: p.shape for n, p in self.params}
        empty = [n for n, p in self.params if not p.numel()]
        if empty:
            raise UnsupportedError(
                f"torch's powerSGD_hook cannot handle zero-size parameters ({', '.join(empty)}); "
                "use grad_compression.method: powersgd (Presso's PowerSGD handles them)"
            )

    def _compressed(self, shape: torch.Size) -> int:
        """Rank torch uses for a gradient of ``shape``, or 0 when it sends it dense."""
        rows, cols = matrix_shape(shape)
        rank = min(rows, cols, self.state.matrix_approximation_rank)
        return (
            rank
            if torch_psgd._should_compress(rows, cols, rank, self.state.min_compression_rate)[0]
            else 0
        )

    def bucket_bytes(self, bucket) -> int:
        """Bytes torch's hook hands to its collectives for this bucket (see module docstring)."""
        buf = bucket.buffer()
        if self.state.iter < self.state.start_powerSGD_iter:
            return payload_bytes(buf)
        values = 0
        for grad in bucket.gradients():
            rank = self._compressed(grad.shape)
            rows, cols = matrix_shape(grad.shape)
            values += (rows + cols) * rank if rank else grad.numel()
        return values * buf.element_size()

    def communicate(self, bucket) -> torch.futures.Future:
        self.stats.record(self.bucket_bytes(bucket), payload_bytes(bucket.buffer()))
        names = tuple(self.names[id(p)] for p in bucket.parameters())
        if self.layout.get(bucket.index()) != names:
            self._rekey(bucket.index(), names, bucket.gradients())
        fut = torch_psgd.powerSGD_hook(self.state, bucket)
        # torch's hook blocks on collectives inside gloo callbacks; with several buckets in flight
        # those callbacks can occupy all of gloo's worker threads and deadlock (seen with tiny
        # buckets). One bucket at a time is the schedule Presso's own communicator uses too.
        fut.wait()
        return fut

    def _rekey(self, index: int, names: tuple[str, ...], grads: list[torch.Tensor]) -> None:
        """Give torch's state for bucket ``index`` the layout of ``names``, from per-parameter
        pieces of every entry that covers any of these parameters."""
        s = self.state
        for old, old_names in list(self.layout.items()):
            if set(old_names) & set(names) and old in s.error_dict:
                self.pieces.update(
                    self._split(old_names, s.error_dict.pop(old), s.q_memory_dict.pop(old))
                )
                s.p_memory_dict.pop(old, None)
            if set(old_names) & set(names):
                del self.layout[old]
        self.layout[index] = names
        if not all(n in self.pieces for n in names):
            return  # no compression state yet: torch creates it
        s.error_dict[index] = torch.cat([self.pieces[n][0] for n in names])
        order = self._q_order(names)
        s.q_memory_dict[index] = torch.cat(
            [self.pieces[n][1].reshape(-1) for n in order] or [grads[0].new_zeros(0)]
        )
        p_numel = sum(
            matrix_shape(self.shapes[n])[0] * self._compressed(self.shapes[n]) for n in order
        )
        s.p_memory_dict[index] = grads[0].new_empty(p_numel)  # P is recomputed from Q every step
        for n in names:
            del self.pieces[n]

    def _q_order(self, names: tuple[str, ...]) -> list[str]:
        """Compressed parameters in the order torch lays out their Q: grouped by matrix shape."""
        groups: dict[tuple[int, int], list[str]] = {}
        for n in names:
            if self._compressed(self.shapes[n]):
                groups.setdefault(matrix_shape(self.shapes[n]), []).append(n)
        return [n for group in groups.values() for n in group]

    def _split(self, names, error: torch.Tensor, q: torch.Tensor) -> dict:
        errors = error.split([self.shapes[n].numel() for n in names])
        pieces = {n: (e, None) for n, e in zip(names, errors)}
        order = self._q_order(names)
        sizes = [matrix_shape(self.shapes[n])[1] * self._compressed(self.shapes[n]) for n in order]
        for n, chunk in zip(order, q.split(sizes)):
            pieces[n] = (pieces[n][0], chunk)
        return pieces

    def register(self, ddp_model) -> None:
        ddp_model.register_comm_hook(self, _comm_hook)

    def choices(self) -> dict[str, float]:
        return {n: float(r) for n, p in self.params if (r := self._compressed(p.shape))}

    def end_step(self) -> dict[str, float]:
        dense_phase = self.step < self.state.start_powerSGD_iter
        self.step += 1
        metrics = self.stats.end_step()
        metrics["comm/dense_phase"] = float(dense_phase)
        metrics.update({f"comm/choice/{n}": v for n, v in self.choices().items()})
        return metrics

    def state_dict(self) -> dict:
        """torch's state per parameter (error, Q), its iteration and numpy RNG, as tensors and
        plain Python."""
        s = self.state
        pieces = dict(self.pieces)
        for index, names in self.layout.items():
            if index in s.error_dict:
                pieces.update(self._split(names, s.error_dict[index], s.q_memory_dict[index]))
        _, keys, pos, has_gauss, gauss = s.rng.get_state()
        return {
            "step": self.step,
            "iter": s.iter,
            "error": {n: e.cpu().clone() for n, (e, _) in pieces.items()},
            "q": {n: q.cpu().clone() for n, (_, q) in pieces.items() if q is not None},
            "rng": [
                torch.from_numpy(keys.astype(np.int64)),
                int(pos),
                int(has_gauss),
                float(gauss),
            ],
            "totals": [self.stats.steps, self.stats.total_bytes_sent, self.stats.total_dense_bytes],
        }

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        device = self.params[0][1].device if self.params else torch.device("cpu")
        self.step = int(state["step"])
        s.iter = int(state["iter"])
        s.error_dict.clear(), s.p_memory_dict.clear(), s.q_memory_dict.clear()
        self.layout.clear()
        self.pieces = {
            n: (e.to(device), state["q"][n].to(device) if n in state["q"] else None)
            for n, e in state["error"].items()
        }
        keys, pos, has_gauss, gauss = state["rng"]
        s.rng.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        self.stats.steps, self.stats.total_bytes_sent, self.stats.total_dense_bytes = state[
            "totals"
        ]


def _comm_hook(comm, bucket):  # unannotated: DDP rejects string annotations
    return comm.communicate(bucket)
