"""The MLflow outage spool: what the tracking server could not take, kept on local disk.

A spool is a folder holding

- ``records.jsonl``: one JSON object per logging call that could not be sent, in the order it was
  made. Every process of a run appends here under a file lock: the driver and Ray Train's rank-0
  worker.
- ``files/``: copies of the files and folders those calls logged, so a later run or a cleaned
  temp folder cannot change what gets replayed.
- ``spool.json``: the tracking URI the records were meant for.
- ``state.json``: replay progress: how many records are replayed, and the real MLflow id of every
  experiment and run created while offline under a local placeholder id.
- ``sent.jsonl``: the metrics MLflow did take, never replayed: while MLflow is away they and the
  spooled ones still make a run's whole metric history (for the summary and the plots). A
  process keeps this journal in memory and writes it here once it spools its first record: a
  run that never lost its server leaves no spool at all.

Replay is resumable: each record is replayed once, in the order written, and progress is saved
after each one, so a server that fails again mid-replay costs nothing but a second ``sync``.
This module knows the file format only; what a record means to MLflow is ``tracking.apply``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

LOCAL_PREFIX = "presso-local-"
RECORDS, SENT, STATE, META = "records.jsonl", "sent.jsonl", "state.json", "spool.json"
FILES = "files"
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def new_local_id() -> str:
    """A placeholder for an experiment or run id, until replay learns the real one."""
    return LOCAL_PREFIX + uuid.uuid4().hex


def is_local(value: object) -> bool:
    return isinstance(value, str) and value.startswith(LOCAL_PREFIX)


def find_spools(path: Path) -> list[Path]:
    """``path`` itself if it is a spool, else every spool below it."""
    if (path / RECORDS).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(RECORDS))


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def uri(self) -> str | None:
        """The tracking URI the records were meant for."""
        meta = self.root / META
        return json.loads(meta.read_text())["uri"] if meta.is_file() else None

    def append(self, record: dict, uri: str) -> None:
        """Add one record; a ``path`` in it is copied into the spool first."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / META).is_file():
            _write_json(self.root / META, {"uri": uri})
        if "path" in record:
            record = {**record, "path": self._keep(Path(record["path"]))}
        self._append(RECORDS, record)

    def journal(self, record: dict) -> None:
        """Note a metrics record MLflow took (see ``sent.jsonl`` above)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._append(SENT, record)

    def _append(self, name: str, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with open(self.root / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the driver and a Ray worker may append at once
            f.write(line)

    def _read(self, name: str) -> list[dict]:
        path = self.root / name
        if not path.is_file():
            return []
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            return [json.loads(line) for line in f if line.strip()]

    def _keep(self, source: Path) -> str:
        """Copy a file or folder under ``files/``, keeping its name (MLflow logs it by name)."""
        dest = self.root / FILES / uuid.uuid4().hex[:12] / source.name
        dest.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy2(source, dest)
        return str(dest.relative_to(self.root))

    def records(self) -> list[dict]:
        return self._read(RECORDS)

    def state(self) -> dict:
        path = self.root / STATE
        return json.loads(path.read_text()) if path.is_file() else {"replayed": 0, "ids": {}}

    def pending(self) -> list[dict]:
        """The records not replayed yet."""
        return self.records()[self.state()["replayed"] :]

    def metric_history(self, run_id: str, key: str, sent: bool = False) -> list[tuple[int, float]]:
        """``(step, value)`` of the pending ``key`` metrics of one run, and the sent ones too if
        ``sent``."""
        return metric_points(self.pending() + (self._read(SENT) if sent else []), run_id, key)

    def replay(self, apply: Callable[[dict], object]) -> list[tuple[dict, object]]:
        """Send the pending records through ``apply``, with real ids and absolute paths in them.

        Returns each replayed record with what ``apply`` returned. A failure stops the replay
        with everything before it saved as done; the next call resumes there.
        """
        state = self.state()
        records = self.records()
        done = []
        for end, record in _batches(records, state["replayed"]):
            record = self._resolve(record, state["ids"])
            result = apply(record)
            if is_local(record.get("id")) and isinstance(result, str):
                state["ids"][record["id"]] = result
            state["replayed"] = end
            _write_json(self.root / STATE, state)
            done.append((record, result))
        return done

    def _resolve(self, record: dict, ids: dict[str, str]) -> dict:
        record = dict(record)
        for key in ("run", "experiment"):
            if key in record:
                record[key] = ids.get(record[key], record[key])
        if "tags" in record:  # e.g. mlflow.parentRunId naming a run created offline
            record["tags"] = {k: ids.get(v, v) for k, v in record["tags"].items()}
        if "path" in record:
            record["path"] = str(self.root / record["path"])
        return record


def metric_points(records: list[dict], run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of the ``key`` metrics of one run in ``records``."""
    return [
        (step, value)
        for r in records
        if r["kind"] == "metrics" and r["run"] == run_id
        for k, value, _, step in r["metrics"]
        if k == key
    ]


def _batches(records: list[dict], start: int) -> Iterator[tuple[int, dict]]:
    """``(index after, record)`` from ``start`` on, consecutive metrics of a run merged into one
    record of at most one log_batch: per-step records would otherwise cost a request each."""
    i = start
    while i < len(records):
        record, i = records[i], i + 1
        if record["kind"] == "metrics":
            metrics = list(record["metrics"])
            while (
                i < len(records)
                and records[i]["kind"] == "metrics"
                and records[i]["run"] == record["run"]
                and len(metrics) + len(records[i]["metrics"]) <= _METRICS_PER_BATCH
            ):
                metrics += records[i]["metrics"]
                i += 1
            record = {**record, "metrics": metrics}
        yield i, record


def _write_json(path: Path, value: dict) -> None:
    """Write atomically: a crash mid-write must not lose the replay progress."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
