"""The communicator on CUDA with NCCL (a world of one): every family runs without leaving the
device, counts the same bytes as on the CPU, and PowerSGD / top-k train like their CPU runs."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from presso.compressors.gradient import GradCompressionConfig, build_communicator

pytestmark = pytest.mark.gpu
STEPS, WARMUP = 6, 2


@pytest.fixture(scope="module", autouse=True)
def nccl_world_of_one():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    gloo = dist.new_group(backend="gloo")  # the CPU twin of each run
    yield gloo
    dist.destroy_process_group()


def _train(device, group, settings, poison_step=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8)
    )
    model = model.to(device)
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.01)
    cfg = GradCompressionConfig(warmup_steps=WARMUP, min_numel=64, bucket_size=64, **settings)
    comm = build_communicator(cfg, ddp, process_group=group)
    comm.register(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    metrics, snapshot = [], None
    for step in range(STEPS):
        x = torch.randn(64, 32, generator=gen).to(device)
        if step == poison_step:
            x[0, 0] = float("nan")
            snapshot = {n: t.clone() for n, t in comm.error.items()}
        loss = nn.functional.mse_loss(ddp(x), torch.sin(x[:, :8]))
        opt.zero_grad()
        loss.backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        if step == poison_step:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                metrics.append(comm.end_step())
            assert all(torch.equal(snapshot[n], comm.error[n]) for n in snapshot)
        else:
            metrics.append(comm.end_step())
    return model, comm, metrics


@pytest.mark.parametrize(
    "settings, atol",
    [
        (dict(method="powersgd", rank=4), 1e-4),
        (dict(method="uniform", family="topk", density=0.05), 1e-5),
        (dict(method="uniform", family="quant", bits=4), None),  # different random streams
        (dict(method="lgreco", family="quant", bits=4, adjust_every=2, measure_steps=1), None),
        (dict(method="lgreco", family="powersgd", rank=2, rank_candidates=[1, 2, 4, 8]), None),
    ],
    ids=["powersgd", "topk", "quant", "lgreco_quant", "lgreco_powersgd"],
)
def test_cuda_matches_cpu(nccl_world_of_one, settings, atol):
    """Same bytes per step as the CPU run; state on the GPU, checkpoints on the CPU; for the
    deterministic families the trained parameters agree with the CPU run to fp32 tolerance."""
    cuda_model, comm, metrics = _train("cuda", None, settings)
    cpu_model, _, cpu_metrics = _train("cpu", nccl_world_of_one, settings)
    assert [m["comm/bytes_sent"] for m in metrics] == [m["comm/bytes_sent"] for m in cpu_metrics]
    assert metrics[-1]["comm/bytes_sent"] < metrics[0]["comm/bytes_sent"]
    state = comm.state_dict()
    tensors = [t for key in ("error", "q") for t in state[key].values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert all(t.is_cuda for t in comm.error.values())
    comm.load_state_dict(state)
    assert all(t.is_cuda for t in [*comm.error.values(), *comm.q.values()])
    for a, b in zip(cuda_model.parameters(), cpu_model.parameters()):
        assert torch.isfinite(a).all()
        if atol is not None:
            assert torch.allclose(a.cpu(), b, rtol=0, atol=atol)


def test_nan_step_on_cuda_leaves_error_feedback_untouched():
    """The NaN guard works without host syncs in the hook; its single warning comes at end_step."""
    _, comm, _ = _train("cuda", None, dict(method="powersgd", rank=2), poison_step=4)
    assert all(torch.isfinite(t).all() for t in comm.error.values())
    assert math.isfinite(sum(float(t.sum()) for t in comm.q.values()))


def test_torch_powersgd_on_cuda():
    """The peer baseline runs on CUDA and its analytic byte count follows torch's own rule:
    compress a matrix iff ``(rows + cols) x rank x 2 < rows x cols`` (so the 8 x 48 layer goes
    dense at rank 4). torch's hook calls ``torch.cuda.synchronize`` on CPU tensors too, so on a
    CUDA machine it cannot train a CPU model: no CPU twin here."""
    model, comm, metrics = _train("cuda", None, dict(method="torch_powersgd", rank=4))
    dense = 4 * (64 * 32 + 48 * 64 + 8 * 48 + 64 + 48 + 8)
    compressed = 4 * ((64 + 32) * 4 + (48 + 64) * 4 + 8 * 48 + 64 + 48 + 8)
    expected = [dense] * WARMUP + [compressed] * (STEPS - WARMUP)
    assert [m["comm/bytes_sent"] for m in metrics] == expected
    assert all(torch.isfinite(p).all() for p in model.parameters())
    comm.load_state_dict(comm.state_dict())
    assert comm.pieces and all(e.is_cuda for e, _ in comm.pieces.values())
