"""GradNormLoRP: the weight-normalized gradients are right, and the optimizer on ``W`` is the
paper's method on the explicit ``(m, V)`` parameterization -- magnitude update included."""

import torch
from torch import nn

from presso.compressors.optim import GaLoreAdamW, GradNormLoRP, weightnorm


def test_split_gradient_matches_autograd():
    """``dL/dm`` and ``dL/dV`` from ``dL/dW`` must equal autograd through ``m * V / ||V||``,
    including when ``||V|| != m`` (the state the optimizer reaches after a few steps)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 11, generator=gen, requires_grad=True)
    m = torch.randn(7, generator=gen, requires_grad=True)
    target = torch.randn(7, 11, generator=gen)
    w = m[:, None] * v / v.norm(dim=1, keepdim=True)
    w.retain_grad()
    ((w - target) ** 2 * target).sum().backward()
    grad_m, grad_v = weightnorm.split_gradient(
        w.detach(), w.grad, m.detach(), v.detach().norm(dim=1)
    )
    torch.testing.assert_close(grad_m, m.grad)
    torch.testing.assert_close(grad_v, v.grad)


class _WeightNormLinear(nn.Module):
    """The reference: ``m`` and ``V`` as real parameters, ``W`` computed in the forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.v = nn.Parameter(weight.clone())
        self.m = nn.Parameter(weight.norm(dim=1))
        self.bias = nn.Parameter(bias.clone())

    def weight(self) -> torch.Tensor:
        return self.m[:, None] * self.v / self.v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


def test_gradnormlorp_equals_galore_on_explicit_weight_norm():
    """GradNormLoRP stepping ``W`` must follow GaLore on ``V`` plus AdamW on ``m`` (decay on ``m``
    only, which is decay on ``W``) in the explicit reparameterization, across subspace refreshes.
    An optimizer that drops the magnitude update (as the released code does) fails this."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 24, generator=gen), torch.randn(128, 16, generator=gen)
    torch.manual_seed(1)
    ours = nn.Linear(24, 16)
    ref = _WeightNormLinear(ours.weight.detach(), ours.bias.detach())
    initial_norms = ours.weight.detach().norm(dim=1)
    kw = dict(lr=1e-2, weight_decay=0.1, rank=4, update_proj_gap=3, scale=0.5)
    ref_opt = GaLoreAdamW(
        [
            {"params": [ref.v], "weight_decay": 0.0},
            {"params": [ref.m, ref.bias], "low_rank": False},
        ],
        **kw,
    )
    opt = GradNormLoRP(
        [{"params": [ours.weight]}, {"params": [ours.bias], "low_rank": False}], **kw
    )
    for _ in range(10):
        for model, optimizer in ((ref, ref_opt), (ours, opt)):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(ours.weight, ref.weight(), rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=2e-6)
    # The magnitudes moved (so the comparison exercised their update), match the reference's,
    # and still are the row norms of W.
    magnitude = opt.state[ours.weight]["magnitude"]
    assert (magnitude - initial_norms).abs().max() > 1e-2
    torch.testing.assert_close(magnitude, ref.m.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(magnitude, ours.weight.detach().norm(dim=1), rtol=0, atol=1e-5)


def test_zero_rows_stay_zero():
    """A row with no direction (all zeros) cannot be normalized; it must stay zero instead of
    turning into NaNs that spread through the model."""
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[2] = 0
    opt = GradNormLoRP([lin.weight], lr=1e-2, rank=2)
    for _ in range(3):
        lin(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(lin.weight).all()
    assert torch.equal(lin.weight[2], torch.zeros(8))
