"""Weight normalization per output channel, ``W = m * V / ||V||`` (rows of an nn.Linear weight).

GradNormLoRP steps ``m`` and ``V`` rather than ``W``. The model keeps ``W`` only; the optimizer
keeps ``m`` and ``s = ||V||`` per row, which together with ``W`` determine ``V = (s / m) * W``.
So the reparameterization costs two vectors of state, not a second copy of the weight.

A row with ``m = 0`` has no direction; it gets zero gradients and stays zero.
"""

from __future__ import annotations

import torch


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def split_gradient(
    weight: torch.Tensor, grad: torch.Tensor, magnitude: torch.Tensor, direction_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule from ``dL/dW`` to ``(dL/dm, dL/dV)``.

    With ``u = V / ||V||`` (= ``W / m``): ``dL/dm = <dL/dW, u>`` per row, and
    ``dL/dV = (m / ||V||) (dL/dW - <dL/dW, u> u)``: the part of the gradient orthogonal to each
    row's direction, scaled by how much the norm shrinks it.
    """
    unit = weight / _safe(magnitude)[:, None]
    grad_magnitude = (grad * unit).sum(dim=1)
    grad_direction = grad - grad_magnitude[:, None] * unit
    grad_direction *= (magnitude / _safe(direction_norm))[:, None]
    return grad_magnitude, grad_direction


def direction(
    weight: torch.Tensor, magnitude: torch.Tensor, direction_norm: torch.Tensor
) -> torch.Tensor:
    """The direction matrix ``V`` behind ``weight``."""
    return weight * (direction_norm / _safe(magnitude))[:, None]


def compose(magnitude: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, ||V||)`` for magnitude ``m`` and direction ``V``."""
    norm = row_norms(direction)
    return direction * (magnitude / _safe(norm))[:, None], norm
