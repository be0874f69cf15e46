"""The DDP comm hook that compresses gradients per layer, with error feedback.

Lifecycle of one step, per DDP bucket (``communicate``):

* all state is keyed by parameter name, never by bucket index, because DDP regroups its buckets
  after the first iteration;
* 1-D, tiny (``min_numel``) and empty tensors, and matrices no setting of the family could
  shrink (a ``1 x n`` matrix for PowerSGD), go in one dense flat all-reduce per bucket, issued
  first so it overlaps the compression work;
* each compressed layer adds its error-feedback buffer to its gradient, the family exchanges the
  results (PowerSGD: two all-reduces; top-k and quantization: one all-gather), and the buffer keeps
  what this worker's own share left out: ``error = input - own share``;
* during the first ``warmup_steps`` steps the whole bucket is all-reduced dense.

Every collective goes through ``_all_reduce`` / ``_all_gather`` / ``_broadcast``, which count the
bytes this worker hands over (``CommStats``), so the byte count is the payload actually sent.

A non-finite value (NaN/inf) in a layer's input or aggregated result *skips* that layer's state
update for the step: its error-feedback buffer, PowerSGD warm-start ``Q`` and L-GreCo measurement
are left as they were (nothing is reset), and ``end_step`` issues one warning naming the layers.
L-GreCo's measuring and re-planning live in :mod:`presso.compressors.gradient.lgreco`; this
module hands it the inputs and its collectives.
The non-finite average itself is returned to DDP, so the training loop's own guard (e.g. skipping
the optimizer step) still sees it. The checks are tensor ops, so the hook never syncs a GPU.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from presso import IntegrityError
from presso.compressors.gradient import lgreco
from presso.compressors.gradient.accounting import CommStats, payload_bytes
from presso.compressors.gradient.config import GradCompressionConfig, Method
from presso.compressors.gradient.powersgd import PowerSGD, matrix_shape, power_step


def _all_gather_single(out: torch.Tensor, t: torch.Tensor, group) -> None:
    """torch 2.13's name for all_gather_into_tensor (still there, deprecated); GPU images often
    ship an older torch. Looked up per call, so a spy on either one sees the traffic."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=group)


