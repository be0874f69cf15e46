"""Shared driver of the training benchmarks: run presso's train stage once per row and read back
what rank 0 logged.

One local Ray and one temporary MLflow store (sqlite) serve a whole benchmark; the corpus is read
and tokenized once. Each row is ``run_training`` on a job file plus dotlist overrides, exactly what
``presso run`` would train, so the numbers are those of the real stage (Ray Train workers, DDP over
gloo, the comm hooks' own byte counts). Rows run one after another; nothing else of presso runs
meanwhile, but other processes on the machine may: the load average is recorded for every row.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The second text domain of the compression benchmarks: legal English, never calibrated or
# tuned on (Debian and Ubuntu ship it; missing elsewhere, and then its columns are skipped).
LICENSES = Path("/usr/share/common-licenses")

# Everything rank 0 logs per step or per evaluation that a benchmark reads.
KEYS = (
    "train/loss",
    "val/loss",
    "train/tokens_per_s",
    "train/optimizer_state_bytes",
    "train/peak_rss_mb",
    "train/replicas_identical",
    "comm/bytes_sent",
    "comm/bytes_all_gather",
    "comm/bytes_broadcast",
    "comm/dense_bytes",
    "comm/dense_phase",
    "comm/refreshed_layers",
)


@dataclass
class TrainRun:
    """One row's training: metric histories as ``{key: [(step, value), ...]}`` and timings."""

    label: str
    history: dict[str, list[tuple[int, float]]]
    wall_s: float  # run_training end to end: worker start, training, checkpoints, model copy
    tokens_per_step: int  # tokens all workers consume in one step
    dense_bytes: int  # fp32 gradient bytes of the model: what plain DDP all-reduces per step
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after the row
    overrides: list[str] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        return self.history.get(key, [])

    def final(self, key: str) -> float:
        points = self.series(key)
        if not points:
            raise KeyError(f"{self.label}: nothing logged for {key}")
        return points[-1][1]

    def step_seconds(self, after: int = 0) -> list[float]:
        """Wall seconds of each step numbered above ``after`` (forward, backward with the
        gradient exchange, optimizer), from rank 0's tokens/s."""
        return [self.tokens_per_step / v for s, v in self.series("train/tokens_per_s") if s > after]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def noise_floor(name: str, loss: float, loss_spread: float | None) -> str:
    """The line that says how far apart seeds of the reference row landed."""
    if loss_spread is None:
        return f"noise floor: not measured ({name} ran one seed)"
    return f"noise floor: {name} val loss {loss:.4f} ± {100 * loss_spread / loss:.2f}% over seeds"


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (ties broken by order: none expected among measured floats)."""
    import torch

    ranks = torch.stack([torch.tensor(v).argsort().argsort().double() for v in (a, b)])
    return float(torch.corrcoef(ranks)[0, 1])


def spread(values: list[float]) -> float | None:
    """Half the range of repeated measurements (seeds, calibration draws): the ± the benchmarks
    print; None for a single value, which has none."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else None


class Log:
    """Lines printed as they come and kept for the results' ``.txt`` beside the JSON."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


def format_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> str:
    """Rows as aligned text; ``columns`` lists ``(field, header, width, format)``."""
    lines = ["  ".join(head.rjust(width) for _, head, width, _ in columns)]
    for row in rows:  # None: not measured (e.g. the spread of a single seed)
        lines.append(
            "  ".join(
                ("—" if row[k] is None else fmt.format(row[k])).rjust(width)
                for k, _, width, fmt in columns
            )
        )
    return "\n".join(lines)


def load_average() -> float:
    return os.getloadavg()[0]


def second_domain(tokenizer):
    """The licence texts as one token tensor, or None where the folder is missing."""
    import torch

    if not LICENSES.is_dir():
        return None
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(LICENSES.iterdir()))
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


class Bench:
    """Runs the train stage for benchmark rows that share a job file and base overrides.

    Use as a context manager: it starts a local Ray (``cpus`` CPUs) and a temporary folder for
    checkpoints and the MLflow store, and removes both on exit.
    """

    def __init__(self, job: str, base: list[str], cpus: int = 2) -> None:
        self.job, self.base, self.cpus = str(ROOT / job), list(base), cpus

    def __enter__(self) -> Bench:
        from presso.orchestrator.pipeline import quiet_environment

        quiet_environment()
        import ray

        from presso.orchestrator.pipeline import preflight
        from presso.orchestrator.tracking import Tracking

        self._tmp = tempfile.TemporaryDirectory(prefix="presso-bench-")
        self.out = Path(self._tmp.name)
        cfg = self.config([])
        self.plan = preflight(cfg, ("train",))  # corpus, tokenizer and model source, once
        self.tracking = Tracking(cfg)
        self.tracking.start()
        # Workers' output stays in Ray's logs: Ray Train echoes every reported metric dict.
        ray.init(
            num_cpus=self.cpus,
            include_dashboard=True,  # Ray Train's state API needs it
            logging_level="WARNING",
            log_to_driver=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self.tracking.parent.finish(exc[0] is None)
        self._tmp.cleanup()

    def config(self, overrides: list[str]):
        from presso.orchestrator.config import load_config

        fixed = [
            f"run.output_dir={self.out}",
            f"tracking.uri=sqlite:///{self.out / 'mlflow.db'}",
        ]
        return load_config(self.job, [*self.base, *overrides, *fixed])

    def model(self, cfg):
        """A fresh copy of the model every row of ``cfg`` starts from."""
        from presso.orchestrator.models import build_scratch, load_pretrained

        if self.plan.source is None:
            return build_scratch(
                cfg.model.scratch, self.plan.vocab_size, cfg.train.seq_len, cfg.run.seed
            )
        return load_pretrained(self.plan.source)[0]

    def dense_bytes(self, cfg) -> int:
        """Bytes of the model's trainable parameters in fp32 (tied weights once): what one dense
        all-reduce of all gradients hands over."""
        return sum(p.numel() * 4 for p in self.model(cfg).parameters() if p.requires_grad)

    def run(self, label: str, overrides: list[str]) -> TrainRun:
        """Train one row and return its histories. Raises if the replicas ended up different."""
        from presso.orchestrator.train import run_training

        cfg = self.config(overrides)
        logger = self.tracking.stage(label)
        before = load_average()
        tick = time.perf_counter()
        run_training(
            cfg, self.plan.corpus, self.plan.vocab_size, self.plan.source, logger, self.out / label
        )
        wall = time.perf_counter() - tick
        logger.finish()
        shutil.rmtree(self.out / label, ignore_errors=True)  # checkpoints and model: not needed
        t = cfg.train
        result = TrainRun(
            label=label,
            history={key: logger.history(key) for key in KEYS},
            wall_s=wall,
            tokens_per_step=t.batch_size * t.seq_len * t.workers,
            dense_bytes=self.dense_bytes(cfg),
            load=(before, load_average()),
            overrides=list(overrides),
        )
        if result.final("train/replicas_identical") != 1.0:
            raise RuntimeError(f"{label}: the workers' replicas differ after training")
        return result
