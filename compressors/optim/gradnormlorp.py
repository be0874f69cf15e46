"""GradNormLoRP: GaLore on a weight-normalized reparameterization of each low-rank weight.

Huang et al., "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training"
(AAAI 2025). Each low-rank weight is seen as ``W = m * V / ||V||`` per output channel (row). A
step splits ``dL/dW`` into ``dL/dm`` and ``dL/dV`` (``weightnorm.split_gradient``), steps ``V``
with GaLore (the direction gradient projected to rank r, Adam in that space), steps ``m`` with a
full-rank Adam whose state is two vectors of length ``out_features``, and writes the rebuilt
``W`` back into the parameter. Decoupled weight decay shrinks ``m``, i.e. ``W``, as AdamW would.

Unlike the released code, the magnitude update is applied, and the 8-bit variant
(``eight_bit=True``) steps on any device.
"""

from __future__ import annotations

import torch

from presso.compressors.optim import weightnorm
from presso.compressors.optim.galore import GaLoreAdamW
from presso.compressors.optim.moments import adam_step_moments, init_moments


class GradNormLoRP(GaLoreAdamW):
    # The low-rank subspace is fitted to dL/dV, which needs every row's <dL/dW, V/||V||>:
    # an all-reduce of P^T dL/dW alone cannot reproduce what this optimizer reads.
    projects_gradient = False

    def _low_rank_step(self, p: torch.Tensor, state: dict, group: dict, index: int) -> None:
        lr = group["lr"]
        weight = p.detach().float()
        if "magnitude" not in state:
            # V starts as W, so m = ||V|| = the row norms of W.
            state["magnitude"] = weightnorm.row_norms(weight)
            state["direction_norm"] = state["magnitude"].clone()
            init_moments(state, state["magnitude"], group["state_code"], False, prefix="mag_")
        magnitude, norm = state["magnitude"], state["direction_norm"]
        grad_magnitude, grad_direction = weightnorm.split_gradient(
            weight, p.grad.float(), magnitude, norm
        )
        direction = weightnorm.direction(weight, magnitude, norm)
        direction.add_(self._subspace_update(grad_direction, state, group, index), alpha=-lr)
        # The magnitude is small (one value per row): its Adam state stays fp32 in every variant.
        step_magnitude = adam_step_moments(
            state, grad_magnitude, state["step"] + 1, group, eight_bit=False, prefix="mag_"
        )
        magnitude.mul_(1 - lr * group["weight_decay"]).add_(step_magnitude, alpha=-lr)
        new_weight, state["direction_norm"] = weightnorm.compose(magnitude, direction)
        p.copy_(new_weight)
