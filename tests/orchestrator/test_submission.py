"""`presso submit` without a cluster: what it sends, what it uploads, which token, which exit code.

The real round trip against a Ray head is in tests/integration/test_submit.py.
"""

import shlex
import zipfile

import pytest
from ray.job_submission import JobStatus

from presso import ConfigError
from presso.orchestrator import cli, submit
from presso.orchestrator.submit import (
    EXCLUDES,
    auth_headers,
    cluster_job_path,
    entrypoint,
    parse_env,
    runtime_env,
)


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


def test_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    """Heads started by `ray start --head` refuse requests without the token; look where Ray does."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert auth_headers() == {"Authorization": "Bearer home"}
    (tmp_path / "t").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_headers() == {"Authorization": "Bearer file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert auth_headers() == {"Authorization": "Bearer env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}


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
    assert cli.main([*argv, "--follow"]) == code
    out = capsys.readouterr()
    assert out.out == "raysubmit_1\nstep 1 loss 5.5\n"
    assert f"raysubmit_1 {status.value}" in out.err
    assert fake.submitted == [("presso run jobs/quickstart.yaml train.steps=5", {})]
    assert cli.main(argv) == 0  # without --follow: submitted is success


def test_a_refused_job_is_reported_not_a_traceback(monkeypatch, capsys):
    """The Jobs API rejects e.g. a bad runtime env; the user sees why, in presso's one line."""

    class Refusing(FakeClient):
        def submit_job(self, entrypoint, runtime_env):
            raise RuntimeError("Request failed with status code 400: invalid pip spec")

    monkeypatch.setattr(submit, "_client", lambda address: Refusing(JobStatus.PENDING))
    assert cli.main(["submit", "jobs/quickstart.yaml", "--address", "http://h:8265"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("presso: error: the Ray cluster at http://h:8265 refused the job")
    assert "invalid pip spec" in err and err.count("\n") == 1
