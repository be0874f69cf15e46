"""Training engines: what one data-parallel worker does with a loss.

``DDPEngine`` wraps the model in DistributedDataParallel, builds the optimizer from
``train.optimizer`` and, when ``train.grad_compression`` asks for it, registers a communicator
(L-GreCo / PowerSGD / top-k / quantization, torch's PowerSGD, or GaLore's projected all-reduce) as
DDP's comm hook. ``DeepSpeedEngine`` hands the model and a torch AdamW to DeepSpeed ZeRO (1 or 2).
Both expose the same four calls to the training loop.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from presso import IntegrityError
from presso.compressors.gradient import Method, build_communicator
from presso.compressors.optim import build_galore_communicator, build_optimizer, state_bytes
from presso.orchestrator.config import TrainConfig

CLIP_NORM = 1.0


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _load_model_state(model: torch.nn.Module, state: dict) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise IntegrityError(
            f"checkpoint does not fit this model ({first}); it was written by a different model "
            "config — point run.output_dir elsewhere or remove the old checkpoints"
        ) from None


class DDPEngine:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        ids = [device.index] if device.type == "cuda" else None
        # Llama's buffers (rotary frequencies) are constants: broadcasting them every forward
        # would be traffic no accounting sees (they are synced once, at init).
        self.ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        self.skipped = 0
        self.optimizer = build_optimizer(cfg.optimizer, model)
        gc = cfg.grad_compression
        if gc.method is Method.galore:
            self.comm = build_galore_communicator(self.optimizer, self.ddp)
        else:
            self.comm = build_communicator(gc, self.ddp)
        if self.comm is not None:
            self.comm.register(self.ddp)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ddp(ids).logits

    def step(self, loss: torch.Tensor, lr: float) -> dict[str, float]:
        """Backward (DDP exchanges gradients), clip, update; the step's communication metrics.

        A non-finite averaged gradient (the same on every rank) skips the update, with a warning,
        instead of writing NaN into the weights and the optimizer state."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        if torch.isfinite(norm):
            _set_lr(self.optimizer, lr)
            self.optimizer.step()
        else:
            self.skipped += 1
            warnings.warn(f"non-finite gradient norm ({norm.item()}); update skipped", stacklevel=2)
        metrics = self.comm.end_step() if self.comm is not None else {}
        return {**metrics, "train/skipped_steps": float(self.skipped)}

    def choices(self) -> dict[str, float]:
        """Per-layer compression parameter in force (rank, density or bits), if compressing."""
        return self.comm.choices() if self.comm is not None else {}

    def optimizer_state_bytes(self) -> int:
        return state_bytes(self.optimizer)

    def save(self, folder: Path) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.comm is not None:
            state["comm"] = self.comm.state_dict()
        torch.save(state, folder / "engine.pt")

    def load(self, folders: list[Path], rank: int) -> None:
        state = torch.load(folders[rank] / "engine.pt", weights_only=True)
        _load_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.comm is not None:
            self.comm.load_state_dict(state["comm"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO inside the Ray Train worker, over the process group Ray Train set up.

    A torch AdamW is passed in (DeepSpeed's own ``"optimizer"`` entry would compile fused_adam).
    On CPUs DeepSpeed's shared-memory all-reduce op would first be compiled (minutes); presso
    trains over gloo like the rest of its CPU paths, so that op is not built there.
    """

    TAG = "ds"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        if device.type != "cuda":
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.model = model
        o = cfg.optimizer
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": CLIP_NORM,
            "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
            "steps_per_print": 10**9,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.engine(ids).logits

    def step(self, loss: torch.Tensor, lr: float) -> dict[str, float]:
        self.engine.backward(loss)
        _set_lr(self.optimizer, lr)
        self.engine.step()
        return {}

    def choices(self) -> dict[str, float]:
        return {}

    def optimizer_state_bytes(self) -> int:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return state_bytes(inner)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=self.TAG)

    def load(self, folders: list[Path], rank: int) -> None:
        # Each rank saved its own shard into its own folder; DeepSpeed reads them from one.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / self.TAG).mkdir()
            for folder in folders:
                for f in (folder / self.TAG).iterdir():
                    dest = Path(tmp) / self.TAG / f.name
                    if not dest.exists():
                        dest.symlink_to(f)
            path, _ = self.engine.load_checkpoint(tmp, tag=self.TAG)
        if path is None:
            raise IntegrityError("DeepSpeed found no usable state in the checkpoint")


def build_engine(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    return (DeepSpeedEngine if cfg.engine == "deepspeed" else DDPEngine)(model, cfg, device)
