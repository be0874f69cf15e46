"""A real two-node Ray cluster on this machine: a head and a second node joined with
`ray start --address`, each with one CPU of its own, its own ports and its own session, stopped
by PID (never `ray stop`, which would stop every Ray here).

With one CPU per node, placement is forced: a test-held actor that takes one node's CPU sends
the training worker to the other node, and the two compression actors of a pool take one node
each. The resumed run trains on the head from the checkpoint the second node wrote, then
compresses on both; the folders they share are run.output_dir, which presso checks every node
sees before it starts (on one machine it is shared by construction; on a real cluster it is an
NFS mount or the like, as in k8s/).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from .test_cli import TINY
from .test_submit import PORT_FLAGS, free_ports

# Out of the default run for now: in the full suite, after other tests have started local Rays in
# this process, its in-process join of the token-auth cluster fails ("Failed to connect"); run it
# alone with `-m slow`. Moving the join into a subprocess of its own would let CI run it.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
# A node that joins has no GCS, dashboard or client server of its own.
NODE_PORT_FLAGS = [f for f in PORT_FLAGS if f not in ("--port", "--dashboard-port", "--ray-client-server-port")]  # fmt: skip


class Node:
    """`ray start --block`: SIGTERM to it stops the node's processes."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *args],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def two_nodes():
    token = os.urandom(32).hex()
    temp = Path(tempfile.mkdtemp(prefix="presso-2n-"))  # short: unix socket paths under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    head_ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    node_ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS))))
    gcs = f"127.0.0.1:{head_ports['--port']}"
    dashboard = f"http://127.0.0.1:{head_ports['--dashboard-port']}"
    head = Node(
        ["--head", "--temp-dir", str(temp), "--dashboard-host", "127.0.0.1",
         "--include-dashboard", "true",
         *(str(x) for item in head_ports.items() for x in item)],
        env, temp / "head.log",
    )  # fmt: skip
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        while not _answers(dashboard, token):
            assert head.proc.poll() is None, head.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the head did not come up"
            time.sleep(1)
        nodes.append(
            Node(["--address", gcs, *(str(x) for item in node_ports.items() for x in item)],
                 env, temp / "node.log")
        )  # fmt: skip
        yield {"gcs": gcs, "token": token, "env": env, "nodes": nodes}
    finally:
        for node in reversed(nodes):
            node.stop()


def _answers(dashboard: str, token: str) -> bool:
    try:
        return requests.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok  # fmt: skip
    except requests.RequestException:
        return False


def test_pipeline_spreads_over_two_nodes_and_resumes_across_them(
    two_nodes, mlflow_server, tmp_path, monkeypatch
):
    import ray
    from ray._raylet import Config
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_nodes["token"])
    Config.initialize("")  # Ray read its config when first imported: make it see token mode
    ray.init(address=two_nodes["gcs"], logging_level="WARNING")
    try:
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        head_id = ray.get_runtime_context().get_node_id()  # the driver here runs on the head
        (other_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id]

        @ray.remote(num_cpus=1)
        class Blocker:
            def ready(self):
                return True

        def hold(node_id):
            blocker = Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()  # fmt: skip
            ray.get(blocker.ready.remote(), timeout=60)
            return blocker

        def actors(cls):
            return {a.actor_id: a.node_id for a in list_actors(address=two_nodes["gcs"], filters=[("class_name", "=", cls)], limit=1000, detail=True)}  # fmt: skip

        env = {**two_nodes["env"], "RAY_ADDRESS": two_nodes["gcs"], "MLFLOW_TRACKING_URI": mlflow_server.uri}  # fmt: skip
        common = [*TINY, "train.workers=1", f"run.output_dir={tmp_path}", "run.name=two-nodes"]

        # 1. train on the second node: the head's CPU is held
        blocker = hold(head_id)
        first = subprocess.run([str(BIN / "presso"), "train", "jobs/quickstart.yaml", *common], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        ray.kill(blocker)
        trained_first = actors("RayTrainWorker")
        assert set(trained_first.values()) == {other_id}
        folders = (tmp_path / "two-nodes" / "ray_train").glob("*/checkpoint_*")
        checkpoint = max(f for f in folders if f.is_dir())  # the last one, at step 4

        # 2. resume on the head from that checkpoint (the second node's CPU is held until the
        # trained model is there), then compress on both nodes
        trained = tmp_path / "two-nodes" / "trained"
        shutil.rmtree(trained)  # the first run's: its reappearance says the second trained
        blocker = hold(other_id)
        resumed = subprocess.Popen(
            [str(BIN / "presso"), "run", "jobs/quickstart.yaml", *common, "train.steps=6",
             f"train.resume_from={checkpoint}", "compress.workers=2"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not trained.is_dir() and resumed.poll() is None:
            assert time.monotonic() < deadline, "the resumed training did not finish"
            time.sleep(0.5)
        ray.kill(blocker)
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-3000:]
        trained_again = {
            a: n for a, n in actors("RayTrainWorker").items() if a not in trained_first
        }
        assert set(trained_again.values()) == {head_id}
        assert "registered: two-nodes-compressed" in out
        assert set(actors("PoolWorker").values()) == {head_id, other_id}
    finally:
        ray.shutdown()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id], "tags.`presso.stage` = 'train'", order_by=["start_time ASC"])  # fmt: skip
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in runs]
    assert steps == [[1, 2, 3, 4], [5, 6]]  # the second run went on from the first's step 4
