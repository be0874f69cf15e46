"""`presso submit` against a real Ray head started with `ray start --head`, as a user would.

The head (``tests/ray_nodes.py``) runs with token authentication (Ray's default for
`ray start --head`), its own temp dir and its own ports, in its own session: the test stops only
that head, never `ray stop`, which would stop every Ray on the machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ..ray_nodes import RayNode
from .test_cli import TINY

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    """Started, not yet ready: it comes up while the MLflow server does."""
    head = RayNode(cpus=2)
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
