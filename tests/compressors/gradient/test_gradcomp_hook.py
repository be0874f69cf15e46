"""The communicator's lifecycle on one gloo process: config validation, bad gradients, clamping,
L-GreCo's schedule and exact resume from a state dict."""

import io
import math
import os
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from presso import ConfigError, IntegrityError, UnsupportedError
from presso.compressors.gradient import GradCompressionConfig, Method, build_communicator
from presso.compressors.gradient.lgreco import Schedule


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """A world of one: enough for DDP to call the hook and for every collective to run."""
    torch.set_num_threads(1)
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed=0, with_empty=True):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 4)
    )
    if with_empty:
        model.register_parameter("empty", nn.Parameter(torch.zeros(0, 4)))
    return model


def _setup(model, **settings):
    ddp = DDP(model, bucket_cap_mb=0.001)
    cfg = GradCompressionConfig(
        **{"warmup_steps": 1, "min_numel": 16, "bucket_size": 32, **settings}
    )
    comm = build_communicator(cfg, ddp)
    comm.register(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ddp, comm, opt


def _step(ddp, comm, opt, gen, poison=False, before_end=None):
    x = torch.randn(16, 16, generator=gen)
    if poison:
        x[0, 0] = float("nan")
    out = ddp(x)
    loss = out.square().mean() + sum(p.sum() for p in ddp.module.parameters() if not p.numel())
    opt.zero_grad()
    loss.backward()
    if all(torch.isfinite(p.grad).all() for p in ddp.module.parameters()):
        opt.step()  # the training loop's guard: skip a non-finite step
    if before_end is not None:
        before_end()
    return comm.end_step()


def test_config_errors_name_the_key():
    """A bad value must fail before any worker starts, naming the full key so the user can fix it."""
    bad = {
        "rank": 0,
        "density": 1.5,
        "bits": 5,
        "alpha": -1.0,
        "adjust_every": 0,
        "warmup_steps": -1,
        "bucket_size": 48,
        "min_numel": -1,
        "measure_steps": 500,
        "rank_candidates": [2, 0],
        "density_candidates": [0.0],
        "bits_candidates": [6],
        "method": "bogus",
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^train\.grad_compression\.{key}"):
            GradCompressionConfig(**{key: value}).validate("train.grad_compression")
    with pytest.raises(ConfigError, match=r"\.family: method 'powersgd'"):
        GradCompressionConfig(method="powersgd", family="topk").validate("g")
    with pytest.raises(ConfigError, match=r"^g\.bits: L-GreCo's reference 8"):
        GradCompressionConfig(
            method="lgreco", family="quant", bits=8, bits_candidates=[2, 4]
        ).validate("g")
    merged = OmegaConf.merge(
        OmegaConf.structured(GradCompressionConfig),
        OmegaConf.from_dotlist(["method=lgreco", "family=quant"]),
    )
    cfg = OmegaConf.to_object(merged)
    cfg.validate("g")
    assert cfg.method is Method.lgreco and cfg.default() == 4


def test_build_by_method():
    """``none`` means plain DDP (no communicator); GaLore is built with its optimizer; torch's
    hook refuses zero-size parameters with a message instead of crashing mid-backward."""
    ddp = DDP(_model())
    assert build_communicator(GradCompressionConfig(method="none"), ddp) is None
    with pytest.raises(UnsupportedError, match="build_galore_communicator"):
        build_communicator(GradCompressionConfig(method="galore"), ddp)
    with pytest.raises(UnsupportedError, match="zero-size"):
        build_communicator(GradCompressionConfig(method="torch_powersgd"), ddp)


def test_nan_gradient_leaves_compression_state_untouched():
    """One NaN batch must not poison error feedback or PowerSGD's warm-start Q: the step's state
    update is skipped with one warning, and the next finite step compresses normally."""
    ddp, comm, opt = _setup(_model(), method="powersgd", rank=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        _step(ddp, comm, opt, gen)
    error = {n: t.clone() for n, t in comm.error.items()}
    q = {n: t.clone() for n, t in comm.q.items()}
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        _step(ddp, comm, opt, gen, poison=True)
    assert len(record) == 1
    assert error.keys() == comm.error.keys() and q.keys() == comm.q.keys()
    assert all(torch.equal(error[n], comm.error[n]) for n in error)
    assert all(torch.equal(q[n], comm.q[n]) for n in q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(ddp, comm, opt, gen)
    assert all(torch.isfinite(t).all() for t in [*comm.error.values(), *comm.q.values()])
    assert not all(torch.equal(error[n], comm.error[n]) for n in error)


def test_lgreco_measures_only_finite_steps():
    """A NaN batch inside L-GreCo's measurement window must not reach the measurement; if no
    step of the window could be measured, the re-plan keeps the current plan instead of reading
    "zero error" and jumping to the strongest compression."""
    settings = dict(
        method="lgreco", rank=2, rank_candidates=[1, 2, 4], adjust_every=2, measure_steps=2
    )
    ddp, comm, opt = _setup(_model(), **{**settings, "warmup_steps": 2})
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        for _ in range(2):  # the whole first window is poisoned
            _step(ddp, comm, opt, gen, poison=True)
    assert len(record) == 2  # one per step
    assert comm.choices() == {"0.weight": 2.0, "2.weight": 2.0, "4.weight": 2.0}
    _step(ddp, comm, opt, gen)
    snapshot = {n: t.clone() for n, t in comm.lgreco.acc.items()}

    def acc_unchanged():
        assert snapshot.keys() == comm.lgreco.acc.keys()
        assert all(torch.equal(snapshot[n], comm.lgreco.acc[n]) for n in snapshot)

    with pytest.warns(RuntimeWarning, match="non-finite"):
        _step(ddp, comm, opt, gen, poison=True, before_end=acc_unchanged)  # then re-plans
    assert not comm.lgreco.acc and all(torch.isfinite(t).all() for t in comm.error.values())


def test_too_large_rank_is_clamped_with_one_warning():
    """Rank 12 exceeds what the 8 x 32 and 4 x 8 layers allow: the run must go on at their
    maximum ranks, with one warning at build time naming both and none during training."""
    with pytest.warns(UserWarning, match=r"clamped: 2\.weight→8, 4\.weight→4") as record:
        ddp, comm, opt = _setup(_model(), method="powersgd", rank=12)
    assert len(record) == 1
    assert comm.choices() == {"0.weight": 12.0, "2.weight": 8.0, "4.weight": 4.0}
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _step(ddp, comm, opt, gen)
    assert comm.q["2.weight"].shape == (32, 8)


def test_lgreco_schedule():
    """Measure the ``measure_steps`` steps right before each re-plan; the first re-plan closes
    the warm-up, later ones follow every ``adjust_every`` steps."""
    s = Schedule(warmup_steps=4, adjust_every=5, measure_steps=2)
    assert [t for t in range(1, 20) if s.due(t)] == [4, 9, 14, 19]
    assert [k for k in range(19) if s.measuring(k)] == [2, 3, 7, 8, 12, 13, 17, 18]
    s0 = Schedule(warmup_steps=0, adjust_every=3, measure_steps=1)
    assert [t for t in range(1, 10) if s0.due(t)] == [3, 6, 9]
    assert [k for k in range(9) if s0.measuring(k)] == [2, 5, 8]


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="lgreco", family="quant", bits=4, adjust_every=3, measure_steps=2),
        dict(method="lgreco", family="powersgd", rank=2, rank_candidates=[1, 2, 4], adjust_every=3),
        dict(method="torch_powersgd", rank=2),
    ],
    ids=["lgreco_quant", "lgreco_powersgd", "torch_powersgd"],
)
def test_resume_from_state_dict_is_exact(settings):
    """Stopping after step 4 and resuming from the saved state (loaded with weights_only=True,
    as a checkpoint would be) must give bit-identical parameters to an uninterrupted run:
    error feedback, warm-start Q, L-GreCo's plan and measurement and the rounding streams all
    come back."""
    empty = settings["method"] != "torch_powersgd"
    gen = torch.Generator().manual_seed(0)
    ddp, comm, opt = _setup(_model(with_empty=empty), **settings)
    for _ in range(4):
        _step(ddp, comm, opt, gen)
    buf = io.BytesIO()
    torch.save(
        {"comm": comm.state_dict(), "model": ddp.module.state_dict(), "opt": opt.state_dict()}, buf
    )
    rng = gen.get_state()
    for _ in range(4):
        metrics = _step(ddp, comm, opt, gen)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = _model(seed=1, with_empty=empty)
    model.load_state_dict(saved["model"])
    ddp2, comm2, opt2 = _setup(model, **settings)
    opt2.load_state_dict(saved["opt"])
    comm2.load_state_dict(saved["comm"])
    gen.set_state(rng)
    for _ in range(4):
        metrics2 = _step(ddp2, comm2, opt2, gen)
    assert metrics2 == metrics
    for a, b in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(a, b)


def test_state_from_another_model_is_refused():
    """Loading compression state saved for a different model must fail loudly, not misapply."""
    _, comm, _ = _setup(_model(), method="powersgd")
    state = comm.state_dict()
    state["choice"]["3.weight"] = 2
    with pytest.raises(IntegrityError, match="does not match this model"):
        comm.load_state_dict(state)


class _Bucket:
    """What DDP hands a comm hook: one flat buffer and each parameter's gradient as a view of it."""

    def __init__(self, params, grads):
        self._params = params
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        views = self._buffer.split([g.numel() for g in grads])
        self._grads = [v.view_as(g) for v, g in zip(views, grads)]

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def gradients(self):
        return self._grads


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.01, 0.1, 0.3, 0.9]),
    steps=st.integers(2, 6),
)
def test_error_feedback_matches_an_independent_recurrence(seed, density, steps):
    """Over several steps a layer must send ``C(g_t + e_t)`` and keep ``e_{t+1} = g_t + e_t -
    C(g_t + e_t)``, with ``C`` (top-k) computed here from scratch: a residual that is not added
    back, a sign error, or a buffer that resets or keeps the wrong part breaks the equality."""
    model = nn.Linear(16, 8, bias=False)
    cfg = dict(method="uniform", family="topk", density=density, warmup_steps=0, min_numel=16)
    comm = build_communicator(GradCompressionConfig(**cfg), SimpleNamespace(module=model))
    gen = torch.Generator().manual_seed(seed)
    error = torch.zeros(model.weight.numel())
    for _ in range(steps):
        grad = torch.randn(model.weight.shape, generator=gen)
        bucket = _Bucket([model.weight], [grad])
        comm.communicate(bucket).wait()
        x = grad.reshape(-1) + error
        keep = x.abs().topk(max(1, math.ceil(density * x.numel()))).indices
        sent = torch.zeros_like(x)
        sent[keep] = x[keep]
        error = x - sent
        assert torch.equal(bucket.gradients()[0].reshape(-1), sent)  # a world of one: mean = own
        assert torch.equal(comm.error["weight"], error)
        comm.end_step()
