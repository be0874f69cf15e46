"""Runs name the commit they ran, also from the container image, which holds no .git."""

import os
import subprocess
import sys

from presso.orchestrator.tracking import run_tags

TAG = "mlflow.source.git.commit"
SCRIPT = "from presso.orchestrator.tracking import run_tags; print(run_tags().get('" + TAG + "'))"


def _tags_without_git(tmp_path, **env) -> str:
    """run_tags() in a process that cannot run git, as in the image (python:slim has none)."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != "PRESSO_GIT_COMMIT"}
    environ.update(PATH=str(empty), **env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=environ, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_image_build_argument_names_the_commit_when_git_cannot(tmp_path):
    """The Dockerfile turns its GIT_COMMIT build argument into $PRESSO_GIT_COMMIT; without it a
    run from the image has no commit tag at all (rather than a wrong one)."""
    assert _tags_without_git(tmp_path, PRESSO_GIT_COMMIT="abc123") == "abc123"
    assert _tags_without_git(tmp_path) == "None"


def test_a_checkout_s_own_commit_wins_over_the_variable(monkeypatch):
    """In a checkout, git knows what runs; a stale variable from an old image must not say else."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.setenv("PRESSO_GIT_COMMIT", "stale")
    assert run_tags()[TAG] == head.strip()
