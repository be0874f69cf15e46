"""GaLore's projected all-reduce on 2 gloo workers: same parameters as GaLore on dense DDP, and
between refreshes only ``P^T G`` (plus the small dense tensors) goes over the wire."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from presso import UnsupportedError
from presso.compressors.optim import GaLoreAdamW, GradNormLoRP, build_galore_communicator

RANK, GAP, STEPS = 4, 3, 8
D_IN, D_HIDDEN = 64, 32


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 32 x 64 weight: left projection (r x 64); 64 x 32 weight: right projection (64 x r).
    return nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_IN))


def _train(rank: int, with_hook: bool) -> tuple[list[torch.Tensor], list[dict]]:
    model = _model()
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    opt = GaLoreAdamW(
        [{"params": weights}, {"params": biases, "low_rank": False}],
        lr=1e-2, rank=RANK, update_proj_gap=GAP, scale=1.0, weight_decay=0.01,
    )  # fmt: skip
    ddp = DDP(model)
    comm = None
    if with_hook:
        comm = build_galore_communicator(opt, ddp)
        comm.register(ddp)
    gen = torch.Generator().manual_seed(100 + rank)  # each worker sees its own data
    metrics = []
    for _ in range(STEPS):
        x = torch.randn(16, D_IN, generator=gen)
        loss = nn.functional.mse_loss(ddp(x), torch.sin(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if comm is not None:
            metrics.append(comm.end_step())
    return [p.detach().clone() for p in model.parameters()], metrics


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dense, _ = _train(rank, with_hook=False)
        hooked, metrics = _train(rank, with_hook=True)
        torch.save({"dense": dense, "hooked": hooked, "metrics": metrics}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("galore_comm")
    # Spawned workers unpickle ``_worker`` by importing this module from the repository root.
    with pytest.MonkeyPatch.context() as mp_patch:
        mp_patch.syspath_prepend(str(Path(__file__).resolve().parents[3]))
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_matches_galore_on_dense_ddp(runs):
    """Projection is linear, so all-reducing ``P^T G`` must leave every worker with the
    parameters GaLore reaches on dense DDP, across two subspace refreshes, to fp32 rounding."""
    for run in runs:
        for dense, hooked in zip(run["dense"], run["hooked"]):
            torch.testing.assert_close(hooked, dense, rtol=0, atol=1e-5)
    diff = max((a - b).abs().max().item() for a, b in zip(runs[0]["dense"], runs[0]["hooked"]))
    print(f"max |hooked - dense| after {STEPS} steps: {diff:.2e}")
    for a, b in zip(runs[0]["hooked"], runs[1]["hooked"]):
        assert torch.equal(a, b)  # the workers stay in lockstep


def test_bytes_between_refreshes(runs):
    """Between refreshes each worker sends r x n per weight instead of m x n: at most
    r / min(m, n) + eps of the dense bytes, eps being the biases. At a refresh it sends the whole
    bucket, and rank 0 also the projectors it broadcasts."""
    dense_bytes = 4 * (2 * D_IN * D_HIDDEN + D_IN + D_HIDDEN)
    projected = 4 * (RANK * D_IN + D_IN * RANK + D_IN + D_HIDDEN)
    projectors = 4 * (D_HIDDEN * RANK + D_HIDDEN * RANK)  # 32 x r (left), 32 x r (right)
    for rank, run in enumerate(runs):
        for step, m in enumerate(run["metrics"]):
            assert m["comm/dense_bytes"] == dense_bytes
            if step % GAP == 0:
                assert m["comm/bytes_sent"] == dense_bytes + (projectors if rank == 0 else 0)
                assert m["comm/refreshed_layers"] == 2
            else:
                assert m["comm/bytes_sent"] == projected
                assert m["comm/bytes_sent"] <= (RANK / D_HIDDEN + 0.03) * dense_bytes
                assert m["comm/refreshed_layers"] == 0
            assert m["comm/choice/0.weight"] == RANK and m["comm/choice/2.weight"] == RANK
    ratio = runs[0]["metrics"][1]
    print(f"between refreshes: {ratio['comm/bytes_sent']:.0f} of {dense_bytes} B")


def test_refuses_optimizers_that_read_the_whole_gradient():
    """GradNormLoRP (and AdamW) need more than ``P^T G``: the hook must refuse them rather than
    silently train a different model."""
    model = nn.Linear(4, 4)
    for opt in (GradNormLoRP(model.parameters()), torch.optim.AdamW(model.parameters())):
        with pytest.raises(UnsupportedError, match="grad_compression.method=galore"):
            build_galore_communicator(opt, model)
