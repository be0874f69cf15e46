"""Checksums and atomic writes for everything presso stores: artifacts, checkpoints, caches.

A folder is written under a temporary name beside its destination, gets a ``manifest.json``
listing the sha256 and size of every file, and is renamed into place. A reader verifies the
manifest first, so a partial, truncated or tampered folder is refused, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from presso import IntegrityError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in files
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_manifest(folder: Path, what: str = "artifact") -> None:
    """Raise IntegrityError unless every file the manifest lists is present and unchanged."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise IntegrityError(f"{what} {folder}: no {MANIFEST}; it is incomplete, write it again")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise IntegrityError(f"{what} {folder}: unreadable {MANIFEST} ({e})") from e
    for rel, entry in entries.items():
        p = folder / rel
        if not p.is_file():
            raise IntegrityError(f"{what} {folder}: {rel} is missing; write the {what} again")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise IntegrityError(
                f"{what} {folder}: {rel} does not match its checksum (truncated or modified); "
                f"refusing to load it — write the {what} again"
            )


@contextlib.contextmanager
def sealed_folder(dest: Path):
    """Write a folder under a temporary name beside ``dest``; on success seal it with a manifest
    and rename it into place (replacing an older ``dest``), on failure remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        write_manifest(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; the result is an ordinary folder
        replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``, replacing an older ``dest``; ``dest`` is never half-written."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
