"""The MLflow server of k8s/mlflow, started here as its Deployment starts it: basic auth on, its
settings from the ConfigMap, its admin and CSRF key from the environment (the Secret's keys).

A manifest cannot be run without a cluster, but its command and settings can: this shows that
the server starts from them, that /health (the probes') answers without credentials while the
API refuses anyone without a password, and that the user a team creates for its pipelines (the
steps k8s/README.md gives) can log runs.
"""

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ..conftest import BIN, free_port, wait_http

pytestmark = pytest.mark.integration

K8S = Path(__file__).resolve().parents[2] / "k8s" / "mlflow"
ADMIN = ("admin", "admin-password-for-tests")
PIPELINE = ("presso", "pipeline-password-for-tests")


def _manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Deployment's container, with /mlflow (its volume) and /etc/mlflow-auth (the
    ConfigMap) mapped to folders here, and the Secret's keys as variables."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    (container,) = _manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    ini = _manifest("auth-config.yaml")["data"]["basic_auth.ini"]
    (root / "basic_auth.ini").write_text(ini.replace("////mlflow/", f"///{root}/"))
    port = free_port()
    command = [
        a.replace("/mlflow/", f"{root}/").replace("0.0.0.0", "127.0.0.1").replace("5000", str(port))
        for a in container["command"]
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(root / "basic_auth.ini")
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] += f",127.0.0.1:{port}"
    secret = {
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",
    }
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(
        [str(BIN / command[0]), *command[1:]],
        env={**os.environ, **env, **secret, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _call(uri: str, path: str, user=None, body=None) -> int:
    request = urllib.request.Request(
        f"{uri}{path}", data=json.dumps(body).encode() if body else None
    )
    request.add_header("Content-Type", "application/json")
    if user:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_health_is_open_and_the_api_is_not(server):
    assert _call(server, "/health") == 200  # the Deployment's probes send no credentials
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _call(server, search) == 401
    assert _call(server, search, (ADMIN[0], "wrong")) == 401
    assert _call(server, search, ADMIN) == 200


def test_a_pipeline_user_created_by_the_admin_logs_runs(server, monkeypatch):
    """The README's steps: the admin creates a user for the pipelines; presso's jobs log with
    that user's MLFLOW_TRACKING_USERNAME / _PASSWORD (the Secret presso-mlflow-auth)."""
    created = _call(
        server,
        "/api/2.0/mlflow/users/create",
        ADMIN,
        {"username": PIPELINE[0], "password": PIPELINE[1]},
    )
    assert created == 200
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE[1])
    client = MlflowClient(tracking_uri=server)
    experiment = client.create_experiment("nightly")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "ppl", 9.23)
    assert client.get_run(run.info.run_id).data.metrics == {"ppl": 9.23}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(tracking_uri=server).get_run(run.info.run_id)
