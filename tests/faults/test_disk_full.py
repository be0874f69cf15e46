"""The output folder's disk fills up, once while training writes a checkpoint and once while the
compress stage writes the artifact. The user must get one line that names the cause and what to
do, exit 1, every MLflow run FAILED, no artifact that looks finished, and the checkpoints that were
sealed before the disk filled still usable for resume.

The small disk is a real tmpfs of a few hundred KiB, mounted in a user+mount namespace
(``unshare``) that only the presso process and its local Ray see; what the test inspects
afterwards is collected inside that namespace, before the mount goes away.
"""

import json
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .common import PRESSO, REPO, TINY, cli_env, error_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Run inside the namespace once presso has exited: what a user would find in the output folder.
INSPECT = """
import json, sys
from pathlib import Path
from presso import PressoError
from presso.orchestrator.checkpoint import resolve_resume
from presso.orchestrator.config import load_config
from presso.orchestrator.data import ByteTokenizer
from presso.orchestrator.models import build_scratch
run, overrides = Path(sys.argv[1]), sys.argv[2:]
report = {"left": sorted(p.name for p in run.iterdir()) if run.is_dir() else []}
if (run / "ray_train").is_dir():
    cfg = load_config("jobs/quickstart.yaml", overrides)
    model = build_scratch(cfg.model.scratch, ByteTokenizer.vocab_size, cfg.train.seq_len, cfg.run.seed)
    try:
        report["resume"] = str(resolve_resume(run / "ray_train", cfg.train.workers, model)[0])
    except PressoError as e:
        report["resume"] = f"refused: {e}"
print(json.dumps(report))
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt && touch /mnt/x"
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe]
    return subprocess.run(cmd, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(), reason="needs unprivileged user+mount namespaces (unshare) for a tmpfs"
)


def run_on_small_disk(out, size: str, name: str, args: list[str], env: dict):
    """``presso run ARGS`` with ``out`` a tmpfs of ``size``; returns (exit status, output,
    what INSPECT found in the folder of run ``name``)."""
    out.mkdir()
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "{out}" || exit 99\n'
        f'"{PRESSO}" "$@" > "{out}.log" 2>&1; echo $? > "{out}.rc"\n'
        f'shift 2; "{sys.executable}" -c "$INSPECT" "{out}/$RUN_NAME" "$@" > "{out}.json"\n'
    )
    env = {**env, "INSPECT": INSPECT, "RUN_NAME": name}
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode != 99, proc.stderr
    output = out.with_suffix(".log").read_text()
    return (
        int(out.with_suffix(".rc").read_text()),
        output,
        json.loads(out.with_suffix(".json").read_text()),
    )


def _runs_failed(uri: str, name: str, needle: str) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    assert all(needle in r.data.tags["presso.error"] for r in runs)


@needs_namespaces
def test_disk_full_while_checkpointing(mlflow_server, tmp_path):
    """Room for one checkpoint of the tiny model (1.3 MB), not two: training fails writing the second."""
    env = cli_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    args = [
        "run", "jobs/quickstart.yaml", *TINY, "train.steps=6", "train.eval_every=2",
        "train.checkpoint_every=2", "train.max_failures=0", "run.name=full-train",
        f"run.output_dir={tmp_path / 'out'}",
    ]  # fmt: skip
    code, output, left = run_on_small_disk(tmp_path / "out", "2000k", "full-train", args, env)
    assert code == 1, output[-3000:]
    error = error_line(output)
    assert "no space left on the device of" in error and "train.resume_from=" in error, error
    assert "compressed" not in left["left"] and ".compressed.unverified" not in left["left"]
    # A checkpoint sealed before the disk filled is whole; one cut short is skipped.
    assert left["resume"].startswith(str(tmp_path / "out" / "full-train" / "ray_train")), left
    _runs_failed(mlflow_server.uri, "full-train", "no space left")


@needs_namespaces
def test_disk_full_while_writing_the_artifact(mlflow_server, tmp_path, make_llama):
    """A trained model compressed onto a disk too small for its artifact: the half-written
    artifact is removed, not left under a name that looks finished."""
    from presso.orchestrator.data import ByteTokenizer

    model = tmp_path / "model"
    make_llama(vocab_size=256, num_layers=1, tied=False).save_pretrained(model)
    ByteTokenizer().save_pretrained(model)
    env = cli_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    args = [
        "run", "jobs/quickstart.yaml", *TINY, "train.enabled=false", f"model.source={model}",
        "run.name=full-artifact", f"run.output_dir={tmp_path / 'out'}",
    ]  # fmt: skip
    code, output, left = run_on_small_disk(tmp_path / "out", "64k", "full-artifact", args, env)
    assert code == 1, output[-3000:]
    assert "presso: error: no space left on device" in error_line(output)
    assert "compressed" not in left["left"] and ".compressed.unverified" not in left["left"]
    assert not any(name.startswith(".compressed") for name in left["left"]), left
    _runs_failed(mlflow_server.uri, "full-artifact", "No space left")
