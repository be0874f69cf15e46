"""A real `mlflow server` stopped in the middle of training: the run must still finish, say
where the spool is, and `presso mlflow sync` against the restarted server must leave MLflow
holding exactly what the run logged — no metric lost, none doubled, the model registered."""

import json
import os
import subprocess
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from presso.orchestrator.model_registry import CANDIDATE, CHAMPION, PPL_TAG
from presso.orchestrator.spool import Spool, find_spools

from . import common

pytestmark = pytest.mark.integration

PRESSO = common.PRESSO
NAME = "outage-test"
STEPS, EVAL_EVERY = 150, 50  # the worker logs every 10 steps: ~140 steps left after the stop
TINY = [
    *common.TINY,
    f"train.steps={STEPS}",
    f"train.eval_every={EVAL_EVERY}",
    f"train.checkpoint_every={STEPS}",
    f"run.name={NAME}",
]


def train_metrics_arrived(client: MlflowClient) -> bool:
    try:
        experiment = client.get_experiment_by_name(NAME)
        if experiment is None:
            return False
        runs = client.search_runs([experiment.experiment_id], "tags.`presso.stage` = 'train'")
        return bool(runs and runs[0].data.metrics)
    except Exception:  # the server may be busy: ask again
        return False


def stop_once_training_logs(server, stopped: threading.Event, deadline: float) -> None:
    """Stop the server as soon as the train stage's first metrics reach it."""
    client = MlflowClient(server.uri)
    while time.monotonic() < deadline:
        if train_metrics_arrived(client):
            stopped.set()  # first: stop() may time out waiting for the server's job
            server.stop()  # consumers when its port is already closed
            return
        time.sleep(0.2)


def presso(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PRESSO, *args], env=env, capture_output=True, text=True, timeout=600)


def test_server_stopped_mid_run_loses_nothing(mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    env.pop("RAY_ADDRESS", None)
    stopped = threading.Event()
    monitor = threading.Thread(
        target=stop_once_training_logs,
        args=(mlflow_server, stopped, time.monotonic() + 500),
        daemon=True,
    )
    monitor.start()
    try:
        run = presso("run", "jobs/quickstart.yaml", *TINY, f"run.output_dir={tmp_path}", env=env)
        monitor.join(timeout=5)
        assert stopped.is_set(), f"the server was never stopped: {run.stderr[-3000:]}"
        assert run.returncode == 0, run.stderr[-3000:]

        (spool_dir,) = find_spools(tmp_path)
        spool = Spool(spool_dir)
        pending = len(spool.pending())
        assert f"{pending} records wait in {spool_dir}" in run.stderr
        assert f"presso mlflow sync {spool_dir}" in run.stderr
        assert "registered: outage-test-compressed version spooled" in run.stdout
        summary = json.loads((tmp_path / NAME / "summary.json").read_text())

        train_ids = {  # only the Ray worker logs train/loss
            r["run"]
            for r in spool.pending()
            if r["kind"] == "metrics" and any(m[0] == "train/loss" for m in r["metrics"])
        }
        assert len(train_ids) == 1, "the worker spooled nothing: training outran the stop"
        (train_id,) = train_ids
        logged = {  # what the run logged: what MLflow took, and what waits in the spool
            key: spool.metric_history(train_id, key, sent=True)
            for key in ("train/loss", "val/loss")
        }
        assert [s for s, _ in sorted(logged["train/loss"])] == list(range(1, STEPS + 1))
        assert [s for s, _ in sorted(logged["val/loss"])] == list(range(0, STEPS + 1, EVAL_EVERY))
        # the summary's history is whole although MLflow went away in the middle of it
        assert summary["val_loss_start"] == sorted(logged["val/loss"])[0][1]
        assert summary["val_loss"] == sorted(logged["val/loss"])[-1][1]

        mlflow_server.start()  # the same store: a server back after an outage
        synced = presso("mlflow", "sync", str(tmp_path), env=env)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert f"replayed {pending} spooled records" in synced.stdout
        assert f"registered {NAME}-compressed version 1, now {CHAMPION}" in synced.stdout
        again = presso("mlflow", "sync", str(tmp_path), env=env)
        assert "nothing to replay" in again.stdout
    finally:
        if mlflow_server.proc.poll() is not None:
            mlflow_server.start()

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {r.data.tags["presso.stage"]: r for r in runs if r is not parent}
    assert set(stages) == {"train", "compress", "eval", "register"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    assert stages["train"].info.run_id == train_id

    for key, points in logged.items():
        history = client.get_metric_history(train_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted(points), key

    assert parent.data.params["train.steps"] == str(STEPS)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "config.yaml",
        "summary.json",
    }
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(train_id, "plots")}
    compress = stages["compress"].info.run_id
    assert "layers.json" in {a.path for a in client.list_artifacts(compress)}
    assert stages["eval"].data.metrics["eval/compressed_ppl"] == summary["compressed_ppl"]

    version = client.get_model_version_by_alias(f"{NAME}-compressed", CHAMPION)
    assert version.run_id == stages["register"].info.run_id
    assert float(version.tags[PPL_TAG]) == summary["compressed_ppl"]
    assert client.get_model_version_by_alias(f"{NAME}-compressed", CANDIDATE).version == (
        version.version
    )
