"""How presso reaches Ray: token authentication for a cluster at an address, and the ports of
the local Ray that presso starts itself.

Token authentication is Ray's own (https://docs.ray.io/en/latest/ray-security/token-auth.html):
a head started with ``ray start --head`` wants a token, and a client sends one only with
``RAY_AUTH_MODE=token``. presso takes the token from ``RAY_AUTH_TOKEN`` or the file named by
``RAY_AUTH_TOKEN_PATH`` and then sets ``RAY_AUTH_MODE=token`` itself. It never falls back to
``~/.ray/auth_token`` on its own: every ``ray start --head`` on a machine writes that file, so it
may hold another cluster's token, or someone else's; ``RAY_AUTH_TOKEN_PATH=~/.ray/auth_token``
uses it on purpose.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from presso import ClusterError

GET_TOKEN = (
    "set RAY_AUTH_TOKEN to what `ray get-auth-token` prints on the cluster's head, or "
    "RAY_AUTH_TOKEN_PATH to a file holding it"
)


def auth_token() -> str | None:
    """The token the user gave: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH; None if
    neither is set, or if RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no such file; {GET_TOKEN}")
    return file.read_text().strip() or None


def prepare_auth() -> None:
    """Before joining a cluster at an address: with a token given, turn Ray's token mode on (a
    token alone is ignored, and the join fails after Ray's retries with "Failed to connect").
    RAY_AUTH_MODE=token without a token would make Ray read ~/.ray/auth_token: refused."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return
    if auth_token() is not None:
        if mode != "token":
            os.environ["RAY_AUTH_MODE"] = "token"
            # Ray caches its config when imported: refresh it, as Ray itself does when it
            # turns token mode on (authentication_token_setup._enable_token_auth).
            from ray._raylet import Config

            Config.initialize("")
    elif mode == "token":
        raise ClusterError(
            "RAY_AUTH_MODE=token, but neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set; "
            f"{GET_TOKEN}. presso does not read ~/.ray/auth_token by itself (any `ray start "
            "--head` on this machine writes one): RAY_AUTH_TOKEN_PATH=~/.ray/auth_token uses it"
        )


def join_error(address: str, error: BaseException) -> ClusterError:
    """What to tell a user whose join of the cluster at ``address`` failed, naming the piece
    most likely missing."""
    reason = (
        str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    )
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        hint = (
            "the cluster refused or did not answer with the token given (RAY_AUTH_TOKEN / "
            "RAY_AUTH_TOKEN_PATH): is it this cluster's? `ray get-auth-token` on its head prints it"
        )
    else:
        hint = (
            "no token was sent, and a head started with `ray start --head` wants one (Ray's "
            f"default): {GET_TOKEN}"
        )
    return ClusterError(f"could not join the Ray cluster at {address} ({reason}); {hint}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ray_ports(dashboard_port: int, metrics_export_port: int) -> dict[str, int]:
    """``ray.init`` arguments for the ports of a local Ray that presso starts: the configured
    ones, or (0) free ones chosen now, instead of Ray's fixed defaults, which another Ray on the
    machine may hold. Ray chooses its other ports (GCS, raylet, object manager) free itself."""
    return {
        "dashboard_port": dashboard_port or free_port(),
        "_metrics_export_port": metrics_export_port or free_port(),
    }


def check_shared(folder: Path) -> None:
    """On a cluster of more than one node, refuse a run.output_dir that some node does not see.

    Ray Train's workers write checkpoints there and the driver reads the trained model back; a
    node-local folder (the default, relative ``presso_runs``, or a path no other node mounts)
    fails only when a worker on another node writes, or after a restart lands elsewhere. A
    zero-CPU task on every node looks for a file the driver just wrote.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".presso-shared-{uuid.uuid4().hex}"
    marker.touch()
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        found = ray.get(
            [
                sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)
                ).remote(str(marker))
                for n in nodes
            ],
            timeout=120,
        )
    finally:
        marker.unlink()
    blind = [n for n, seen in zip(nodes, found) if not seen]
    if blind:
        raise ClusterError(
            f"run.output_dir {folder.parent}: {len(blind)} of the cluster's {len(nodes)} nodes do "
            f"not see it (node {blind[0][:12]}...): training workers and the driver on different "
            "nodes must share their files; point run.output_dir at a folder every node mounts "
            "at the same path (NFS, CephFS, EFS, ...)"
        )
