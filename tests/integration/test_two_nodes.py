"""A real two-node Ray cluster on this machine: a head and a second node joined with
`ray start --address`, each with one CPU of its own, its own ports and its own session, stopped
by PID (never `ray stop`, which would stop every Ray here).

With one CPU per node, placement is forced: a driver that holds one node's CPU with an actor
sends the training worker to the other node, and the two compression actors of a pool take one
node each. The runs keep their files in run.storage, an S3 bucket on a real S3-compatible server
(moto's), and each run works in a local run.output_dir of its own: the resumed run trains on the
head from the checkpoint the second node wrote to the bucket, then compresses on both nodes, and
its finished folder lands in the bucket.

Everything that talks to the cluster runs in a process of its own, as a user's would: a test
process that has started local Rays before cannot join a token-auth cluster in-process.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..ray_nodes import RayNode, cluster_env
from .test_cli import TINY

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """A head and a joined node, one CPU each; every node reaches the bucket, as pods would
    with the credentials from a Secret."""
    token = secrets.token_hex(32)
    env = cluster_env(token, **s3_server.env)
    head = RayNode(cpus=1, token=token, env=env)
    nodes = [head]
    try:
        head.wait_ready()
        nodes.append(RayNode(cpus=1, token=token, join=head.gcs, env=env))
        env = {**env, "RAY_ADDRESS": head.gcs}
        deadline = time.monotonic() + 120
        while len(ids := _in_cluster(_NODES, env)) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        head_id = ids.pop(str(head.node_manager_port))
        yield {"env": env, "head": head_id, "other": ids.popitem()[1]}
    finally:
        for node in reversed(nodes):
            node.stop()


# Scripts run by a fresh interpreter joined to the cluster (RAY_ADDRESS and the token in its env).
_NODES = """
import json, ray
ray.init(logging_level="ERROR")
print("RESULT", json.dumps({n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}))
"""
_ACTORS = """
import json, os, sys
from ray.util.state import list_actors
found = list_actors(address=os.environ["RAY_ADDRESS"], limit=1000, detail=True)
print("RESULT", json.dumps({a.actor_id: a.node_id for a in found if a.class_name.split(".")[-1] == sys.argv[1]}))
"""
_HOLD = """
import sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level="ERROR")
@ray.remote(num_cpus=1)
class Blocker:
    def ready(self):
        return True
blocker = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[1], soft=False)).remote()
ray.get(blocker.ready.remote(), timeout=60)
print("held", flush=True)
time.sleep(3600)
"""


def _in_cluster(script: str, env: dict, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter joined to the cluster; its ``RESULT`` line's JSON."""
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")] or [proc.stdout[-2000:]]  # fmt: skip
    return json.loads(line.removeprefix("RESULT "))


def _actors(cls: str, env: dict, known: dict | None = None) -> dict:
    """{actor id: node id} of the ``cls`` actors the cluster has had, less those ``known``; the
    state API can take a moment to list the actors of a job that just ended."""
    deadline = time.monotonic() + 30
    while not (found := {a: n for a, n in _in_cluster(_ACTORS, env, cls).items() if a not in (known or {})}):  # fmt: skip
        assert time.monotonic() < deadline, f"no {cls} actor listed"
        time.sleep(2)
    return found


class Hold:
    """A driver whose actor takes one node's only CPU until release() ends the driver."""

    def __init__(self, node_id: str, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, node_id], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "held", "the blocker did not start"

    def release(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(2)  # the GCS reaps a dead driver's actors and frees their CPU


def test_pipeline_spreads_over_two_nodes_and_resumes_across_them(
    two_nodes, mlflow_server, s3_env, tmp_path
):
    """Ray Train workers, compression actors and the drivers on different nodes share nothing
    but run.storage: a checkpoint one node wrote is resumed on the other."""
    import pyarrow.fs

    s3_server = s3_env

    env = {**two_nodes["env"], "MLFLOW_TRACKING_URI": mlflow_server.uri}
    head_id, other_id = two_nodes["head"], two_nodes["other"]
    bucket = s3_server.bucket("presso-runs")
    common = [*TINY, "train.workers=1", f"run.storage={bucket}/team", "run.name=two-nodes"]

    def presso(command, *overrides, output_dir):
        cmd = [str(BIN / "presso"), command, "jobs/quickstart.yaml", *common, *overrides, f"run.output_dir={output_dir}"]  # fmt: skip
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    # 1. train on the second node (the head's CPU is held); checkpoints go to the bucket
    hold = Hold(head_id, env)
    out, err = presso("train", output_dir=tmp_path / "a").communicate(timeout=300)  # fmt: skip
    hold.release()
    assert "stored the run in s3://presso-runs/team/two-nodes" in out, err[-3000:]
    trained_first = _actors("RayTrainWorker", env)
    assert set(trained_first.values()) == {other_id}

    # 2. in another local folder, resume on the head from the bucket (the second node's CPU is
    # held until the trained model is there), then compress on both nodes
    hold = Hold(other_id, env)
    resumed = presso(
        "run", "train.steps=6", "compress.workers=2",
        f"train.resume_from={bucket}/team/two-nodes/ray_train", output_dir=tmp_path / "b",
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (tmp_path / "b" / "two-nodes" / "trained").is_dir() and resumed.poll() is None:
        assert time.monotonic() < deadline, "the resumed training did not finish"
        time.sleep(0.5)
    hold.release()
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "train resumes from s3://presso-runs/team/two-nodes/ray_train/two-nodes-" in out
    assert set(_actors("RayTrainWorker", env, trained_first).values()) == {head_id}
    assert "registered: two-nodes-compressed" in out
    assert set(_actors("PoolWorker", env).values()) == {head_id, other_id}

    # the finished run is in the bucket
    fs, root = pyarrow.fs.FileSystem.from_uri(f"{bucket}/team/two-nodes")
    stored = {i.path[len(root) + 1 :] for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))}  # fmt: skip
    assert {"summary.json", "compressed/model.safetensors", "trained/config.json"} <= stored

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id], "tags.`presso.stage` = 'train'", order_by=["start_time ASC"])  # fmt: skip
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in runs]
    assert steps == [[1, 2, 3, 4], [5, 6]]  # the second run went on from the first's step 4
