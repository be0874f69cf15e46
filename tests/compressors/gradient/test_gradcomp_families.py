"""The three compressor families as plain tensor maths, on one process: payload sizes, measured
errors, reconstruction at the maximum setting, and empty tensors."""

import math

import pytest
import torch

from presso.compressors.gradient.powersgd import PowerSGD, orthonormalize, power_step
from presso.compressors.gradient.quant import Quantize
from presso.compressors.gradient.topk import TopK


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _grad(rows=24, cols=40, seed=0):
    """A gradient-like matrix: a decaying spectrum plus noise."""
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(rows, 6, generator=gen), torch.randn(6, cols, generator=gen)
    return u * torch.tensor([4.0, 2, 1, 0.5, 0.25, 0.1]) @ v + 0.01 * torch.randn(
        rows, cols, generator=gen
    )


def _roundtrip(family, x, value, seed=0):
    payload = family.encode(x.reshape(-1), value, seed)
    out = torch.zeros(x.numel())
    family.decode_add(payload, value, out)
    return payload, out.view_as(x)


@pytest.mark.parametrize(
    "family, values",
    [(TopK(), [0.001, 0.01, 0.3, 1.0]), (Quantize(64), [2, 3, 4, 8]), (Quantize(32), [3])],
)
def test_gathered_payloads_have_the_announced_size(family, values):
    """The solver plans with ``payload_bytes`` and the communicator sizes its all-gather with the
    real payload: the two must agree exactly, for every setting and for sizes that leave a ragged
    last bucket or a fractional k."""
    for shape in [(24, 40), (7, 13), (1, 5)]:
        x = _grad(*shape)
        for value in values:
            payload, _ = _roundtrip(family, x, value)
            assert payload.dtype == torch.int32
            assert payload.numel() * 4 == family.payload_bytes(x.shape, value)


def test_powersgd_sends_p_then_q_of_the_announced_size():
    """PowerSGD's two all-reduces carry exactly ``(rows + cols) x rank`` fp32 values per layer."""
    family, sent = PowerSGD(), []
    ms = [_grad(24, 40), _grad(16, 8, seed=1)]
    ranks = [family.clamp(m.shape, 4) for m in ms]
    qs = [family.initial_q(m.shape, r, seed=0) for m, r in zip(ms, ranks)]
    power_step(ms, qs, lambda t: sent.append(t.numel() * t.element_size()) or t)
    assert sum(sent) == sum(family.payload_bytes(m.shape, r) for m, r in zip(ms, ranks))
    assert sent[0] == 4 * (24 * 4 + 16 * 4)  # P first
    assert ranks == [4, 4] and family.clamp((16, 8), 20) == 8


def test_errors_are_the_errors_of_the_compression():
    """L-GreCo trusts ``errors`` to rank candidates: top-k's must equal the measured squared error,
    PowerSGD's the error of the power step it would take from the given warm ``Q`` (no less than
    the best rank-r error, which the SVD tail gives and which an earlier model budgeted), and
    quantization's the expected stochastic-rounding error (checked against 200 draws)."""
    x = _grad()
    topk = TopK()
    for density, err in zip([0.05, 0.2, 1.0], topk.errors(x, [0.05, 0.2, 1.0])):
        assert err == pytest.approx(float((x - _roundtrip(topk, x, density)[1]).square().sum()))

    psgd = PowerSGD()
    ranks = [1, 2, 4, 40]
    warm = psgd.initial_q(x.shape, 24, seed=0)
    for _ in range(3):  # a Q warmed by a few steps, as in training
        _, (warm,), _ = power_step([x], [warm], lambda t: t)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    for r, err in zip(ranks, psgd.errors(x, ranks, lambda r: warm[:, : min(r, 24)])):
        (p,), (q,), _ = power_step([x], [warm[:, : min(r, 24)]], lambda t: t)
        assert float((x - p @ q.T).square().sum()) == pytest.approx(err, rel=1e-4, abs=1e-6)
        best = u[:, :r] * s[:r] @ vh[:r]
        assert err >= float((x - best).square().sum()) - 1e-6  # never below the SVD tail

    quant = Quantize(64)
    for bits, err in zip([2, 4], quant.errors(x, [2, 4])):
        draws = [
            float((x - _roundtrip(quant, x, bits, seed)[1]).square().sum()) for seed in range(200)
        ]
        assert sum(draws) / len(draws) == pytest.approx(err, rel=0.05)


def test_maximum_settings_reconstruct_the_gradient():
    """Full rank, density 1 and (loosely) 8 bits must give back the input: the check that the
    encodings lose nothing they were not asked to lose."""
    x = _grad()
    assert torch.equal(_roundtrip(TopK(), x, 1.0)[1], x)
    q8 = _roundtrip(Quantize(64), x, 8)[1]
    step = (x.max() - x.min()) / 255
    assert (q8 - x).abs().max() <= step
    for shape in [(24, 40), (40, 24)]:
        m = _grad(*shape)
        r = PowerSGD().clamp(m.shape, 10**6)
        (p,), (q,), _ = power_step([m], [PowerSGD().initial_q(m.shape, r, 0)], lambda t: t)
        assert torch.allclose(p @ q.T, m, atol=1e-5 * m.abs().max())


def test_empty_and_constant_tensors():
    """Zero-size tensors and all-zero gradients (a layer that got no signal) must not crash or
    produce NaN: orthonormalising a zero P is where Gram-Schmidt would divide by zero."""
    empty = torch.zeros(0, 5)
    for family, value in [(TopK(), 0.1), (Quantize(32), 4)]:
        payload, out = _roundtrip(family, empty, value)
        assert out.numel() == 0 and family.errors(empty, [value]) == [0.0]
    assert PowerSGD().errors(empty, [1, 2], lambda r: torch.zeros(5, r)) == [0.0, 0.0]
    assert PowerSGD().clamp(empty.shape, 4) == 0
    zero = torch.zeros(8, 6)
    (p,), (q,), _ = power_step([zero], [torch.zeros(6, 2)], lambda t: t)
    assert torch.isfinite(p).all() and torch.equal(p @ q.T, zero)
    assert torch.allclose(
        orthonormalize(torch.zeros(5, 2)).T @ orthonormalize(torch.zeros(5, 2)), torch.eye(2)
    )
    assert math.isfinite(Quantize(32).errors(torch.ones(100), [2])[0])
