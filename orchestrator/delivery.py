"""How tracking records reach MLflow: at once while the server answers, else through the spool.

Every logging call is a *record*, a small JSON-able dict that :func:`apply` sends to MLflow.
A :class:`Link` applies each record at once; once a call finds the server unreachable, that
process stops calling it and appends every further record to the pipeline's spool (``spool.py``).
:func:`sync` — ``presso mlflow sync``, also tried when a pipeline ends — replays the spool through
the same :func:`apply`, so a replayed run holds what the live run would have logged.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from presso import PressoError
from presso.orchestrator.model_registry import CHAMPION, Registered, log_and_register
from presso.orchestrator.spool import Spool, find_spools, is_local, metric_points

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) stall a run for minutes per call
# while the server is down; presso wants to know in seconds and spool. Users can still override.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_DOWN: set[str] = set()  # tracking URIs this process found unreachable: they get no more calls


def _client(uri: str):
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says the server is unreachable or overloaded (spool, retry later), as
    opposed to a request MLflow refuses (which a replay would only repeat)."""
    import requests
    from mlflow.exceptions import MlflowException

    transient = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
    )
    while error is not None:  # MLflow wraps the requests error as the cause or context
        if isinstance(error, transient):
            return True
        if isinstance(error, MlflowException) and error.error_code == "TEMPORARILY_UNAVAILABLE":
            return True
        error = error.__cause__ or error.__context__
    return False


