"""``presso submit``: run a job on a Ray cluster through its Jobs API (the dashboard, port 8265).

The cluster runs ``presso run JOB overrides`` — the same code path as on a laptop. The config is
validated here first, so a typo costs a second, not a cluster slot. The code that runs is the
presso installed on the cluster (its image, or ``--pip``); ``--working-dir`` ships the job files
and any local data beside them.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from presso import ClusterError, ConfigError, PressoError
from presso.orchestrator.cluster import auth_token
from presso.orchestrator.config import load_config

# Never uploaded with --working-dir: environments, outputs and caches (Ray also honours .gitignore).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "presso_runs",
    "mlruns",
    "mlartifacts",
    "bench/results",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def cluster_job_path(job: str, working_dir: str | None) -> str:
    """The job file as the cluster sees it: relative to the uploaded working dir, else as given."""
    if working_dir is None:
        return job  # must exist on the cluster, e.g. jobs/... under the image's WORKDIR
    root = Path(working_dir).resolve()
    try:
        return Path(job).resolve().relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(
            f"{job}: not inside --working-dir {working_dir}; the cluster would not see it"
        ) from None


def entrypoint(job: str, overrides: list[str]) -> str:
    """The shell command the cluster runs, each argument quoted."""
    return shlex.join(["presso", "run", job, *overrides])


def runtime_env(
    working_dir: str | None, pip: Sequence[str], env: dict[str, str]
) -> dict[str, object]:
    """Ray runtime env: the uploaded folder (big folders excluded), extra packages, env vars."""
    out: dict[str, object] = {}
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir}: no such folder")
        out["working_dir"] = str(Path(working_dir).resolve())
        out["excludes"] = EXCLUDES
    if pip:
        out["pip"] = list(pip)
    if env:
        out["env_vars"] = dict(env)
    return out


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE, e.g. MLFLOW_TRACKING_URI=...")
        env[key] = value
    return env


def auth_headers() -> dict[str, str]:
    """A bearer token for heads with token authentication, which `ray start --head` enables:
    $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH (never ~/.ray/auth_token by itself, see
    ``cluster.py``). Heads without authentication ignore the header."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


LOCAL_TO_JOB = "local-to-job"
_LOOPBACK = ("localhost", "127.", "::1", "[::1]", "0.0.0.0")


def _host(url: str) -> str:
    return urlsplit(url if "://" in url else f"//{url}").hostname or ""


def tracking_env(cfg_uri: str | None, tracking: str | None, env: dict[str, str], address: str):
    """The variables that tell the job where to log, after checking that the cluster can reach
    it; raises ConfigError instead of letting a job log where nobody will find it.

    The job logs to ``tracking.uri`` if the config sets it, else to $MLFLOW_TRACKING_URI in its
    environment (``--tracking URI`` or ``--env MLFLOW_TRACKING_URI=...``). With neither, presso
    would log to sqlite inside the job's temporary working directory on the cluster, lost when
    the job ends: that takes ``--tracking local-to-job``, said out loud.
    """
    env = dict(env)
    if tracking == LOCAL_TO_JOB:
        if cfg_uri or env.get("MLFLOW_TRACKING_URI"):
            raise ConfigError(f"--tracking {LOCAL_TO_JOB}: but a tracking URI is also given")
        env["PRESSO_TRACKING"] = LOCAL_TO_JOB
        return env
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    uri = cfg_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri:
        here = os.environ.get("MLFLOW_TRACKING_URI")
        raise ConfigError(
            "submit: no tracking URI for the job: it would log to sqlite in its temporary "
            "working directory on the cluster, lost when the job ends. Pass --tracking "
            "http://MLFLOW:5000 (a server every node reaches) or tracking.uri=..., or --tracking "
            f"{LOCAL_TO_JOB} to accept that"
            + (
                f" ($MLFLOW_TRACKING_URI={here} here is not sent; --tracking {here} sends it)"
                if here
                else ""
            )  # fmt: skip
        )
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file", "sqlite") and not _absolute(uri):
        raise ConfigError(
            f"tracking URI {uri}: a relative path names the job's temporary working directory "
            "on the cluster, lost when the job ends; use a server or an absolute shared path"
        )
    if _host(uri).startswith(_LOOPBACK) and not _host(address).startswith(_LOOPBACK):
        raise ConfigError(
            f"tracking URI {uri} names this machine's loopback, but the job runs on the cluster "
            f"at {address}, where it names each node itself; use an address the nodes reach"
        )
    return env


