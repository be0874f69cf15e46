"""The MLflow outage spool: a run whose server is away still logs everything, and replay
puts exactly that — no more, no less — into MLflow, with offline placeholder ids made real."""

import json
import math
import pickle
import shutil
import socket

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from presso.orchestrator import delivery
from presso.orchestrator.config import PressoConfig
from presso.orchestrator.delivery import Link, sync_all
from presso.orchestrator.model_registry import (
    CANDIDATE,
    CHAMPION,
    PPL_TAG,
    apply_alias_policy,
    promotes,
)
from presso.orchestrator.spool import Spool, find_spools, is_local, new_local_id
from presso.orchestrator.tracking import Tracking, plot_curves, register_model, run_tags

EXPERIMENT_KIND = "mlflow.experimentKind"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no URI known down, no MLflow retries."""
    monkeypatch.setattr(delivery, "_DOWN", set())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite tracking store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def dead_uri() -> str:
    """An http URI with nothing listening: every call is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def outage() -> MlflowException:
    """What MLflow's REST client raises when the connection is refused."""
    try:
        raise requests.ConnectionError("connection refused")
    except requests.ConnectionError:
        try:
            raise MlflowException("API request failed with exception connection refused")
        except MlflowException as e:
            return e


def test_offline_pipeline_replays_to_a_store_intact(store, tmp_path, monkeypatch, capsys):
    """The server is down from the start: experiment, runs, params, metrics from a "worker"
    process, a plot, the model registration — all must land in MLflow on sync, once."""
    monkeypatch.chdir(tmp_path)  # the replayed experiment keeps its artifacts under ./mlruns
    cfg = PressoConfig()
    cfg.run.name, cfg.run.output_dir, cfg.tracking.uri = (
        "offline",
        str(tmp_path / "out"),
        dead_uri(),
    )
    tracking = Tracking(cfg)
    parent = tracking.start()
    train = tracking.stage("train")
    assert is_local(tracking.experiment_id) and is_local(train.run_id)

    sent = pickle.dumps(train)  # the Ray worker is another process: it learns of the outage
    delivery._DOWN.clear()  # from the pickled logger, not from having tried the server itself
    worker = pickle.loads(sent)
    assert worker.link.down
    expected = {"train/loss": [(s, 5.0 - 0.1 * s) for s in range(1, 31)], "val/loss": []}
    for step in range(31):
        values = {"train/loss": 5.0 - 0.1 * step} if step else {}
        if step % 10 == 0:
            values["val/loss"] = 6.0 - 0.1 * step
            expected["val/loss"].append((step, 6.0 - 0.1 * step))
        worker.metrics(values, step)
    assert train.history("train/loss") == expected["train/loss"]
    plot_curves(train, ["train/loss", "val/loss"], "loss", "loss.png")
    train.finish()

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "weights.bin").write_bytes(b"\x01" * 64)
    register = tracking.stage("register")
    assert register_model(register, packed, "offline-model", 12.5).version is None
    register.finish()
    shutil.rmtree(packed)  # replay must use the spool's copy
    tracking.summary({"train_loss": 2.0, "method": "rtn"})
    parent.finish()

    (spool,) = find_spools(tmp_path / "out")
    pending = len(Spool(spool).pending())
    err = capsys.readouterr().err
    assert f"{pending} records wait in {spool}" in err
    assert f"presso mlflow sync {spool}" in err

    assert sync_all([tmp_path / "out"], store) == pending
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("offline")
    assert experiment.tags[EXPERIMENT_KIND] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"offline", "train", "register"}
    root_id = runs["offline"].info.run_id
    assert runs["train"].data.tags["mlflow.parentRunId"] == root_id
    assert runs["register"].data.tags["mlflow.parentRunId"] == root_id
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["offline"].data.params["run.name"] == "offline"
    assert runs["offline"].data.tags["presso.version"]
    assert runs["offline"].data.metrics["train_loss"] == 2.0
    for key, points in expected.items():
        history = client.get_metric_history(runs["train"].info.run_id, key)
        assert [(m.step, m.value) for m in history] == points  # JSON keeps floats exact
    assert {a.path for a in client.list_artifacts(root_id)} == {"config.yaml", "summary.json"}
    assert [a.path for a in client.list_artifacts(runs["train"].info.run_id, "plots")] == [
        "plots/loss.png"
    ]
    version = client.get_model_version_by_alias("offline-model", CHAMPION)
    assert version.run_id == runs["register"].info.run_id
    assert version.tags[PPL_TAG] == "12.5"
    assert client.get_model_version_by_alias("offline-model", CANDIDATE).version == version.version

    assert sync_all([spool], store) == 0  # replayed records are never sent twice
    history = client.get_metric_history(runs["train"].info.run_id, "train/loss")
    assert len(history) == len(expected["train/loss"])