def apply(client, uri: str, record: dict) -> str | Registered | None:
    """Send one record to MLflow. Returns the id an experiment or run record created, or what a
    registration did."""
    from mlflow.entities import Metric, Param, RunTag

    kind, run = record["kind"], record.get("run")
    if kind == "experiment":
        tags = record.get("tags") or {}
        found = client.get_experiment_by_name(record["name"])
        if found is None:
            return client.create_experiment(record["name"], record["artifact_location"], tags)
        for key, value in tags.items():
            if key not in found.tags:  # what the experiment already says stays
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    if kind == "run":
        created = client.create_run(
            record["experiment"], record["start_time"], record["tags"], record["name"]
        )
        return created.info.run_id
    if kind == "register":
        return log_and_register(
            client, uri, run, Path(record["path"]), record["name"], record["ppl"]
        )
    if kind == "metrics":
        client.log_batch(run, metrics=[Metric(k, v, t, s) for k, v, t, s in record["metrics"]])
    elif kind == "params":
        client.log_batch(run, params=[Param(k, v) for k, v in record["params"].items()])
    elif kind == "tags":
        client.log_batch(run, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "file":
        path = Path(record["path"])
        log = client.log_artifacts if path.is_dir() else client.log_artifact
        log(run, str(path), record["artifact_path"])
    elif kind == "text":
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / record["name"]).write_text(record["text"])
            client.log_artifact(run, str(Path(tmp) / record["name"]), record["artifact_path"])
    elif kind == "end":
        client.set_terminated(run, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")
    return None


class Link:
    """The way to one tracking URI: records go to MLflow, or to the spool once it is away."""

    def __init__(self, uri: str, spool: str | Path | None = None) -> None:
        self.uri = uri
        self.spool = Spool(spool) if spool is not None else None
        self._client = None
        # Metrics records MLflow took, kept in memory: written to the spool's journal only once
        # this process spools something, so a healthy run writes no spool file at all.
        self._sent: list[dict] = []

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @property
    def down(self) -> bool:
        return self.uri in _DOWN

    def __getstate__(self):  # the client holds connections: the receiver builds its own, and
        return {"uri": self.uri, "spool": self.spool, "down": self.down}  # learns of an outage

    def __setstate__(self, state: dict) -> None:
        self.uri, self.spool, self._client, self._sent = state["uri"], state["spool"], None, []
        if state["down"]:
            _DOWN.add(self.uri)

    def retry(self) -> None:
        """Give a server this process found down another chance (a new pipeline starts)."""
        _DOWN.discard(self.uri)

    def send(self, record: dict) -> str | Registered | None:
        """:func:`apply` ``record`` now, or spool it (and return None) if the server is away or
        the record names a run or experiment that so far exists only in the spool."""
        offline = self.down or is_local(record.get("run")) or is_local(record.get("experiment"))
        if self.spool is not None and offline:
            self._spool(record)
            return None
        try:
            result = apply(self.client, self.uri, record)
        except Exception as e:
            if self.spool is None or not is_outage(e):
                raise
            self._went_down(e)
            self._spool(record)
            return None
        if self.spool is not None and record["kind"] == "metrics":
            self._sent.append(record)
        return result

    def _spool(self, record: dict) -> None:
        """Append to the spool, with the journal of what MLflow took first (see ``_sent``)."""
        for sent in self._sent:
            self.spool.journal(sent)
        self._sent.clear()
        self.spool.append(record, self.uri)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric, by step: what MLflow holds (asked while it answers,
        else as the spool's journal remembers it), plus what waits in the spool."""
        points = None
        if not (self.down or is_local(run_id)):
            try:
                points = [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
            except Exception as e:
                if self.spool is None or not is_outage(e):
                    raise
                self._went_down(e)
        if self.spool is None:
            return points
        if points is None:  # MLflow away: what it took, as this process and the journal recall
            journal = self.spool.metric_history(run_id, key, sent=True)
            points = metric_points(self._sent, run_id, key) + journal
        else:
            points += self.spool.metric_history(run_id, key)
        return sorted(points, key=lambda p: p[0])

    def _went_down(self, error: Exception) -> None:
        _DOWN.add(self.uri)
        reason = str(error).splitlines()[0][:200]
        print(
            f"presso: mlflow: {self.uri} is unreachable ({reason}); spooling to "
            f"{self.spool.root} from now on",
            file=sys.stderr,
            flush=True,
        )


def sync(root: Path, uri: str | None = None) -> int:
    """Replay one spool to ``uri`` (default: where its records were headed); returns how many
    records it replayed. Raises PressoError, with what is left, if MLflow is still away."""
    spool = Spool(root)
    pending, uri = len(spool.pending()), uri or spool.uri
    if not pending:
        return 0
    client = _client(uri)
    try:
        done = spool.replay(lambda record: apply(client, uri, record))
    except Exception as e:
        left = len(spool.pending())
        if is_outage(e):
            raise PressoError(
                f"MLflow at {uri} is unreachable; {left} records wait in {root}. "
                f"Replay them when it is up: presso mlflow sync {root}"
            ) from None
        raise PressoError(
            f"MLflow at {uri} refused a spooled record ({str(e).splitlines()[0][:300]}); "
            f"{left} records are left in {root}"
        ) from e
    _DOWN.discard(uri)
    print(f"presso: mlflow: replayed {pending} spooled records from {root} to {uri}", flush=True)
    for record, result in done:
        if isinstance(result, Registered):
            champion = f", now {CHAMPION}" if result.champion else ""
            print(f"presso: mlflow: registered {record['name']} version {result.version}{champion}")
    return pending


def sync_all(paths: list[Path], uri: str | None = None) -> int:
    """``presso mlflow sync``: replay every spool found under ``paths``; returns the count."""
    spools = []
    for path in paths:
        if not path.exists():
            raise PressoError(f"{path}: no such folder; name a spool folder or one that holds some")
        spools += find_spools(path)
    replayed = sum(sync(root, uri) for root in spools)
    if not replayed:
        print(f"presso: mlflow: nothing to replay under {', '.join(map(str, paths))}")
    return replayed


def settle(link: Link) -> None:
    """When a pipeline ends: replay its spool if MLflow is back, else say where it waits."""
    if link.spool is None or not link.spool.pending():
        return
    try:
        sync(link.spool.root)
    except PressoError as e:
        print(f"presso: mlflow: {e}", file=sys.stderr, flush=True)