def _absolute(uri: str) -> bool:
    """Whether a path URI (``sqlite:///...``, ``file:...`` or a plain path) is absolute."""
    path = uri.split(":///", 1)[-1] if ":///" in uri else uri.split(":", 1)[-1]
    return path.startswith("/")


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError:
        raise PressoError(
            f"the Ray cluster at {address} refused the request: it needs the token that "
            "`ray get-auth-token` prints on its head; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH; "
            "presso does not read ~/.ray/auth_token by itself)"
        ) from None
    except ConnectionError as e:
        raise PressoError(
            f"cannot reach the Ray Jobs API at {address} (the dashboard, port 8265): {e}"
        ) from None


async def _print_logs(client, submission_id: str) -> None:
    try:
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except Exception as e:  # the log stream broke; the job itself may still be fine
        print(f"presso: log stream interrupted ({e}); waiting for the job", file=sys.stderr)


def job_status(address: str, submission_id: str, timeout: float) -> str:
    """The job's status from the Jobs REST API, each request bounded by ``timeout`` (Ray's own
    client has none, so a head that vanishes without closing its sockets would hang it)."""
    import requests

    url = address if "://" in address else f"http://{address}"
    r = requests.get(f"{url}/api/jobs/{submission_id}", headers=auth_headers(), timeout=timeout)
    r.raise_for_status()
    return r.json()["status"]


async def follow_job(
    client, address: str, submission_id: str, lost_after_s: float, poll_s: float = 1.0
) -> str:
    """Stream the job's logs while polling its status; returns the final status, or raises
    ClusterError once the cluster has not answered for ``lost_after_s`` seconds."""
    import requests

    logs = asyncio.create_task(_print_logs(client, submission_id))
    answered = time.monotonic()
    try:
        while True:
            try:
                status = await asyncio.to_thread(
                    job_status, address, submission_id, min(10.0, lost_after_s)
                )
                answered = time.monotonic()
                if status in TERMINAL:
                    await asyncio.wait_for(asyncio.shield(logs), timeout=5)  # the last lines
                    return status
            except (requests.RequestException, ValueError, KeyError):
                if time.monotonic() - answered > lost_after_s:
                    raise ClusterError(
                        f"lost the Ray cluster at {address} while following {submission_id}: "
                        f"no answer for {lost_after_s:g} s (--lost-after); the job's outcome is "
                        f"unknown — ask `ray job status --address {address} {submission_id}` "
                        "once the head is back"
                    ) from None
            except TimeoutError:  # the final logs did not arrive in time; the status did
                return status
            await asyncio.sleep(poll_s)
    finally:
        logs.cancel()


def submit(
    job: str,
    overrides: list[str],
    address: str,
    *,
    working_dir: str | None = None,
    pip: Sequence[str] = (),
    env: Sequence[str] = (),
    tracking: str | None = None,
    follow: bool = False,
    lost_after_s: float = 60.0,
) -> int:
    """Validate the job locally, submit it, print its submission id; ``follow`` streams its logs.
    ``tracking``: where the job logs (see :func:`tracking_env`).

    Returns the exit status: 0 once submitted (with ``follow``: once it SUCCEEDED), else 1.
    """
    cfg = load_config(job, overrides)
    job_env = tracking_env(cfg.tracking.uri, tracking, parse_env(env), address)
    if tracking == LOCAL_TO_JOB:
        print(
            f"presso: --tracking {LOCAL_TO_JOB}: the job logs to sqlite under its run.output_dir "
            "on the cluster (a relative one is in the job's temporary working directory, deleted "
            "with it)",
            file=sys.stderr,
        )
    runtime = runtime_env(working_dir, pip, job_env)
    command = entrypoint(cluster_job_path(job, working_dir), list(overrides))
    client = _client(address)
    submission_id = _submit(client, address, command, runtime)
    print(submission_id, flush=True)
    if not follow:
        print(
            f"presso: submitted to {address}; follow with "
            f"`ray job logs --follow --address {address} {submission_id}`",
            file=sys.stderr,
        )
        return 0
    try:
        status = asyncio.run(follow_job(client, address, submission_id, lost_after_s))
    except KeyboardInterrupt:
        print(
            f"presso: stopped following; the job goes on (`ray job stop {submission_id}` ends it)",
            file=sys.stderr,
        )
        return 130
    print(f"presso: job {submission_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


# A head that has just started answers before its job agent has registered; Ray says to retry.
AGENT_STARTING = "No available agent to submit job"


def _submit(client, address: str, command: str, runtime: dict, wait_s: float = 60) -> str:
    """Submit, retrying for up to ``wait_s`` while the head's job agent is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime)
        except RuntimeError as e:  # the Jobs API answered with an error, e.g. a bad runtime env
            if AGENT_STARTING in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise PressoError(f"the Ray cluster at {address} refused the job: {e}") from None