class Communicator:
    """Compressed gradient exchange for one DDP model. Build with :func:`build_communicator`."""

    def __init__(
        self, cfg: GradCompressionConfig, ddp_model: DistributedDataParallel, process_group=None
    ):
        self.cfg = cfg
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.family = cfg.build_family()
        params = [(n, p) for n, p in ddp_model.module.named_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in params}
        self.shapes = {n: p.shape for n, p in params}
        self.device = params[0][1].device if params else torch.device("cpu")
        self.index = {n: i for i, (n, _) in enumerate(params)}  # seeds streams per layer
        self.choice: dict[str, float] = {}  # compressed layers -> parameter in force
        self._choose_layers(params)
        self.lgreco = (
            lgreco.LGreCo(cfg, self.family, self.shapes, self.choice)
            if cfg.method is Method.lgreco
            else None
        )
        self.error: dict[str, torch.Tensor] = {}  # error-feedback buffers, flat fp32
        self.q: dict[str, torch.Tensor] = {}  # PowerSGD warm-start Q
        self._nonfinite: dict[str, torch.Tensor] = {}  # layer -> bool tensor, this step
        self.stats = CommStats(workers=self.world)
        self.step = 0  # finished optimizer steps

    def _choose_layers(self, params) -> None:
        """Choose compressed layers and clamp the default; warn once for every clamped layer."""
        default = self.cfg.default()
        clamped = []
        for name, p in params:
            if p.dim() < 2 or p.numel() == 0 or p.numel() < self.cfg.min_numel:
                continue
            if self.family.payload_bytes(p.shape, self.family.least) >= payload_bytes(p):
                continue  # no setting could save bytes here (e.g. a 1 x n matrix for PowerSGD)
            value = self.family.clamp(p.shape, default)
            if value != default:
                clamped.append(f"{name}→{value}")
            self.choice[name] = value
        if clamped:
            warnings.warn(
                f"grad_compression: {self.cfg.family.value} parameter {default} is more than "
                f"{len(clamped)} layer(s) allow; clamped: {', '.join(clamped)}",
                stacklevel=4,
            )

    def register(self, ddp_model: DistributedDataParallel) -> None:
        """Install the comm hook on ``ddp_model`` (DDP allows one hook per model)."""
        ddp_model.register_comm_hook(self, _comm_hook)

    def choices(self) -> dict[str, float]:
        """Parameter in force per compressed layer (rank, density or bits), by parameter name.
        During the warm-up this is the plan compression will start with."""
        return {n: float(v) for n, v in self.choice.items()}

    # ---- collectives: the only places bytes leave this worker --------------------------------

    def _all_reduce(self, t: torch.Tensor, async_op: bool = False):
        self.stats.record(payload_bytes(t), 0)
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        self._all_reduce(t)
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.stats.record(payload_bytes(t), 0, "all_gather")
        out = t.new_empty(self.world * t.numel())
        _all_gather_single(out, t, group=self.group)
        return out.view(self.world, -1)

    def _broadcast(self, t: torch.Tensor) -> None:
        if self.rank == 0:
            self.stats.record(payload_bytes(t), 0, "broadcast")
        dist.broadcast(t, group_src=0, group=self.group)

    # ---- one bucket --------------------------------------------------------------------------

    def communicate(self, bucket) -> torch.futures.Future:
        buf = bucket.buffer()
        self.stats.record(0, payload_bytes(buf))
        named = [(self.names[id(p)], g) for p, g in zip(bucket.parameters(), bucket.gradients())]
        if self.step < self.cfg.warmup_steps:
            if self._measuring():
                local = {n: g.reshape(-1).float() for n, g in named if n in self.choice}
                self.lgreco.measure(local, {n: self._check(n, x) for n, x in local.items()})
            self._all_reduce(buf)
            buf.div_(self.world)
            return _done(buf)
        flat = [g for n, g in named if n not in self.choice]
        flat_buf = torch.cat([g.reshape(-1) for g in flat]) if flat else None
        pending = self._all_reduce(flat_buf, async_op=True) if flat_buf is not None else None
        layers = [n for n, _ in named if n in self.choice]
        grads = {n: g for n, g in named}
        inputs = {n: grads[n].reshape(-1).float() + self._error(n, grads[n]) for n in layers}
        if layers:
            exchange = (
                self._exchange_low_rank
                if isinstance(self.family, PowerSGD)
                else self._exchange_gathered
            )
            means, shares = exchange(layers, inputs)
            ok = {n: self._check(n, means[n], inputs[n]) for n in layers}
            for n in layers:
                self.error[n] = torch.where(ok[n], inputs[n] - shares[n], self.error[n])
                grads[n].copy_(means[n].view_as(grads[n]))
            if self._measuring():
                self.lgreco.measure(inputs, ok)
        if pending is not None:
            pending.wait()
            flat_buf.div_(self.world)
            for g, chunk in zip(flat, flat_buf.split([g.numel() for g in flat])):
                g.copy_(chunk.view_as(g))
        return _done(buf)

    def _check(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        """0-d bool tensor: ``tensors`` are finite; failures are remembered for one warning."""
        ok = _finite(*tensors)
        prev = self._nonfinite.get(name)
        self._nonfinite[name] = ~ok if prev is None else prev | ~ok
        return ok

    def _error(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if name not in self.error:
            self.error[name] = torch.zeros(grad.numel(), device=grad.device)
        return self.error[name]

    def _exchange_low_rank(self, layers, inputs):
        """Means and own shares of the layers through PowerSGD's two all-reduces."""
        matrices = [inputs[n].view(matrix_shape(self.shapes[n])) for n in layers]
        qs = [self._q(n, m.device) for n, m in zip(layers, matrices)]
        p_hats, q_locals, q_sums = power_step(matrices, qs, self._sum)
        means, shares = {}, {}
        for n, p, q_local, q_sum in zip(layers, p_hats, q_locals, q_sums):
            q_mean = q_sum / self.world
            self.q[n] = torch.where(_finite(q_mean), q_mean, self.q[n])
            means[n] = (p @ q_mean.T).reshape(-1)
            shares[n] = (p @ q_local.T).reshape(-1)
        return means, shares

    def _q(self, name: str, device) -> torch.Tensor:
        self.q[name] = self._start_q(name, int(self.choice[name]), device)
        return self.q[name]

    def _start_q(self, name: str, rank: int, device) -> torch.Tensor:
        """The ``Q`` layer ``name``'s next power step starts from at ``rank``: the warm one, its
        first ``rank`` columns kept on a rank change and fresh ones added from the shared seed
        (every worker starts from the same ``Q``)."""
        old = self.q.get(name)
        if old is not None and old.shape[1] == rank:
            return old
        fresh = self.family.initial_q(self.shapes[name], rank, self._seed(name, -1)).to(device)
        if old is not None:
            keep = min(rank, old.shape[1])
            fresh[:, :keep] = old[:, :keep]
        return fresh

    def _exchange_gathered(self, layers, inputs):
        """Means and own shares of the layers through one all-gather of all their payloads."""
        payloads = [
            self.family.encode(inputs[n], self.choice[n], self._seed(n, self.step)) for n in layers
        ]
        gathered = self._all_gather(torch.cat(payloads))
        means, shares = {}, {}
        offset = 0
        for n, payload in zip(layers, payloads):
            x = inputs[n]
            shares[n] = torch.zeros_like(x)
            self.family.decode_add(payload, self.choice[n], shares[n])
            total = torch.zeros_like(x)
            for r in range(self.world):  # rank order: every worker sums in the same order
                chunk = gathered[r, offset : offset + payload.numel()]
                self.family.decode_add(chunk, self.choice[n], total)
            means[n] = total / self.world
            offset += payload.numel()
        return means, shares

    def _errors(self, name: str, grad: torch.Tensor, candidates: list) -> list[float]:
        """Squared error of each candidate on ``grad`` as this communicator would run it."""
        if isinstance(self.family, PowerSGD):
            return self.family.errors(grad, candidates, lambda r: self._start_q(name, r, "cpu"))
        return self.family.errors(grad, candidates)

    def _seed(self, name: str, step: int) -> int:
        """Independent stream per (seed, step, worker, layer); step -1 is the rank-shared init."""
        rank = 0 if step < 0 else self.rank
        key = f"{self.cfg.seed}/{step}/{rank}/{self.index[name]}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little")

    def _measuring(self) -> bool:
        return self.lgreco is not None and self.lgreco.schedule.measuring(self.step)

    # ---- step boundary and checkpoints --------------------------------------------------------

    def end_step(self) -> dict[str, float]:
        """Close the optimizer step: warn about skipped layers, re-plan when due, return metrics
        (bytes this worker sent, dense-equivalent bytes, ratio, and ``comm/choice/<param>``)."""
        bad = [n for n, flag in self._nonfinite.items() if bool(flag)]
        self._nonfinite.clear()
        if bad:
            warnings.warn(
                f"grad_compression: non-finite gradient at step {self.step} in {len(bad)} "
                f"layer(s) ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); their "
                "compression state (error feedback, warm-start Q, L-GreCo measurement) was "
                "left unchanged for this step",
                RuntimeWarning,
                stacklevel=2,
            )
        dense_phase = self.step < self.cfg.warmup_steps
        self.step += 1
        if self.lgreco is not None and self.choice and self.lgreco.schedule.due(self.step):
            self.choice = self.lgreco.replan(
                self.choice, self._errors, self._sum, self._broadcast, self.rank, self.device
            )
        metrics = self.stats.end_step()
        metrics["comm/dense_phase"] = float(dense_phase)
        metrics.update({f"comm/choice/{n}": v for n, v in self.choices().items()})
        return metrics

    def state_dict(self) -> dict:
        """This worker's state (error feedback is per worker: save one per rank). Tensors and
        plain Python only, so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "step": self.step,
            "choice": dict(self.choice),
            "error": {n: t.detach().cpu().clone() for n, t in self.error.items()},
            "q": {n: t.detach().cpu().clone() for n, t in self.q.items()},
            "acc": {n: t.detach().cpu().clone() for n, t in self._measurement().items()},
            "totals": [self.stats.steps, self.stats.total_bytes_sent, self.stats.total_dense_bytes],
        }

    def _measurement(self) -> dict[str, torch.Tensor]:
        return self.lgreco.acc if self.lgreco is not None else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["choice"]) ^ set(self.choice)
        if unknown:
            raise IntegrityError(
                f"grad_compression state does not match this model: layers {sorted(unknown)[:5]} "
                "differ; resume with the model and config the state was saved with"
            )
        for n, t in state["error"].items():
            if t.numel() != self.shapes[n].numel():
                raise IntegrityError(
                    f"grad_compression state: {n} has {t.numel()} values, "
                    f"the model's parameter {self.shapes[n].numel()}"
                )
        self.step = int(state["step"])
        self.choice = dict(state["choice"])
        error, q, acc = (
            {n: t.to(self.device, copy=True) for n, t in state[key].items()}
            for key in ("error", "q", "acc")
        )
        self.error, self.q = error, q
        if self.lgreco is not None:
            self.lgreco.acc = acc
        self.stats.steps, self.stats.total_bytes_sent, self.stats.total_dense_bytes = state[
            "totals"
        ]


def _comm_hook(comm, bucket):  # unannotated: DDP rejects string annotations
    return comm.communicate(bucket)


def _finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: no NaN/inf in any of ``tensors``. A sum carries any NaN or inf through,
    and costs one pass without the bool copy ``isfinite(t).all()`` makes (a sum overflowing
    past 3e38 would read as non-finite, which only skips a state update)."""
    return torch.isfinite(sum(t.sum() for t in tensors))


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut
