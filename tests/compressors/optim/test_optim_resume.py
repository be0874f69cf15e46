"""Resuming from a saved optimizer state dict, mid subspace gap, continues exactly."""

import pytest
import torch

from presso.compressors.optim import OptimizerConfig, build_optimizer
from presso.compressors.optim.config import OPTIMIZERS

OWN = [name for name in OPTIMIZERS.names() if name != "galore_torch"]  # not the peer

GAP, SAVE_AT, TOTAL = 4, 6, 10  # saved two steps after a refresh; one more refresh follows


def _config(name: str, svd: str) -> OptimizerConfig:
    return OptimizerConfig(name=name, lr=1e-2, rank=16, update_proj_gap=GAP, scale=1.0, svd=svd)


def _steps(problem, model, optimizer, start: int, stop: int) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(problem.x.shape[0], generator=gen)[:64] for _ in range(TOTAL)]
    for i in range(start, stop):
        loss = torch.nn.functional.mse_loss(model(problem.x[batches[i]]), problem.y[batches[i]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "name,svd", [(name, "exact") for name in OWN] + [("galore8bit", "randomized")]
)
def test_resume_mid_gap_is_exact(problem, tmp_path, name, svd):
    """A job that is preempted and resumed must train the same model as one that was not: the
    state dict carries projectors, step counters, 8-bit codes and their scales, loads with
    ``weights_only=True`` (no pickled code), and the continued run is bit-identical."""
    straight = problem.model()
    opt = build_optimizer(_config(name, svd), straight)
    _steps(problem, straight, opt, 0, TOTAL)

    first = problem.model()
    opt_first = build_optimizer(_config(name, svd), first)
    _steps(problem, first, opt_first, 0, SAVE_AT)
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = problem.model(seed=7)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = build_optimizer(_config(name, svd), resumed)
    opt_resumed.load_state_dict(saved["optim"])
    for p, q in zip(first.parameters(), resumed.parameters()):
        # Saved dtypes survive the load (torch would cast uint8 codes and bf16 projectors).
        for key, value in opt_first.state[p].items():
            assert getattr(opt_resumed.state[q][key], "dtype", None) == getattr(
                value, "dtype", None
            )
    _steps(problem, resumed, opt_resumed, SAVE_AT, TOTAL)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
