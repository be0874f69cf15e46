"""Every compression method on 2 gloo workers with DDP: replicas stay identical, the byte count is
what the collectives were handed, error feedback conserves the gradient, and L-GreCo's plan is one
plan that all workers follow. One spawn runs every scenario (module fixture) to keep this fast."""

import math
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from presso.compressors.gradient import GradCompressionConfig, build_communicator

STEPS, WARMUP, MIN_NUMEL, BUCKET, TOKENS = 8, 2, 64, 64, 4
# Compressed matrices of the test model; everything else (1-D, tiny, empty) travels in the flat
# dense all-reduce.
COMPRESSED = {
    "out.weight": (8, 48),
    "hidden.weight": (48, 32),
    "mid.weight": (48, 48),
    "embed.weight": (64, 32),
}
FLAT_NUMEL = 8 + 48 + 48 + 48 + 16 + 0  # out.bias, norm.weight, norm.bias, hidden.bias, tiny, empty
DENSE_BYTES = 4 * (sum(math.prod(s) for s in COMPRESSED.values()) + FLAT_NUMEL)


class Net(nn.Module):
    """An embedding and an MLP. Only ``TOKENS`` of the 64 embedding rows are ever used, so the
    layers' gradients differ in rank, sparsity and range, as in a real network: there is a better
    per-layer plan than uniform compression for L-GreCo to find."""

    def __init__(self, with_empty: bool = True):
        super().__init__()
        # Registered in another order than used: DDP regroups its buckets after iteration 1, so
        # state keyed by bucket index would land on the wrong layers.
        self.out = nn.Linear(48, 8)
        self.norm = nn.LayerNorm(48)
        self.hidden = nn.Linear(32, 48)
        self.mid = nn.Linear(48, 48, bias=False)
        self.tiny = nn.Parameter(torch.randn(4, 4) * 0.3)
        self.embed = nn.Embedding(64, 32)
        # Zero-size parameters must work; torch's own hook cannot view them as matrices.
        self.empty = nn.Parameter(torch.zeros(0, 3)) if with_empty else None

    def forward(self, x, tokens):
        h = torch.tanh(self.hidden(x + self.embed(tokens)))
        h = self.norm(torch.tanh(self.mid(h)))
        y = self.out(h)[:, :4] @ self.tiny
        return y if self.empty is None else y + self.empty.sum()


SCENARIOS = {
    "dense": dict(method="none"),
    "powersgd": dict(method="powersgd", rank=2),
    "topk": dict(method="uniform", family="topk", density=0.1),
    "quant": dict(method="uniform", family="quant", bits=4),
    "powersgd_max": dict(method="powersgd", rank=48),
    "topk_max": dict(method="uniform", family="topk", density=1.0),
    "quant_max": dict(method="uniform", family="quant", bits=8),
    "lgreco_powersgd": dict(method="lgreco", rank=4, rank_candidates=[1, 2, 4, 8]),
    "lgreco_topk": dict(
        method="lgreco", family="topk", density=0.1, density_candidates=[0.02, 0.05, 0.1, 0.2]
    ),
    "lgreco_quant": dict(method="lgreco", family="quant", bits=4),
}
if not torch.cuda.is_available():  # torch's hook calls cuda.synchronize even for CPU tensors
    SCENARIOS["torch_powersgd"] = dict(method="torch_powersgd", rank=2)
LGRECO = dict(adjust_every=3, measure_steps=2)  # re-plans after steps 2, 5 and 8
EF_STEP = 4  # a compressed step whose error-feedback bookkeeping is recorded


class Spy:
    """Counts the bytes of every tensor this worker hands to a collective."""

    def __init__(self, rank):
        self.rank, self.bytes = rank, 0
        self.orig = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_single", "broadcast")}

    def __enter__(self):
        def counted(name, arg):
            def call(*args, **kwargs):
                t = args[arg]
                if name != "broadcast" or self.rank == 0:
                    self.bytes += t.numel() * t.element_size()
                return self.orig[name](*args, **kwargs)

            return call

        dist.all_reduce = counted("all_reduce", 0)
        dist.all_gather_single = counted("all_gather_single", 1)
        dist.broadcast = counted("broadcast", 0)
        return self

    def __exit__(self, *exc):
        for name, fn in self.orig.items():
            setattr(dist, name, fn)


