"""The nightly CronJob's script, run by a POSIX shell against a stand-in for kubectl.

There is no cluster here, so ``fake_kubectl.py`` plays the API server (it knows only the calls
the script makes). What is tested is the script's own logic: tonight's RayJob is a copy of the
suspended template named by the date and owned by the CronJob's Job, a transient API error costs
a retry and not the night, a retried pod follows the night's job instead of starting a second,
the wait is bounded when the API server stays away, and old nights' folders go.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .test_manifests import render

FAKE = Path(__file__).with_name("fake_kubectl.py")
NIGHT = time.strftime("%Y%m%d", time.gmtime())
TONIGHT = f"presso-nightly-{NIGHT}"
RUNNING = ["Initializing/", "Running/RUNNING", "Running/RUNNING"]


def _script() -> str:
    (cron,) = [o for o in render("schedule") if o["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def _template() -> dict:
    """The template as the API server returns it: with the fields it sets itself."""
    (job,) = [o for o in render("schedule") if o["kind"] == "RayJob"]
    job["metadata"].update(resourceVersion="41", uid="t-uid", generation=1, creationTimestamp="x")
    job["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
    return {**job, "status": {"jobDeploymentStatus": "Suspended"}}


class FakeCluster:
    def __init__(self, root: Path) -> None:
        self.api, self.runs, self.bin = root / "api", root / "runs", root / "bin"
        for d in (self.api, self.runs, self.bin):
            d.mkdir()
        (self.bin / "kubectl").symlink_to(FAKE)
        # The clock stands still at NIGHT: a test run that crosses midnight UTC must not see
        # the script name tomorrow's job (the script's only `date` call names the night).
        (self.bin / "date").write_text(f"#!/bin/sh\necho {NIGHT}\n")
        (self.bin / "date").chmod(0o755)
        self.objects = {"presso-nightly": _template()}

    def night(self, statuses: list[str], fail: dict | None = None, **env):
        """Run the script once; returns (process, objects after, objects created, calls)."""
        (self.api / "objects.json").write_text(json.dumps(self.objects))
        (self.api / "statuses.json").write_text(json.dumps(statuses))
        (self.api / "fail.json").write_text(json.dumps(fail or {}))
        environ = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE_KUBE": str(self.api),
            "RUNS": str(self.runs),
            "POLL_S": "0",
            "JOB_NAME": "presso-nightly-29000000",
            "JOB_UID": "job-uid",
            **env,
        }
        proc = subprocess.run(
            ["sh", "-c", _script()], env=environ, capture_output=True, text=True, timeout=60
        )
        self.objects = json.loads((self.api / "objects.json").read_text())
        created = self.api / "created.jsonl"
        made = (
            [json.loads(line) for line in created.read_text().splitlines()]
            if created.is_file()
            else []
        )
        return proc, self.objects, made, (self.api / "calls.log").read_text().splitlines()


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell")
    return FakeCluster(tmp_path)


def test_a_night_survives_transient_api_errors_and_cleans_up_after_success(cluster):
    """A failed create and three failed polls in a row (an API server restarting) do not end
    the night; one RayJob is created, and deleted once it succeeded (MLflow keeps the record)."""
    proc, objects, made, _ = cluster.night(
        [*RUNNING, "Complete/SUCCEEDED"], {"create": 1, "poll": 3}
    )
    assert proc.returncode == 0, proc.stderr
    assert f"rayjob {TONIGHT} succeeded" in proc.stdout
    assert proc.stderr.count("TLS handshake timeout") == 4
    assert [m["metadata"]["name"] for m in made] == [TONIGHT]
    assert set(objects) == {"presso-nightly"}  # tonight's deleted, the template kept


def test_tonight_s_job_is_the_template_under_a_dated_name_owned_by_the_job(cluster):
    """The copy runs (suspend false), writes to its own folder and MLflow run (run.name), and
    is owned by the CronJob's Job: when the history limit deletes the Job, the RayJob goes too."""
    proc, _, (job,), _ = cluster.night(["Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    template, meta = _template(), job["metadata"]
    assert meta["name"] == TONIGHT and meta["labels"]["presso.dev/night"] == NIGHT
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "presso-nightly-29000000",
            "uid": "job-uid",
        }
    ]
    assert not {"resourceVersion", "uid", "generation", "creationTimestamp", "annotations"} & set(
        meta
    )
    assert "status" not in job and job["spec"]["suspend"] is False
    assert job["spec"]["entrypoint"] == f"{template['spec']['entrypoint']} run.name=nightly-{NIGHT}"
    rest = ("suspend", "entrypoint")
    assert {k: v for k, v in job["spec"].items() if k not in rest} == {
        k: v for k, v in template["spec"].items() if k not in rest
    }


def test_a_failed_night_is_kept_for_inspection(cluster):
    proc, objects, _, _ = cluster.night([*RUNNING, "Failed/FAILED"])
    assert proc.returncode == 1
    assert f"rayjob {TONIGHT} ended Failed/FAILED" in proc.stdout
    assert TONIGHT in objects


def test_a_retried_pod_follows_tonight_s_job_instead_of_starting_another(cluster):
    cluster.objects[TONIGHT] = {**_template(), "metadata": {"name": TONIGHT}}
    proc, _, made, _ = cluster.night(["Running/RUNNING", "Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    assert made == [] and "created earlier tonight" in proc.stdout


def test_an_api_server_that_stays_away_ends_the_wait(cluster):
    """RETRIES failures in a row end the pod (exit 1) instead of hanging until the Job's deadline;
    the RayJob stays, owned by the Job, for the next pod (backoffLimit) or the history to handle."""
    proc, objects, _, calls = cluster.night(RUNNING, {"poll": 100}, RETRIES="3")
    assert proc.returncode == 1
    assert "failed (3/3)" in proc.stderr
    assert TONIGHT in objects
    assert sum(c.startswith("get rayjob " + TONIGHT + " -o jsonpath") for c in calls) == 3


def test_old_nights_output_folders_are_removed(cluster):
    """Folders of nights older than KEEP_DAYS go; newer nights and anything else stay."""
    month_ago = time.time() - 30 * 86400
    for name in ("nightly-20200101", "nightly-recent", "presso-quickstart"):
        (cluster.runs / name).mkdir()
    for name in ("nightly-20200101", "presso-quickstart"):
        os.utime(cluster.runs / name, (month_ago, month_ago))
    proc, _, _, _ = cluster.night(["Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in cluster.runs.iterdir()) == ["nightly-recent", "presso-quickstart"]
