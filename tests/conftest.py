"""Shared test settings and fixtures: quiet telemetry, CUDA-only tests skipped without CUDA, tiny
models, and the real services integration and fault tests start (a local Ray, an `mlflow server`
on 127.0.0.1)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Triton's own jit helpers (tl.cdiv, ...) are built when triton.language is first imported,
    # in the mode TRITON_INTERPRET has then. Other tests import it indirectly (torch, DeepSpeed)
    # before the kernel tests run, so build it for the interpreter now, once; the kernel tests
    # set the variable per test, and everything else keeps the torch references.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401

    del os.environ["TRITON_INTERPRET"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _make_llama(vocab_size=96, num_layers=2, hidden_size=64, kv_heads=2, tied=True, seed=0):
    """A tiny Llama (4 heads, MLP width 128) in eval mode, its weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def make_llama():
    """The one tiny-Llama factory of the tests (keyword arguments: vocab_size, num_layers,
    hidden_size, kv_heads, tied, seed)."""
    return _make_llama


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama small enough for exact checks in milliseconds."""
    return _make_llama()


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


class S3Server:
    """moto's S3-compatible server (`moto_server`, from PyPI): a real HTTP S3 endpoint that
    pyarrow, Ray Train and presso reach through AWS_ENDPOINT_URL, as they would MinIO or S3."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "presso-test",
            "AWS_SECRET_ACCESS_KEY": "presso-test",
            "AWS_REGION": "us-east-1",
        }
        log = open(root / "moto.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        wait_http(f"{self.endpoint}/moto-api/", timeout=60)

    def bucket(self, name: str) -> str:
        """Create the bucket ``name``; returns its URI."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process talks to the test's S3 server (and the Ray workers it starts inherit it)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
