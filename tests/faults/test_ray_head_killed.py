"""The Ray head dies (SIGKILL, as a lost node would) under a job that ``presso submit --follow``
is following: the client must say it lost the cluster, within ``--lost-after`` seconds, and exit
non-zero — not hang on a log stream or status request that will never answer."""

import os
import signal
import subprocess
import time

import pytest

from ..integration.test_submit import _client_env
from ..ray_nodes import RayNode
from .common import PRESSO, REPO, TINY, error_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LOST_AFTER = 10


def test_head_killed_under_a_followed_job(mlflow_server, tmp_path):
    head = RayNode(cpus=2)
    try:
        head.wait_ready()
        args = [*TINY, "train.steps=100000", "run.name=head-killed", f"run.output_dir={tmp_path}"]
        proc = subprocess.Popen(
            [
                PRESSO, "submit", "jobs/quickstart.yaml", *args, "--address", head.address,
                "--working-dir", str(REPO), "--follow", "--lost-after", str(LOST_AFTER),
                "--env", f"MLFLOW_TRACKING_URI={mlflow_server.uri}",
            ],
            env=_client_env(RAY_AUTH_TOKEN=head.token), cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        for line in proc.stdout:  # the job's own logs: training has started on the cluster
            if "presso: step" in line:
                break
        killed = time.monotonic()
        os.killpg(head.proc.pid, signal.SIGKILL)  # the head, its GCS, raylet and dashboard
        out, err = proc.communicate(timeout=LOST_AFTER + 60)
        took = time.monotonic() - killed
    finally:
        head.stop()
    assert proc.returncode == 1, err[-3000:]
    assert "lost the Ray cluster at" in error_line(err) and "--lost-after" in error_line(err)
    assert took < LOST_AFTER + 30, f"{took:.0f} s to notice"
