"""Where a run's durable files live: ``run.storage``.

Empty (the default) means ``run.output_dir`` — one folder for everything, which on a cluster of
more than one node must be mounted by every node (checked by ``cluster.check_shared``). Otherwise
``run.storage`` is a folder every node mounts (NFS, CephFS, EFS, ...) or a URI that
``pyarrow.fs`` opens (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file://...``),
exactly what Ray Train's own ``storage_path`` accepts. Ray Train writes the checkpoints of
``train`` and ``recover`` there from whichever node a worker runs on; the driver keeps its
working copy of the run under ``run.output_dir`` (node-local scratch) and copies the finished
folder — trained model, artifact, summary, MLflow spool — to ``<run.storage>/<run.name>``.

S3-compatible servers are reached the way every AWS tool reaches them: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` in the environment of the driver
and of every Ray node.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def run_folder(storage: str, output_dir: str, name: str) -> str:
    """The durable folder of the run ``name``: ``<run.storage or run.output_dir>/<name>``,
    local paths made absolute (the workers may start in another working directory)."""
    base = storage or output_dir
    if is_uri(base):
        return f"{base.rstrip('/')}/{name}"
    return str(Path(base).resolve() / name)


def _fs(location: str):
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def check_writable(location: str) -> None:
    """Write and delete a probe under ``location`` (a bad bucket, wrong credentials or an
    unreachable endpoint fail here, before any worker starts); raises OSError with the cause."""
    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    probe = f"{path}/.presso-probe-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as f:
        f.write(b"presso")
    fs.delete_file(probe)


def is_dir(location: str | Path) -> bool:
    import pyarrow.fs

    fs, path = _fs(str(location))
    return fs.get_file_info(path).type == pyarrow.fs.FileType.Directory


def subfolders(location: str, pattern_prefix: str, depth: int) -> list[str]:
    """Folders whose name starts with ``pattern_prefix``, 1 to ``depth`` levels below
    ``location``; returned spelled like ``location`` (URI or path)."""
    import pyarrow.fs

    fs, path = _fs(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=depth > 1))
    found = []
    for info in infos:
        relative = info.path[len(path) :].strip("/")
        if (
            info.type == pyarrow.fs.FileType.Directory
            and relative.count("/") < depth
            and info.base_name.startswith(pattern_prefix)
        ):
            found.append(f"{str(location).rstrip('/')}/{relative}")
    return found


def upload(local: Path, location: str) -> None:
    """Copy the folder ``local`` to ``location``, replacing what files of the same name hold."""
    import pyarrow.fs

    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """``location`` as a local folder: itself if it is one, else a temporary download."""
    if not is_uri(location):
        yield Path(location)
        return
    import pyarrow.fs

    fs, path = _fs(str(location))
    with tempfile.TemporaryDirectory(prefix="presso-fetch-") as tmp:
        pyarrow.fs.copy_files(path, tmp, source_filesystem=fs)
        yield Path(tmp)
