"""`presso submit` against a real Ray head started with `ray start --head`, as a user would.

The head runs with token authentication (Ray's default for `ray start --head`), its own temp dir
and its own ports, in its own session: the test stops only that head, never `ray stop`, which
would stop every Ray on the machine.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from .test_cli import TINY

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open until every port is chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class RayHead:
    def __init__(self) -> None:
        self.token = secrets.token_hex(32)
        # Short path: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
        self.temp = tempfile.mkdtemp(prefix="presso-head-")
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        self.gcs = f"127.0.0.1:{ports['--port']}"  # what RAY_ADDRESS names to join it
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # jobs run `presso` from the head's PATH
        env.pop("RAY_ADDRESS", None)
        self.log = Path(self.temp) / "head.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                "--temp-dir", self.temp, "--disable-usage-stats",
                *(str(x) for item in ports.items() for x in item),
            ],
            env=env, cwd=self.temp, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.address}/api/version", headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray dashboard at {self.address} did not answer in {timeout}s")

    def stop(self) -> None:
        """SIGTERM to `ray start --block` drains and stops its processes; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """Started, not yet ready: it comes up while the MLflow server does."""
    head = RayHead()
    yield head
    head.stop()


def _client_env(**extra: str) -> dict[str, str]:
    """The submitting user's environment: no auth settings of their own unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, **extra}


@pytest.mark.integration
def test_submitted_job_succeeds_and_is_tracked(ray_head, mlflow_server, tmp_path):
    """The whole path a cluster user takes: validate, upload, run remotely, track, report."""
    ray_head.wait_ready()
    args = [*TINY, "run.name=submit-test", f"run.output_dir={tmp_path}"]
    proc = subprocess.run(
        [
            str(BIN / "presso"), "submit", "jobs/quickstart.yaml", *args,
            "--address", ray_head.address, "--working-dir", str(REPO), "--follow",
            "--tracking", mlflow_server.uri,
        ],
        env=_client_env(RAY_AUTH_TOKEN=ray_head.token), cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submission_id = proc.stdout.splitlines()[0]
    assert submission_id.startswith("raysubmit_")
    assert "registered: submit-test-compressed" in proc.stdout  # the job's own logs, streamed
    assert f"job {submission_id} SUCCEEDED" in proc.stderr

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("submit-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["ray.submission_id"] == submission_id
    assert parent.info.status == "FINISHED"
    assert {r.data.tags.get("presso.stage") for r in runs} >= {"train", "compress", "eval"}


@pytest.mark.integration
def test_missing_token_is_one_clear_line(ray_head, tmp_path):
    """Without the head's token the user is told where presso looks for one, not a traceback."""
    ray_head.wait_ready()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("another cluster's token")
    argv = ["submit", "jobs/quickstart.yaml", "--address", ray_head.address]
    argv += ["--tracking", "http://127.0.0.1:5000"]  # the head is on this machine too
    for env in (
        _client_env(HOME=str(tmp_path)),  # ~/.ray/auth_token is not read by itself
        _client_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-token")),
    ):
        proc = subprocess.run(
            [str(BIN / "presso"), *argv],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0], proc.stderr


JOIN = "from presso.orchestrator.config import load_config; from presso.orchestrator.cluster import ensure_ray; import ray; ensure_ray(load_config(None)); print(int(ray.cluster_resources()['CPU']))"


@pytest.mark.integration
def test_run_joins_a_token_head_with_the_token_alone(ray_head, tmp_path):
    """`RAY_ADDRESS=... presso run` against a `ray start --head` head: the token is enough (presso
    turns Ray's token mode on), and without it the error names the missing piece at once."""
    ray_head.wait_ready()
    # HOME elsewhere: no ~/.ray/auth_token to fall back on; the corpus from the usual cache
    cache = os.environ.get("PRESSO_CACHE") or str(Path.home() / ".cache" / "presso")
    base = _client_env(RAY_ADDRESS=ray_head.gcs, HOME=str(tmp_path), PRESSO_CACHE=cache)
    joined = subprocess.run(
        [sys.executable, "-c", JOIN], env={**base, "RAY_AUTH_TOKEN": ray_head.token},
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert joined.stdout.split()[-1] == "2"
    refused = subprocess.run(
        [str(BIN / "presso"), "run", str(REPO / "jobs/quickstart.yaml")],
        env=base, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert refused.returncode == 1
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("presso: error:")]
    assert f"could not join the Ray cluster at {ray_head.gcs}" in line
    assert "RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line
