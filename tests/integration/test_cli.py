"""The CLI as a user runs it: a subprocess against a real `mlflow server`, read back afterwards."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PRESSO = str(Path(sys.executable).parent / "presso")
TINY = [
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=1",
    "model.scratch.intermediate_size=128",
    "compress.recipe=[{rtn: {bits: 4, group_size: 32}}]",
    "eval.seq_len=64",
    "eval.max_tokens=2048",
]


def presso(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a subprocess, its output captured as text."""
    return subprocess.run([PRESSO, *args], env=env, capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """presso's one error line (Ray's forwarded worker logs may come before and after it)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("presso: error")]
    return line


@pytest.mark.integration
def test_run_logs_everything_to_a_real_server(mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    env.pop("RAY_ADDRESS", None)
    args = [*TINY, "run.name=cli-test", f"run.output_dir={tmp_path}"]
    proc = presso("run", "jobs/quickstart.yaml", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "registered: cli-test-compressed" in proc.stdout

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("cli-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {r.data.tags["presso.stage"]: r for r in runs if r is not parent}
    assert set(stages) == {"train", "compress", "eval", "register"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    assert all(r.info.status == "FINISHED" for r in runs)

    assert parent.data.params["train.steps"] == "4"
    # every setting spelled out, defaults included: the run records exactly what ran
    assert (
        parent.data.params["compress.recipe"]
        == "[{'rtn': {'bits': 4, 'group_size': 32, 'symmetric': True, 'scale_dtype': 'float16'}}]"
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "config.yaml",
        "summary.json",
    }
    train = stages["train"].info.run_id
    assert [m.step for m in client.get_metric_history(train, "val/loss")] == [0, 2, 4]
    assert [a.path for a in client.list_artifacts(train, "plots")] == ["plots/loss.png"]
    assert stages["compress"].data.metrics["compress/avg_bits"] > 4
    assert stages["eval"].data.metrics["eval/compressed_ppl"] > 1

    version = client.get_model_version_by_alias("cli-test-compressed", "candidate")
    assert version.run_id == stages["register"].info.run_id

    # The registered model loads in a fresh interpreter that imported nothing of presso's.
    serve = (
        "import mlflow; m = mlflow.pyfunc.load_model('models:/cli-test-compressed@champion'); "
        "print(len(m.predict([[72, 101, 108]])[0]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", serve], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 1  # one logit per token of the vocabulary

    # `presso eval` on the packed artifact prints what it measured.
    artifact = tmp_path / "cli-test" / "compressed"
    eval_args = [*TINY[-2:], f"model.source={artifact}", "run.name=cli-eval"]
    proc = presso("eval", "jobs/quickstart.yaml", *eval_args, f"run.output_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "perplexity" in table and "tokens / s" in table and "MB" in table, table
    ppl = client.get_run(stages["eval"].info.run_id).data.metrics["eval/compressed_ppl"]
    assert f"{ppl:.4f}" in table  # the same artifact, the same windows: the same perplexity


@pytest.mark.integration
def test_failed_pipeline_leaves_every_run_failed_with_the_error(mlflow_server, tmp_path):
    """A worker that crashes past its restarts must end the CLI with one line, and leave no
    MLflow run RUNNING: the parent and the stage runs end FAILED, the error as a tag. The run's
    name and output folder are not ASCII (Ray Train once crashed on such a name)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PRESSO_INJECT_FAULT": "0:2"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "sortie ünï"
    args = [*TINY, "train.max_failures=0", "run.name=cli-fäil-模型", f"run.output_dir={out}"]
    proc = presso("run", "jobs/quickstart.yaml", *args, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = error_line(proc.stderr)
    assert error.startswith("presso: error: train: the workers failed after 0 restart(s)"), error
    assert "train.resume_from" in error  # the cause (ActorDiedError, a failed health check) varies
    assert "presso: kept: train checkpoints under" in proc.stderr
    left = {p.name for p in (out / "cli-fäil-模型").iterdir()}
    assert "ray_train" in left and not {"compressed", ".compressed.unverified"} & left

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("cli-fäil-模型").experiment_id])
    assert {r.data.tags.get("presso.stage", "parent") for r in runs} == {"parent", "train"}
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("the workers failed" in r.data.tags["presso.error"] for r in runs)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("ask", "expect"),
    [
        ("train.use_gpu=true", "train.workers × train.threads_per_worker (train.use_gpu: one "
         "GPU each): asks for 2 CPUs and 2 GPUs, but the Ray cluster has 2 CPUs and 0 GPUs"),
        ("compress.workers=3", "compress.workers (one CPU each): asks for 3 CPUs and 0 GPUs, but "
         "the Ray cluster has 2 CPUs"),
    ],
    ids=["gpus", "compression-workers"],
)  # fmt: skip
def test_resources_the_cluster_does_not_have_are_refused_not_awaited(tmp_path, ask, expect):
    """Ray would wait forever for a GPU that no node has, and compression actors beyond the CPUs
    never start (each holds its CPU): presso refuses at once, before training — not after it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    args = [*TINY, "ray.num_cpus=2", ask, f"run.output_dir={tmp_path}"]
    proc = presso("run", "jobs/quickstart.yaml", *args, env=env, timeout=100)
    assert proc.returncode == 1
    assert expect in error_line(proc.stderr)
    assert not list(tmp_path.rglob("ray_train")), "a stage started"


def test_config_error_is_one_line_and_starts_nothing():
    """A typo must cost the user a second, not a Ray start: RAY_ADDRESS points nowhere here."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    proc = subprocess.run(
        [PRESSO, "run", "jobs/quickstart.yaml", "train.steps=abc"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "presso: error: train.steps: expected int, got 'abc'\n"
    assert proc.stdout == ""


def test_help_explains_the_commands():
    out = subprocess.run([PRESSO, "--help"], capture_output=True, text=True).stdout
    for command in ("run", "train", "compress", "eval", "config"):
        assert command in out
    sub = subprocess.run([PRESSO, "run", "--help"], capture_output=True, text=True).stdout
    assert "key=value" in sub and "jobs/quickstart.yaml" in sub
