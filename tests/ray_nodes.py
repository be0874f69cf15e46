"""Ray nodes started the way a cluster's are, for the tests that need a cluster rather than a
local Ray: `ray start --block` with token authentication (Ray's default for `ray start --head`),
in its own session, its own temp dir and free ports, and stopped by its PID — never `ray stop`,
which would stop every Ray on the machine."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
# A node that joins has no GCS, dashboard or client server of its own.
JOIN_PORT_FLAGS = HEAD_PORT_FLAGS[3:]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open until every port is chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def cluster_env(token: str, **extra: str) -> dict[str, str]:
    """This environment with the cluster's token and none of the caller's Ray auth or address;
    ``presso`` first on PATH (jobs run it from the head's PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


class RayNode:
    """A head (``join`` None) or a node joining the head whose GCS is at ``join``."""

    def __init__(
        self, cpus: int, token: str | None = None, join: str | None = None, env: dict | None = None
    ) -> None:
        self.token = token or secrets.token_hex(32)
        # Short path: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
        self.temp = tempfile.mkdtemp(prefix="presso-ray-")
        flags = JOIN_PORT_FLAGS if join else HEAD_PORT_FLAGS
        ports = dict(zip(flags, free_ports(len(flags))))
        self.node_manager_port = ports["--node-manager-port"]
        if join:
            role = ["--address", join]
        else:
            self.address = f"http://127.0.0.1:{ports['--dashboard-port']}"
            self.gcs = f"127.0.0.1:{ports['--port']}"  # what RAY_ADDRESS names to join it
            role = ["--head", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
        self.log = Path(self.temp) / "ray.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--block", "--num-cpus", str(cpus),
                "--temp-dir", self.temp, "--disable-usage-stats", *role,
                *(str(x) for item in ports.items() for x in item),
            ],
            env=env or cluster_env(self.token), cwd=self.temp, stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the head's dashboard answers with the token."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.address}/api/version", headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray dashboard at {self.address} did not answer in {timeout}s")

    def stop(self) -> None:
        """SIGTERM to `ray start --block` drains and stops its processes; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)