def test_experiments_are_typed_as_ml_training(store, tmp_path):
    """MLflow's UI opens an experiment by its ``mlflow.experimentKind`` tag: presso's experiments
    say "custom_model_development" (runs table, not the GenAI overview), an existing experiment
    without the tag gets it, and one whose kind someone chose keeps it."""
    client = MlflowClient(store)
    client.create_experiment("untyped")
    client.create_experiment("chosen", tags={EXPERIMENT_KIND: "finetuning"})
    kinds = {}
    for name in ("fresh", "untyped", "chosen"):
        cfg = PressoConfig()
        cfg.run.name, cfg.run.output_dir, cfg.tracking.uri = name, str(tmp_path), store
        kinds[name] = client.get_experiment(Tracking(cfg).experiment_id).tags[EXPERIMENT_KIND]
    assert kinds == {
        "fresh": "custom_model_development",
        "untyped": "custom_model_development",
        "chosen": "finetuning",
    }


def test_replay_resumes_where_an_outage_stopped_it(tmp_path):
    """A server that fails again mid-replay must cost a second sync, not lost or doubled
    records; and ids learnt before the failure must still resolve the records after it."""
    spool = Spool(tmp_path / "spool")
    run, parent = new_local_id(), new_local_id()
    records = [
        {"kind": "run", "id": parent, "experiment": "0", "tags": {}},
        {"kind": "run", "id": run, "experiment": "0", "tags": {"mlflow.parentRunId": parent}},
        {"kind": "metrics", "run": run, "metrics": [["loss", 2.0, 1, 1]]},
        {"kind": "metrics", "run": run, "metrics": [["loss", 1.0, 2, 2]]},
        {"kind": "end", "run": run, "status": "FINISHED"},
    ]
    for record in records:
        spool.append(record, "http://mlflow")
    applied, fail_at = [], [3]

    def apply(record):
        if len(applied) == fail_at[0]:
            fail_at[0] = -1
            raise outage()
        applied.append(record)
        return f"real-{len(applied)}" if record["kind"] == "run" else None

    with pytest.raises(MlflowException):
        spool.replay(apply)
    assert spool.state()["replayed"] == 4  # the two runs, then both metrics merged into one batch
    spool.replay(apply)
    assert [r["kind"] for r in applied] == ["run", "run", "metrics", "end"]
    assert applied[1]["tags"]["mlflow.parentRunId"] == "real-1"
    assert applied[2] == {
        "kind": "metrics",
        "run": "real-2",
        "metrics": [["loss", 2.0, 1, 1], ["loss", 1.0, 2, 2]],
    }
    assert applied[3]["run"] == "real-2"
    assert spool.pending() == [] and spool.replay(apply) == []