def _run(rank: int, settings: dict) -> dict:
    torch.manual_seed(0)
    model = Net(with_empty=settings["method"] != "torch_powersgd")
    ddp = DDP(model, bucket_cap_mb=0.004)  # several buckets
    cfg = GradCompressionConfig(
        warmup_steps=WARMUP, min_numel=MIN_NUMEL, bucket_size=BUCKET, **LGRECO, **settings
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # powersgd_max clamps out.weight to rank 8 on purpose
        comm = build_communicator(cfg, ddp)
    layouts, ef = [], {}
    if comm is not None:
        comm.register(ddp)
        communicate = comm.communicate

        def watched(bucket):
            names = (
                [comm.names[id(p)] for p in bucket.parameters()] if hasattr(comm, "names") else []
            )
            layouts.append((step, names))
            if step == EF_STEP and hasattr(comm, "error"):
                raw = {n: g.reshape(-1).clone() for n, g in zip(names, bucket.gradients())}
                old = {n: comm.error[n].clone() for n in names if n in comm.error}
                fut = communicate(bucket)
                for n, g in zip(names, bucket.gradients()):
                    if n in old:
                        ef[n] = [raw[n] + old[n], comm.error[n].clone(), g.reshape(-1).clone()]
                return fut
            return communicate(bucket)

        comm.communicate = watched
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each worker sees its own data
    metrics, spied, layout_by_step = [], [], []
    for step in range(STEPS):
        x = torch.randn(32, 32, generator=gen)
        tokens = torch.randint(0, TOKENS, (32,), generator=gen)
        with Spy(rank) as spy:
            loss = nn.functional.mse_loss(ddp(x, tokens), torch.sin(x[:, :4]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if comm is not None:
                metrics.append(comm.end_step())
        spied.append(spy.bytes)
        layout_by_step.append([names for s, names in layouts if s == step])
        layouts.clear()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "metrics": metrics,
        "spied": spied,
        "layouts": layout_by_step,
        "ef": ef,
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _run(rank, settings) for name, settings in SCENARIOS.items()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gradcomp")
    # Spawned workers unpickle ``_worker`` by importing this module from the repository root.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).resolve().parents[3]))
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _uniform_bytes(family: str, value) -> int:
    """Bytes of one compressed step, from the shapes alone (independent of the code under test)."""
    total = 4 * FLAT_NUMEL
    for rows, cols in COMPRESSED.values():
        if family == "powersgd":
            total += 4 * (rows + cols) * min(value, rows, cols)
        elif family == "topk":
            total += 8 * math.ceil(value * rows * cols)
        else:
            total += 4 * math.ceil(rows * cols / BUCKET) * (value * BUCKET // 32 + 2)
    return total


# An L-GreCo re-plan also sends its error table (4 layers x (4 candidates + a 'measured' flag)
# as float64) and, from rank 0 only, the plan (4 int64 indices).
CONTROL_BYTES = {0: 8 * 4 * 5 + 8 * 4, 1: 8 * 4 * 5}


def test_replicas_stay_bit_identical(runs):
    """Data-parallel training is only correct if every worker applies the same update: each
    worker aggregates the same gathered payloads in the same order, so parameters must agree bit
    for bit after 8 steps (not merely to a tolerance), for every method and family."""
    for name in SCENARIOS:
        for a, b in zip(runs[0][name]["params"], runs[1][name]["params"]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "name, family, value",
    [
        ("powersgd", "powersgd", 2),
        ("topk", "topk", 0.1),
        ("quant", "quant", 4),
        pytest.param(
            "torch_powersgd",
            "powersgd",
            2,
            marks=pytest.mark.skipif(
                torch.cuda.is_available(),
                reason="torch's hook needs CUDA tensors on a CUDA machine",
            ),
        ),
        ("powersgd_max", "powersgd", 48),
    ],
)
def test_bytes_are_what_the_collectives_were_handed(runs, name, family, value):
    """The reported bytes must be the payloads really handed to torch.distributed (spied on), and
    those must be the compressed sizes the shapes imply: dense during warm-up, then P+Q, values +
    indices, or packed codes + bucket (min, scale), plus the flat part."""
    for rank in (0, 1):
        run = runs[rank][name]
        sent = [m["comm/bytes_sent"] for m in run["metrics"]]
        assert sent == run["spied"]
        expected = [DENSE_BYTES] * WARMUP + [_uniform_bytes(family, value)] * (STEPS - WARMUP)
        assert sent == expected
        assert all(m["comm/dense_bytes"] == DENSE_BYTES for m in run["metrics"])
        assert [m["comm/dense_phase"] for m in run["metrics"]] == [1.0] * WARMUP + [0.0] * (
            STEPS - WARMUP
        )


def test_ddp_regroups_buckets_and_state_follows_parameters(runs):
    """DDP's first iteration uses one bucket layout and later ones another; the run above only
    stays correct because state is keyed by parameter. Check the regrouping really happened."""
    layouts = runs[0]["powersgd"]["layouts"]
    assert layouts[0] != layouts[1]
    assert sorted(sum(layouts[0], [])) == sorted(sum(layouts[1], []))
    assert layouts[1:] == [layouts[1]] * (STEPS - 1)


def _check_own_share(family, value, layer, inp, res):
    """``inp - res`` must be this worker's own compressed message, not the all-worker mean."""
    share = inp - res
    rows, cols = COMPRESSED[layer]
    if family == "quant":  # every bucket holds at most 2**bits grid values (up to fp32 noise)
        for bucket in share.split(BUCKET):
            spread = bucket.max() - bucket.min()
            levels = torch.round((bucket - bucket.min()) / (spread * 1e-4 + 1e-30)).unique()
            assert levels.numel() <= 2**value, layer
        return
    # PowerSGD's share is an orthogonal projection of the input, top-k's a restriction of it:
    # either way the residual is orthogonal to the share.
    assert abs(float(share @ res)) <= 1e-5 * float(share.norm() * res.norm()) + 1e-12, layer
    if family == "topk":
        kept = share != 0
        assert int(kept.sum()) <= math.ceil(value * rows * cols), layer
        assert torch.equal(share[kept], inp[kept]) and not res[kept].any(), layer
    else:
        assert int((torch.linalg.svdvals(share.view(rows, cols)) > 1e-6).sum()) <= value, layer


@pytest.mark.parametrize(
    "name, family",
    [("powersgd", "powersgd"), ("topk", "topk"), ("quant", "quant"), ("lgreco_topk", "topk")],
)
def test_error_feedback_keeps_exactly_what_was_left_out(runs, name, family):
    """Error feedback must lose nothing: each worker's residual is its input minus its *own*
    compressed message (checked by that message's structure: a rank-r projection, k kept entries,
    or bucket grid values), and summed over workers the messages equal world x the mean every
    worker received. A residual taken against the mean (torch's variant), or one kept for the
    wrong layer, breaks one of these."""
    ef = [runs[rank][name]["ef"] for rank in (0, 1)]
    plan = runs[0][name]["metrics"][EF_STEP - 1]  # choices in force during EF_STEP
    assert set(ef[0]) == set(COMPRESSED)
    for layer in COMPRESSED:
        (in0, res0, mean0), (in1, res1, mean1) = ef[0][layer], ef[1][layer]
        assert torch.equal(mean0, mean1)
        sent = (in0 - res0) + (in1 - res1)
        assert torch.allclose(sent, 2 * mean0, rtol=1e-5, atol=1e-6 * in0.abs().max()), layer
        for inp, res in ((in0, res0), (in1, res1)):
            _check_own_share(family, plan[f"comm/choice/{layer}"], layer, inp, res)
    assert any(ef[0][layer][1].abs().sum() > 0 for layer in COMPRESSED)  # something was left out


@pytest.mark.parametrize(
    "name, atol", [("powersgd_max", 1e-5), ("topk_max", 0.0), ("quant_max", 1e-3)]
)
def test_compression_at_its_maximum_trains_like_dense(runs, name, atol):
    """Full rank and density 1 reconstruct the gradient (up to fp32 rounding) and 8 bits nearly
    so: after 8 steps with momentum the parameters must match dense DDP's."""
    assert set(runs[0][name]["metrics"][-1]) > {f"comm/choice/{n}" for n in COMPRESSED}
    for a, b in zip(runs[0][name]["params"], runs[0]["dense"]["params"]):
        assert torch.allclose(a, b, rtol=0, atol=atol), name


@pytest.mark.parametrize(
    "name, family, reference",
    [
        ("lgreco_powersgd", "powersgd", 4),
        ("lgreco_topk", "topk", 0.1),
        ("lgreco_quant", "quant", 4),
    ],
)
def test_lgreco_replans_identically_on_all_ranks_and_sends_no_more(runs, name, family, reference):
    """After the dense warm-up L-GreCo must move some layer off the uniform reference, every
    worker must hold the same plan at every step (rank 0 solves and broadcasts), and no
    compressed step may send more than uniform compression at the reference."""
    m0, m1 = runs[0][name]["metrics"], runs[1][name]["metrics"]
    plans = [{k: v for k, v in m.items() if k.startswith("comm/choice/")} for m in m0]
    assert plans == [{k: v for k, v in m.items() if k.startswith("comm/choice/")} for m in m1]
    changed = [p for p in plans[WARMUP - 1 :] if any(v != reference for v in p.values())]
    assert changed, plans
    uniform = _uniform_bytes(family, reference)
    for rank, metrics in enumerate((m0, m1)):
        for step in range(WARMUP, STEPS):
            replan = (step + 1 - WARMUP) % LGRECO["adjust_every"] == 0
            sent = metrics[step]["comm/bytes_sent"] - (CONTROL_BYTES[rank] if replan else 0)
            assert sent <= uniform, (rank, step)
            assert sent == runs[rank][name]["spied"][step] - (CONTROL_BYTES[rank] if replan else 0)
