"""The recover stage as a user runs it: `presso run` on the tiny quickstart model with recovery on,
then the same run with a recover worker killed mid-way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import presso

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

PRESSO = str(Path(sys.executable).parent / "presso")
# Trained just long enough to predict something, then quantized to 2 bits: a model that KD
# can measurably bring back in a few steps.
TINY = [
    "train.steps=30",
    "train.eval_every=30",
    "train.checkpoint_every=30",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=1",
    "model.scratch.intermediate_size=128",
    "compress.recipe=[{rtn: {bits: 2, group_size: 32, symmetric: false}}]",
    "eval.seq_len=64",
    "eval.max_tokens=2048",
    "recover.enabled=true",
    "recover.steps=8",
    "recover.eval_every=4",
    "recover.checkpoint_every=2",
    "recover.batch_size=4",
    "recover.seq_len=32",
    "recover.eval_batches=1",
    "recover.warmup_steps=0",
    "recover.optimizer.lr=3e-3",
    "tracking.register=false",
]


def _run(out: Path, fault: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    if fault:
        env["PRESSO_INJECT_RECOVER_FAULT"] = fault
    proc = subprocess.run(
        [PRESSO, "run", "jobs/quickstart.yaml", *TINY, f"run.output_dir={out}"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "quickstart" / "summary.json").read_text())


def test_recover_stage_improves_keeps_format_and_survives_a_killed_worker(tmp_path):
    """One clean run: recovery lowers the val perplexity, so the recovered artifact is kept,
    reported in its own column and nested MLflow run, and loads as the same packed format with
    the recovery recorded. A second run whose rank 1 dies at recover step 3 restarts from the
    step-2 checkpoint and ends bit-identical to the clean one."""
    proc, clean = _run(tmp_path / "clean")
    print(proc.stdout[-1500:])
    assert clean["recovery_kept"] is True, clean
    assert clean["recover_val_ppl_after"] < clean["recover_val_ppl_before"]
    assert "recovered" in proc.stdout and "recover: 8 steps" in proc.stdout
    assert clean["recovered_ppl"] < clean["compressed_ppl"], "KD helped on val but not on test"

    artifact = Path(clean["artifact"])
    config = json.loads((artifact / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["presso"]["recovery"]["steps"] == 8
    assert config["presso"]["recovery"]["learn"] == ["scales", "norms", "sparse_values"]
    presso.load_compressed(artifact)

    client = MlflowClient(f"sqlite:///{tmp_path / 'clean' / 'mlflow.db'}")
    (experiment,) = [client.get_experiment_by_name("quickstart")]
    runs = client.search_runs([experiment.experiment_id])
    (recover,) = [r for r in runs if r.data.tags.get("presso.stage") == "recover"]
    assert recover.info.status == "FINISHED" and "mlflow.parentRunId" in recover.data.tags
    kd = client.get_metric_history(recover.info.run_id, "recover/kd_loss")
    assert sorted(m.step for m in kd) == list(range(1, 9))
    metrics = recover.data.metrics
    assert metrics["recover/val_ppl_after"] < metrics["recover/val_ppl_before"]
    assert metrics["recover/replicas_identical"] == 1.0
    plots = {a.path for a in client.list_artifacts(recover.info.run_id, "plots")}
    assert "plots/kd_loss.png" in plots

    _, resumed = _run(tmp_path / "faulty", fault="1:3")
    assert len(list((tmp_path / "faulty").rglob("fault-rank1-step3"))) == 1, "no fault injected"
    assert resumed["recover_val_ppl_after"] == clean["recover_val_ppl_after"]
    a, b = (load_file(Path(s["artifact"]) / "model.safetensors") for s in (clean, resumed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
