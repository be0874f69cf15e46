"""How presso reaches Ray: joining a cluster at an address (bounded, with token authentication)
or starting a local Ray of its own (with free ports), and checking before any stage starts that
the cluster can ever hold what the stages ask for.

Token authentication is Ray's own (https://docs.ray.io/en/latest/ray-security/token-auth.html):
a head started with ``ray start --head`` wants a token, and a client sends one only with
``RAY_AUTH_MODE=token``. presso takes the token from ``RAY_AUTH_TOKEN`` or the file named by
``RAY_AUTH_TOKEN_PATH`` and then sets ``RAY_AUTH_MODE=token`` itself. It never falls back to
``~/.ray/auth_token`` on its own: every ``ray start --head`` on a machine writes that file, so it
may hold another cluster's token, or someone else's; ``RAY_AUTH_TOKEN_PATH=~/.ray/auth_token``
uses it on purpose.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from presso import ClusterError
from presso.orchestrator.config import PressoConfig

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


def check_shared(folder: Path, key: str = "run.output_dir") -> None:
    """On a cluster of more than one node, refuse a run folder (under ``key``: run.storage, or
    run.output_dir when that is where checkpoints go) that some node does not see.

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
            f"{key} {folder.parent}: {len(blind)} of the cluster's {len(nodes)} nodes do "
            f"not see it (node {blind[0][:12]}...): training workers and the driver on different "
            "nodes must share their files; set run.storage to a folder every node mounts at the "
            "same path (NFS, CephFS, EFS, ...) or to a URI such as s3://bucket/runs"
        )


def ensure_ray(cfg: PressoConfig) -> None:
    """Connect to ``ray.address`` / $RAY_ADDRESS, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    if address:
        _check_listening(address, cfg.ray.connect_timeout_s)
        prepare_auth()
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            raise join_error(address, e) from None
    else:
        # A local Ray of presso's own: token auth on (Ray's default) without the warning that
        # says so; no spot-instance preemption to watch for (its watcher logs an error on start).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(
            # "local", not None: None joins whatever cluster `ray start` last recorded in
            # /tmp/ray (even a stopped one), and then refuses num_cpus with a traceback
            address="local",
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            include_dashboard=True,  # Ray Train's state API needs it
            logging_level="WARNING",
            **local_ray_ports(cfg.ray.dashboard_port, cfg.ray.metrics_export_port),
        )


def ray_address(cfg: PressoConfig) -> str | None:
    """The cluster to join: ``ray.address``, else $RAY_ADDRESS; None means a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


# What a gRPC server (Ray's GCS, or its client server) answers first to an HTTP/2 client: a
# SETTINGS frame. An HTTP/1 server, a database or a closed port answers otherwise or not at all.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_listening(address: str, timeout: float) -> None:
    """Fail in ``timeout`` seconds, not never, unless a gRPC server (Ray's) answers at a
    ``host:port`` address: Ray itself retries the connection without end, to a closed port and
    to one where something else listens alike."""
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"ray.address / RAY_ADDRESS {address} is an HTTP address (the dashboard and Jobs API); "
            "`presso run` joins a cluster at its GCS address, host:6379, or use `presso submit "
            f"--address {address}` to run the job on the cluster"
        )
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():  # "auto" and the like: Ray finds the cluster itself
        return
    where = f"{address} (waited up to {timeout:g} s, ray.connect_timeout_s)"
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {where}: {e.strerror or e}; start one with "
            "`ray start --head`, or unset RAY_ADDRESS and ray.address to let presso start a "
            "local Ray"
        ) from None
    with conn:
        try:
            conn.sendall(_HTTP2_PREFACE)
            head = conn.recv(9, socket.MSG_WAITALL)
        except OSError:  # no answer in time, or the connection was reset
            head = b""
    if len(head) < 9 or head[3] != 4:
        raise ClusterError(
            f"something listens at {where} but it is not a Ray cluster (it does not speak gRPC); "
            "check the port: a head started with `ray start --head` listens on 6379 by default"
        )


def check_resources(cfg: PressoConfig, stages: tuple[str, ...]) -> None:
    """Every stage's request, before the first stage starts: compression workers the cluster can
    never hold must not be found after an hour of training."""
    for stage in ("train", "recover"):  # Ray Train stages
        if stage in stages:
            t = getattr(cfg, stage)
            wait_for_resources(
                cfg,
                t.workers * t.threads_per_worker,
                t.workers if t.use_gpu else 0,
                f"{stage}.workers × {stage}.threads_per_worker"
                + (f" ({stage}.use_gpu: one GPU each)" if t.use_gpu else ""),
            )
    if "compress" in stages:
        wait_for_resources(cfg, cfg.compress.workers, 0, "compress.workers (one CPU each)")


def wait_for_resources(cfg: PressoConfig, cpus: float, gpus: float, asked_by: str) -> None:
    """Wait up to ``ray.resources_timeout_s`` until the cluster holds ``cpus`` and ``gpus`` in
    all (an autoscaler may add nodes); a local Ray cannot grow, so it is refused at once.
    Without this check Ray waits forever for resources that will never come."""
    import ray

    local = ray_address(cfg) is None
    deadline = time.monotonic() + (0 if local else cfg.ray.resources_timeout_s)
    while True:
        total = ray.cluster_resources()
        have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
        if have_cpus >= cpus and have_gpus >= gpus:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    waited = "" if local else f" after {cfg.ray.resources_timeout_s:g} s (ray.resources_timeout_s)"
    raise ClusterError(
        f"{asked_by}: asks for {cpus:g} CPUs and {gpus:g} GPUs, but the Ray cluster has "
        f"{have_cpus:g} CPUs and {have_gpus:g} GPUs{waited}; ask for less or use a larger cluster"
    )
