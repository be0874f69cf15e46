"""Real services for integration tests: a local Ray and an `mlflow server` on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class MlflowServer:
    """`mlflow server` with a sqlite store and proxied artifacts; stop()/start() for outages."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=log, stderr=log, start_new_session=True,
            # MLflow 3.17 also starts job-runner processes presso does not use: slower up and down
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        wait_http(f"{self.uri}/health")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray for the module's tests, shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield
    ray.shutdown()


# A model and run small enough for a Ray Train stage to take well under a minute on 2 cores.
TINY_TRAIN = [
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
]


@pytest.fixture
def train_stage(tmp_path, monkeypatch):
    """``train_stage(overrides, name, fault=None)`` runs the Ray Train stage of the quickstart job
    (on ``TINY_TRAIN`` plus ``overrides``) under ``tmp_path/name``; ``fault="RANK:STEP"`` kills that
    worker once. Returns the trained model folder and the stage's MLflow run."""
    from presso.orchestrator.config import load_config
    from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
    from presso.orchestrator.tracking import Tracking
    from presso.orchestrator.train import run_training

    works = load_works(None)
    corpus = build_corpus(works, split_works(works, ["hamlet"], ["macbeth"]), ByteTokenizer())

    def run(overrides, name="run", fault=None):
        out = tmp_path / name
        cfg = load_config(
            "jobs/quickstart.yaml", [*TINY_TRAIN, *overrides, f"run.output_dir={out}"]
        )
        tracking = Tracking(cfg)
        tracking.start()
        stage = tracking.stage("train")
        if fault:
            monkeypatch.setenv("PRESSO_INJECT_FAULT", fault)
        else:
            monkeypatch.delenv("PRESSO_INJECT_FAULT", raising=False)
        return run_training(cfg, corpus, ByteTokenizer.vocab_size, None, stage, out), stage

    return run
