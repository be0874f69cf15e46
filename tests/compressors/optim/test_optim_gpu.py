"""The optimizers on CUDA: same codes as on the CPU, they train, and a state dict moves between
devices. Skipped without CUDA."""

import pytest
import torch

from presso.compressors.optim import OptimizerConfig, build_optimizer
from presso.compressors.optim.quant8 import CODES, quantize_blockwise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
LOW_RANK = ["galore", "galore8bit", "gradnormlorp", "gradnormlorp8bit"]


@pytest.mark.parametrize("kind", CODES)
def test_quantization_is_the_same_on_cuda(kind):
    """8-bit states are pure torch: a checkpoint written on a GPU must decode the same on a CPU,
    so the codes must not depend on the device."""
    x = torch.randn(300, 517) * torch.logspace(-4, 1, 300)[:, None]
    for signed in (True, False):
        y = x if signed else x.abs()
        cpu = quantize_blockwise(y, kind, signed)
        gpu = quantize_blockwise(y.cuda(), kind, signed)
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def _train(problem, model, opt, steps: int, device: str) -> list[float]:
    x, y = problem.x.to(device), problem.y.to(device)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("name", LOW_RANK)
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_trains_on_cuda_like_on_cpu(problem, name, svd):
    """Every variant steps on CUDA with all its state there, and makes the same progress as on
    the CPU (final losses within 5 %: SVDs and reductions round differently per device)."""
    cfg = OptimizerConfig(name=name, lr=1e-2, rank=16, update_proj_gap=20, scale=1.0, svd=svd)
    final = {}
    for device in ("cpu", "cuda"):
        model = problem.model().to(device)
        opt = build_optimizer(cfg, model)
        losses = _train(problem, model, opt, 60, device)
        assert losses[-1] < 0.25 * losses[0]
        final[device] = losses[-1]
        for state in opt.state.values():
            assert all(v.device.type == device for v in state.values() if torch.is_tensor(v))
    assert final["cuda"] == pytest.approx(final["cpu"], rel=0.05)


@pytest.mark.parametrize("name", LOW_RANK)
def test_state_dict_moves_between_devices(problem, tmp_path, name):
    """A run checkpointed on a GPU resumes on a GPU exactly, and on a CPU (weights_only) with the
    saved dtypes and to within cross-device rounding."""
    cfg = OptimizerConfig(name=name, lr=1e-2, rank=16, update_proj_gap=4, scale=1.0)
    model = problem.model().cuda()
    opt = build_optimizer(cfg, model)
    _train(problem, model, opt, 6, "cuda")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(problem, model, opt, 4, "cuda")

    for device in ("cuda", "cpu"):
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True, map_location=device)
        resumed = problem.model(seed=7).to(device)
        resumed.load_state_dict(saved["model"])
        opt_resumed = build_optimizer(cfg, resumed)
        opt_resumed.load_state_dict(saved["optim"])
        _train(problem, resumed, opt_resumed, 4, device)
        tol = 1e-6 if device == "cuda" else 5e-4
        for a, b in zip(model.parameters(), resumed.parameters()):
            torch.testing.assert_close(b.cpu(), a.detach().cpu(), rtol=0, atol=tol)
