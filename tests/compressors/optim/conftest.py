"""A small regression problem shared by the optimizer tests."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class Problem:
    """A fixed regression task (a random tanh teacher) and a deterministic MLP student."""

    def __init__(self, d_in: int = 32, d_hidden: int = 256, d_out: int = 16, n: int = 512):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d_in, generator=gen)
        self.y = torch.tanh(self.x @ torch.randn(d_in, d_out, generator=gen) / d_in**0.5 * 2)
        self.sizes = (d_in, d_hidden, d_out)

    def model(self, seed: int = 1) -> nn.Module:
        torch.manual_seed(seed)
        d_in, d_hidden, d_out = self.sizes
        return nn.Sequential(
            nn.Linear(d_in, d_hidden),
            nn.Tanh(),
            nn.Linear(d_hidden, d_hidden),
            nn.LayerNorm(d_hidden),
            nn.Linear(d_hidden, d_out),
        )

    def loss(self, model: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(model(self.x), self.y)

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            loss = self.loss(model)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return losses


@pytest.fixture
def problem() -> Problem:
    return Problem()


@pytest.fixture
def make_problem() -> type[Problem]:
    """The problem class, for tests that need other sizes."""
    return Problem
