"""What every fault test shares: the tiny job, the CLI as a subprocess, and the checks that a
failure left nothing half-written that looks finished."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from presso.compressors.formats.integrity import verify_manifest

PRESSO = str(Path(sys.executable).parent / "presso")
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "train.batch_size=2",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=1",
    "model.scratch.intermediate_size=128",
    "compress.recipe=[{rtn: {bits: 4, group_size: 32}}]",
    "eval.seq_len=64",
    "eval.max_tokens=2048",
]


def cli_env(**extra: str) -> dict[str, str]:
    """The user's environment: a local Ray of presso's own, and ``extra`` (tracking, fault hooks)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PRESSO_INJECT"))
    }
    return {**env, **extra}


def start(*args: str, env: dict) -> subprocess.Popen:
    """``presso ARGS`` in a session of its own (so the test can kill it and its local Ray)."""
    return subprocess.Popen(
        [PRESSO, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def run(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PRESSO, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session, as a lost machine would."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def error_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("presso: error")]
    return line


def assert_no_unsealed_artifact(run_folder: Path) -> None:
    """No artifact under its final name unless it is whole: a failed or killed run leaves at
    most the temporary ``.compressed.unverified``, never a ``compressed/`` that fails its
    checksums. (Checkpoints cut short are allowed: resume verifies and skips them.)"""
    compressed = run_folder / "compressed"
    if compressed.exists():
        verify_manifest(compressed)
