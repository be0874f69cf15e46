"""The OBS column sweep: its lazy batching is exact and its updates are optimal."""

import logging

import pytest
import torch

from presso import UnsupportedError
from presso.compressors.ptq.obs import inverse_cholesky, obs_sweep


def _problem(k=24, n=6):
    torch.manual_seed(0)
    x = torch.randn(200, k) @ (torch.randn(k, k) / k**0.5 + torch.eye(k))
    return torch.randn(n, k), (x.T @ x).double() / 200


def _round(j, wb, i, ub):
    return (wb[:, i] * 4).round() / 4


@pytest.mark.parametrize("blocksize", [1, 5, 8])
def test_lazy_blocks_equal_the_plain_sweep(blocksize):
    """Deferring the updates to later blocks must not change a single fixed column (beyond
    float noise): that is what makes the fast sweep a faithful GPTQ/SparseGPT."""
    w, h = _problem()
    u = inverse_cholesky(h, 0.01)
    full = obs_sweep(w, u, _round, blocksize=24)
    lazy = obs_sweep(w, u, _round, blocksize=blocksize)
    assert (full != lazy).float().mean() < 0.01
    assert torch.allclose(full, lazy, atol=0.25 + 1e-6)


def test_compensation_is_the_least_squares_optimum():
    """Fixing the first column and updating the rest by OBS must give the best possible output
    for the remaining free columns: the least-squares solution with that column fixed."""
    w, h = _problem()
    u = inverse_cholesky(h, 0.0)
    fixed0 = torch.zeros(w.shape[0])
    seen = {}

    def fix_first(j, wb, i, ub):
        if j == 0:
            return fixed0
        seen.setdefault("rest", wb[:, i:].clone())  # the compensated free columns
        return wb[:, i]

    obs_sweep(w, u, fix_first, blocksize=24)
    # Least squares over columns 1.. with column 0 pinned to 0: H11 w1' = H11 w1 + H10 w0.
    h = h.float()
    rhs = w[:, 1:] @ h[1:, 1:] + w[:, :1] @ h[:1, 1:]
    best = torch.linalg.solve(h[1:, 1:], rhs.T).T
    assert torch.allclose(seen["rest"], best, atol=1e-3)


def test_hopeless_hessian_fails_with_the_layer_name(caplog):
    """Dampening is bounded: a matrix no sane dampening makes positive definite is an error."""
    h = torch.tensor([[1.0, 1e8], [1e8, 1.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING), pytest.raises(UnsupportedError, match="my.layer"):
        inverse_cholesky(h, 0.01, "my.layer")
