"""`presso submit` without a cluster: what it sends, what it uploads, which token, which exit code.

The real round trip against a Ray head is in tests/integration/test_submit.py.
"""

import json
import os
import shlex
import zipfile

import pytest
from ray.job_submission import JobStatus

from presso import ClusterError, ConfigError
from presso.orchestrator import cli, submit
from presso.orchestrator.cluster import prepare_auth
from presso.orchestrator.config import load_config
from presso.orchestrator.submit import (
    EXCLUDES,
    auth_headers,
    cluster_job_path,
    entrypoint,
    parse_env,
    runtime_env,
    tracking_env,
)
from presso.orchestrator.tracking import resolve_uri


def test_entrypoint_survives_the_clusters_shell():
    """Ray runs the entrypoint through a shell: overrides with spaces and braces must arrive whole."""
    overrides = ["compress.recipe=[{rtn: {bits: 4, group_size: 32}}]", "run.name=it's"]
    command = entrypoint("jobs/quickstart.yaml", overrides)
    assert shlex.split(command) == ["presso", "run", "jobs/quickstart.yaml", *overrides]


def test_job_path_is_taken_relative_to_the_uploaded_folder(tmp_path, monkeypatch):
    """The cluster unpacks --working-dir as its cwd, so a local path must become relative to it."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a.yaml").write_text("{}")
    monkeypatch.chdir(tmp_path / "jobs")
    assert cluster_job_path("a.yaml", "..") == "jobs/a.yaml"
    assert cluster_job_path(str(tmp_path / "jobs" / "a.yaml"), str(tmp_path)) == "jobs/a.yaml"
    assert cluster_job_path("jobs/a.yaml", None) == "jobs/a.yaml"  # as the image has it
    with pytest.raises(ConfigError, match="not inside --working-dir"):
        cluster_job_path("a.yaml", str(tmp_path / "elsewhere"))


def test_upload_leaves_environments_and_outputs_behind(tmp_path):
    """Ray refuses packages over its limit; a .venv alone is gigabytes. Zipped the way Ray does.

    Uses Ray's own packaging function (private API), with .gitignore ignored so that only
    presso's exclude list is tested.
    """
    from ray._private.runtime_env.packaging import create_package

    for name in [
        "jobs/a.yaml",
        "orchestrator/b.py",
        ".venv/lib/torch.so",
        ".git/objects/x",
        "presso_runs/quickstart/model.safetensors",
        "build/lib/c.py",
        "presso.egg-info/PKG-INFO",
        "orchestrator/__pycache__/b.cpython-311.pyc",
        "bench/results/r.json",
    ]:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text("x")
    env = runtime_env(str(tmp_path / "src"), [], {})
    create_package(env["working_dir"], tmp_path / "pkg.zip", False, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert names == {"jobs/a.yaml", "orchestrator/b.py"}
    assert env["excludes"] == EXCLUDES


def test_runtime_env_carries_only_what_was_asked():
    assert runtime_env(None, [], {}) == {}
    assert runtime_env(None, ["presso==0.1.0"], parse_env(["A=1=2"])) == {
        "pip": ["presso==0.1.0"],
        "env_vars": {"A": "1=2"},
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_env(["MLFLOW_TRACKING_URI"])
    with pytest.raises(ConfigError, match="no such folder"):
        runtime_env("/no/such/folder", [], {})


def test_token_is_taken_only_where_the_user_put_it(tmp_path, monkeypatch):
    """Heads started by `ray start --head` refuse requests without the token. presso sends
    $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, but never ~/.ray/auth_token by itself:
    every `ray start --head` on the machine writes one, maybe another cluster's."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("someone else's\n")
    assert auth_headers() == {}
    (tmp_path / "t").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_headers() == {"Authorization": "Bearer file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert auth_headers() == {"Authorization": "Bearer env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*missing: no such file"):
        auth_headers()


def test_joining_with_a_token_turns_ray_token_mode_on(tmp_path, monkeypatch):
    """Ray sends a token only with RAY_AUTH_MODE=token (a token alone fails to connect after
    its retries); RAY_AUTH_MODE=token without a token would read ~/.ray/auth_token: refused."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    prepare_auth()
    assert "RAY_AUTH_MODE" not in os.environ  # nothing given: Ray's own default
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    prepare_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(
        ClusterError, match=r"neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH.*~/\.ray/auth_token"
    ):
        prepare_auth()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    prepare_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


HEAD = "http://10.0.0.5:8265"


@pytest.mark.parametrize(
    ("cfg_uri", "tracking", "env", "address", "error"),
    [
        (None, None, {}, HEAD, "no tracking URI for the job"),
        (None, "sqlite:///mlflow.db", {}, HEAD, "a relative path"),
        (None, "mlruns", {}, HEAD, "a relative path"),
        (None, "http://localhost:5000", {}, HEAD, "loopback"),
        ("http://127.0.0.1:5000", None, {}, HEAD, "loopback"),
        ("http://m:5000", "local-to-job", {}, HEAD, "also given"),
    ],
)
def test_submit_refuses_tracking_the_cluster_cannot_keep(cfg_uri, tracking, env, address, error):
    """A job that logs where nobody will find it is refused before it takes a cluster slot."""
    with pytest.raises(ConfigError, match=error):
        tracking_env(cfg_uri, tracking, env, address)


def test_submit_sends_the_tracking_it_was_given():
    uri = "http://mlflow.team:5000"
    assert tracking_env(None, uri, {}, HEAD) == {"MLFLOW_TRACKING_URI": uri}
    assert tracking_env(uri, None, {"A": "1"}, HEAD) == {"A": "1"}  # in the config already
    assert (
        tracking_env(None, None, {"MLFLOW_TRACKING_URI": uri}, HEAD)["MLFLOW_TRACKING_URI"] == uri
    )
    assert tracking_env(None, "sqlite:////shared/mlflow.db", {}, HEAD)  # an absolute shared path
    local = "http://127.0.0.1:5000"  # a cluster on this machine reaches this machine's loopback
    assert tracking_env(None, local, {}, "http://127.0.0.1:8265") == {"MLFLOW_TRACKING_URI": local}
    assert tracking_env(None, "local-to-job", {}, HEAD) == {"PRESSO_TRACKING": "local-to-job"}


def test_a_submitted_job_without_tracking_refuses_to_log_into_its_working_dir(monkeypatch):
    """Also for `ray job submit -- presso run ...`, which presso submit's check never sees."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRESSO_TRACKING", raising=False)
    job = json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    with pytest.raises(ConfigError, match="raysubmit_1 with no MLFLOW_TRACKING_URI"):
        resolve_uri(load_config("jobs/quickstart.yaml"))
    shared = load_config("jobs/quickstart.yaml", ["run.output_dir=/shared/runs"])
    assert resolve_uri(shared) == "sqlite:////shared/runs/mlflow.db"
    monkeypatch.setenv("PRESSO_TRACKING", "local-to-job")
    assert resolve_uri(load_config("jobs/quickstart.yaml")).startswith("sqlite:///")


def test_bad_config_is_one_line_and_submits_nothing(monkeypatch, capsys):
    """A typo must cost the user a second, not a cluster slot."""

    def no_cluster(address):
        raise AssertionError("contacted the cluster")

    monkeypatch.setattr(submit, "_client", no_cluster)
    argv = ["submit", "jobs/quickstart.yaml", "train.steps=abc", "--address", "http://h:8265"]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.err == "presso: error: train.steps: expected int, got 'abc'\n" and out.out == ""


class FakeClient:
    """Just enough of JobSubmissionClient: one job that logs a line and ends in ``status``."""

    def __init__(self, status: JobStatus) -> None:
        self.status, self.submitted = status, []

    def submit_job(self, entrypoint, runtime_env):
        self.submitted.append((entrypoint, runtime_env))
        return "raysubmit_1"

    async def tail_job_logs(self, submission_id):
        yield "step 1 loss 5.5\n"

    def job_status(self, address, submission_id, timeout):  # presso asks the REST API itself
        return self.status.value


@pytest.mark.parametrize(("status", "code"), [(JobStatus.SUCCEEDED, 0), (JobStatus.FAILED, 1)])
def test_follow_exits_with_the_jobs_outcome(monkeypatch, capsys, status, code):
    """Scripts and CI chain on `presso submit --follow`: only a job that succeeded may exit 0."""
    fake = FakeClient(status)
    monkeypatch.setattr(submit, "_client", lambda address: fake)
    monkeypatch.setattr(submit, "job_status", fake.job_status)
    argv = ["submit", "jobs/quickstart.yaml", "train.steps=5", "--address", "http://h:8265"]
    argv += ["--tracking", "http://mlflow.team:5000"]
    assert cli.main([*argv, "--follow"]) == code
    out = capsys.readouterr()
    assert out.out == "raysubmit_1\nstep 1 loss 5.5\n"
    assert f"raysubmit_1 {status.value}" in out.err
    env = {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow.team:5000"}}
    assert fake.submitted == [("presso run jobs/quickstart.yaml train.steps=5", env)]
    assert cli.main(argv) == 0  # without --follow: submitted is success


def test_a_refused_job_is_reported_not_a_traceback(monkeypatch, capsys):
    """The Jobs API rejects e.g. a bad runtime env; the user sees why, in presso's one line."""

    class Refusing(FakeClient):
        def submit_job(self, entrypoint, runtime_env):
            raise RuntimeError("Request failed with status code 400: invalid pip spec")

    monkeypatch.setattr(submit, "_client", lambda address: Refusing(JobStatus.PENDING))
    argv = [
        "submit",
        "jobs/quickstart.yaml",
        "--address",
        "http://h:8265",
        "--tracking",
        "local-to-job",
    ]
    assert cli.main(argv) == 1
    warning, err = capsys.readouterr().err.split("\n", 1)
    assert warning.startswith("presso: --tracking local-to-job: the job logs to sqlite")
    assert err.startswith("presso: error: the Ray cluster at http://h:8265 refused the job")
    assert "invalid pip spec" in err and err.count("\n") == 1
