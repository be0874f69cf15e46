"""GaLoreAdamW: AdamW whose 2-D weights keep their Adam moments in a low-rank gradient subspace.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (ICML 2024).
For a low-rank weight with gradient ``G``, every ``update_proj_gap`` steps the optimizer takes the
top-``rank`` singular vectors of ``G`` as a projection ``P``; each step it runs Adam on
``P^T G`` and adds ``scale * P (Adam direction)`` to the weight. Other parameters (and all of a
group with ``low_rank=False``) get plain AdamW in the same optimizer.

Moments at a subspace switch (``moments_on_switch``):
- ``keep``: leave them as they are, as the reference implementation does; their coordinates
  then refer to the old basis.
- ``reset``: zero them and restart Adam's bias correction.
- ``reproject`` (default): carry them into the new basis (see ``transport_moments``): the first
  moment exactly, the second under an uncorrelated-coordinates assumption.

``eight_bit=True`` keeps moments of 4096+ values block-quantized (``quant8``), and by default the
projectors in bfloat16; it runs on any device. The state dict holds the projectors, step counters
and codes as plain tensors and ints: it loads with ``torch.load(weights_only=True)`` and a resumed
optimizer continues exactly where the saved one stopped, mid-gap included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from presso import UnsupportedError
from presso.compressors.optim.config import check_adam_args, check_low_rank_args
from presso.compressors.optim.moments import (
    adam_step_moments,
    init_moments,
    read_moment,
    write_moment,
)
from presso.compressors.optim.projection import Projection, fit_projection, transport_moments

_PROJECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class GaLoreAdamW(torch.optim.Optimizer):
    # The comm hook may all-reduce ``P^T G`` instead of ``G``: this optimizer only ever reads the
    # gradient of a low-rank weight through ``P^T`` between refreshes.
    projects_gradient = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        low_rank: bool = True,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd: str = "exact",
        moments_on_switch: str = "reproject",
        seed: int = 0,
        eight_bit: bool = False,
        state_code: str = "dynamic",
        projector_dtype: str = "auto",
    ) -> None:
        name = type(self).__name__
        check_adam_args(name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        low_rank_args = dict(
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            svd=svd,
            moments_on_switch=moments_on_switch,
            state_code=state_code,
            projector_dtype=projector_dtype,
        )
        check_low_rank_args(name, **low_rank_args)
        if projector_dtype == "auto":
            low_rank_args["projector_dtype"] = "bfloat16" if eight_bit else "float32"
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            low_rank=low_rank,
            seed=seed,
            eight_bit=eight_bit,
            **low_rank_args,
        )
        super().__init__(params, defaults)
        # Called with each new projector matrix (in place) before it is used; the comm hook sets
        # it to a broadcast from rank 0 so that every worker projects onto the same subspace.
        self.projection_sync: Callable[[torch.Tensor], None] | None = None

    # -- which parameters, and when ------------------------------------------------------------

    def params_with_groups(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """Every parameter with its group, in the order the state dict numbers them."""
        for group in self.param_groups:
            for p in group["params"]:
                yield p, group

    @staticmethod
    def is_low_rank(p: torch.Tensor, group: dict) -> bool:
        return group["low_rank"] and p.dim() == 2

    @staticmethod
    def _refreshes(state: dict, group: dict) -> bool:
        """Whether the next step of this parameter fits a new subspace."""
        fitted = "proj_left" in state or "proj_right" in state
        return not fitted or state["step"] % group["update_proj_gap"] == 0

    def comm_projections(self, params: Iterable[torch.Tensor]) -> list[Projection | None]:
        """For each of ``params``, the projection the next step applies to its gradient, or
        ``None`` where that step reads the whole gradient (not low-rank, or a refresh)."""
        groups = dict(self.params_with_groups())
        out: list[Projection | None] = []
        for p in params:
            group, state = groups.get(p), self.state.get(p, {})
            if group is None or not self.is_low_rank(p, group) or self._refreshes(state, group):
                out.append(None)
            else:
                out.append(Projection.from_state(state))
        return out

    def ranks(self) -> list[tuple[torch.Tensor, int]]:
        """``(parameter, rank in force)`` for every low-rank parameter that has a subspace."""
        out = []
        for p, _ in self.params_with_groups():
            state = self.state.get(p, {})
            side = state.get("proj_left", state.get("proj_right"))
            if side is not None:
                out.append((p, side.shape[1]))
        return out

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The running index seeds the randomized SVD: stable across workers and resumes.
        for index, (p, group) in enumerate(self.params_with_groups()):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise UnsupportedError(f"{type(self).__name__} does not take sparse gradients")
            state = self.state[p]
            state.setdefault("step", 0)
            if self.is_low_rank(p, group):
                self._low_rank_step(p, state, group, index)
            else:
                self._dense_step(p, state, group)
            state["step"] += 1
        return loss

    def _dense_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        if "exp_avg" not in state:
            init_moments(state, p, group["state_code"], group["eight_bit"])
        direction = adam_step_moments(
            state, p.grad.float(), state["step"] + 1, group, group["eight_bit"]
        )
        p.mul_(1 - group["lr"] * group["weight_decay"]).add_(direction, alpha=-group["lr"])

    def _low_rank_step(self, p: torch.Tensor, state: dict, group: dict, index: int) -> None:
        update = self._subspace_update(p.grad, state, group, index)
        p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])

    def _subspace_update(
        self, grad: torch.Tensor, state: dict, group: dict, index: int
    ) -> torch.Tensor:
        """``scale * P (Adam direction of P^T grad)``, refreshing ``P`` when due."""
        if self._refreshes(state, group):
            self._refresh(grad, state, group, index)
        proj = Projection.from_state(state)
        state["moment_step"] += 1
        direction = adam_step_moments(
            state, proj.down(grad.float()), state["moment_step"], group, group["eight_bit"]
        )
        return proj.up(direction).mul_(group["scale"])

    def _refresh(self, grad: torch.Tensor, state: dict, group: dict, index: int) -> None:
        generator = None
        if group["svd"] == "randomized":
            seed = ((group["seed"] * 1_000_003 + index) * 1_000_003 + state["step"]) % 2**63
            generator = torch.Generator(device=grad.device).manual_seed(seed)
        fitted = fit_projection(
            grad, group["rank"], group["proj_type"], group["svd"], generator
        ).tensors()
        old = Projection.from_state(state)
        dtype = _PROJECTOR_DTYPES[group["projector_dtype"]]
        for key, matrix in fitted.items():
            state[key] = matrix.to(dtype)
            if self.projection_sync is not None:
                self.projection_sync(state[key])
        new = Projection.from_state(state)
        self._switch_moments(state, old, new, grad, group)

    def _switch_moments(
        self, state: dict, old: Projection, new: Projection, grad: torch.Tensor, group: dict
    ) -> None:
        code, eight_bit = group["state_code"], group["eight_bit"]
        policy = group["moments_on_switch"]
        if "exp_avg" not in state or policy == "reset":
            like = new.down(grad.float())
            init_moments(state, like, code, eight_bit)
            state["moment_step"] = 0
        elif policy == "reproject":
            moments = read_moment(state, "exp_avg", code), read_moment(state, "exp_avg_sq", code)
            exp_avg, exp_avg_sq = transport_moments(old, new, *moments)
            write_moment(state, "exp_avg", exp_avg, code, eight_bit)
            write_moment(state, "exp_avg_sq", exp_avg_sq, code, eight_bit)

    # -- state dict ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that state tensors keep the dtype they were saved with: torch would
        cast 8-bit codes and bfloat16 projectors to the parameter's dtype."""
        saved = state_dict["state"]
        tensors = {
            pid: {k: v for k, v in s.items() if torch.is_tensor(v)} for pid, s in saved.items()
        }
        others = {
            pid: {k: v for k, v in s.items() if not torch.is_tensor(v)} for pid, s in saved.items()
        }
        super().load_state_dict({**state_dict, "state": others})
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for pid, (p, _) in zip(ids, self.params_with_groups()):
            for key, value in tensors.get(pid, {}).items():
                self.state[p][key] = value.to(p.device)
