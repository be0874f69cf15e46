"""Fixtures for the post-training compression tests: a layer and its correlated inputs."""

import pytest
import torch


@pytest.fixture
def correlated_layer():
    """A ``[48, 128]`` weight and 2048 input rows whose channels are correlated and scaled
    unevenly (log-normal, neighbours unrelated), like a transformer's activations: the setting
    where data-aware methods should win."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    k = 128
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = (torch.randn(2048, k) @ mix) * torch.exp(0.8 * torch.randn(k))
    w = torch.randn(48, k)
    return w, x