def test_once_down_a_process_stops_calling_the_server(tmp_path, monkeypatch):
    """Each call to a dead server costs its retries; after the first, records go straight to
    the spool, and the run's history stays whole: what MLflow took plus what waits. A refusal
    (a bad request, not an outage) must still raise: replaying it would only fail again."""
    calls = []

    def apply_until_the_server_dies(client, uri, record):
        calls.append(record)
        if len(calls) > 2:
            raise outage()

    monkeypatch.setattr(delivery, "apply", apply_until_the_server_dies)
    link = Link("http://mlflow.example", tmp_path / "spool")
    link._client = object()
    for step in range(6):
        link.send({"kind": "metrics", "run": "r1", "metrics": [["loss", 1.0, 0, step]]})
    assert len(calls) == 3 and len(link.spool.pending()) == 4
    assert link.history("r1", "loss") == [(s, 1.0) for s in range(6)]

    def refusing_apply(client, uri, record):
        raise MlflowException("Changing param values is not allowed", "INVALID_PARAMETER_VALUE")

    monkeypatch.setattr(delivery, "apply", refusing_apply)
    fresh = Link("http://other.example", tmp_path / "spool2")
    fresh._client = object()
    with pytest.raises(MlflowException, match="not allowed"):
        fresh.send({"kind": "params", "run": "r1", "params": {"a": "2"}})
    assert not (tmp_path / "spool2").exists()


def test_promotes_only_a_lower_known_perplexity():
    assert promotes(50.0, None) and promotes(None, None)  # the first version is champion
    assert promotes(9.0, 10.0) and not promotes(10.0, 10.0) and not promotes(11.0, 10.0)
    assert not promotes(None, 10.0) and not promotes(math.nan, 10.0)
    assert promotes(30.0, math.inf)  # a champion without a perplexity loses to one with it


def test_alias_policy_against_a_registry(store, tmp_path):
    """Against a real registry: candidate always moves to the newest version, champion only
    to a better one; the perplexity is kept on the version for the next comparison."""
    client = MlflowClient(store)
    client.create_registered_model("m")
    champions = []
    for ppl in [10.0, 12.0, 8.0, None, math.nan]:
        version = client.create_model_version("m", source=(tmp_path / "x").as_uri()).version
        champions.append(apply_alias_policy(client, "m", version, ppl))
        assert client.get_model_version_by_alias("m", CANDIDATE).version == version
    assert champions == [True, False, True, False, False]
    champion = client.get_model_version_by_alias("m", CHAMPION)
    assert str(champion.version) == "3" and champion.tags[PPL_TAG] == "8.0"


def test_run_tags_name_the_ray_submission(monkeypatch):
    """Ray's job supervisor passes the submission id to the driver inside its job config."""
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert "ray.submission_id" not in run_tags()
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_X1", "job_name": "j"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    tags = run_tags()
    assert tags["ray.submission_id"] == "raysubmit_X1"
    assert tags["presso.version"] and len(tags.get("mlflow.source.git.commit", "0" * 40)) == 40


def test_a_healthy_run_writes_no_spool(store, tmp_path, monkeypatch):
    """While MLflow takes everything, nothing is written under the spool folder (the journal of
    sent metrics stays in memory); the first record spooled writes that journal too, so the
    history read while MLflow is away still holds what it took before."""
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("healthy")).info.run_id
    link = Link(store, tmp_path / "spool")
    for step in range(3):
        link.send({"kind": "metrics", "run": run_id, "metrics": [["loss", 1.0, 0, step]]})
    assert link.history(run_id, "loss") == [(s, 1.0) for s in range(3)]
    assert not (tmp_path / "spool").exists()

    def dead(client, uri, record):
        raise outage()

    monkeypatch.setattr(delivery, "apply", dead)
    link.send({"kind": "metrics", "run": run_id, "metrics": [["loss", 2.0, 0, 3]]})
    assert len(link.spool.pending()) == 1
    whole = [(s, 1.0) for s in range(3)] + [(3, 2.0)]
    assert sorted(link.spool.metric_history(run_id, "loss", sent=True)) == whole
    fresh = Link(store, tmp_path / "spool")  # as another process: it knows only the files
    assert fresh.down and fresh.history(run_id, "loss") == whole
