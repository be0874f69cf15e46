"""A training worker and a compression actor die in the same run: the run must still end with the
artifact, the training resumed from its last checkpoint and the dead actor's layers redone by a
live one. (That the results are bit-identical to an undisturbed run is shown at the API level by
tests/integration/test_resume.py and test_compress_pool.py; here it is the CLI a user runs.)"""

import pytest

from presso.compressors.formats.integrity import verify_manifest

from .common import TINY, cli_env, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_killed_workers_are_replaced_and_the_run_finishes(mlflow_server, tmp_path):
    env = cli_env(
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        PRESSO_INJECT_FAULT="1:3",  # rank 1 dies at step 3, after the checkpoint at step 2
        PRESSO_INJECT_COMPRESS_FAULT="0:1",  # compression worker 0 dies after one layer
    )
    args = [
        *TINY, "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "compress.recipe=[{gptq: {bits: 4, group_size: 32}}]", "compress.workers=2",
        "run.name=workers-killed", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    proc = run("run", "jobs/quickstart.yaml", *args, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "fault injection: killing rank 1 at step 3" in out
    assert "resumed from the checkpoint at step 2" in out
    assert "compression worker 0 died" in out
    verify_manifest(tmp_path / "workers-killed" / "compressed")
