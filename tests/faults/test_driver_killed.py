"""The driver (``presso run`` and the local Ray it started) is killed mid-training, as a lost
machine would be, and the newest checkpoint it left is damaged as well. ``train.resume_from``
pointed at the folder the run named must skip the damaged checkpoint, continue from the one
before it and finish with a sealed artifact; the killed run must leave no artifact that looks
finished."""

import re
import time

import pytest

from presso.compressors.formats.integrity import verify_manifest

from .common import TINY, assert_no_unsealed_artifact, cli_env, kill_session, run, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

STEPS = 300  # far more than the killed run reaches; the resumed run trains the rest


def _newest_checkpoints(ray_train, n):
    found = [p for p in ray_train.glob("*/checkpoint_*") if p.is_dir()]
    return sorted(found, key=lambda p: p.name)[-n:]


def test_killed_driver_resumes_from_the_newest_whole_checkpoint(tmp_path):
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = [*TINY, "train.eval_every=2", "train.checkpoint_every=2", "run.name=driver-killed"]
    common.append(f"run.output_dir={tmp_path}")
    ray_train = tmp_path / "driver-killed" / "ray_train"
    proc = start("run", "jobs/quickstart.yaml", *common, f"train.steps={STEPS}", env=env)
    try:
        deadline = time.monotonic() + 240
        while len(_newest_checkpoints(ray_train, 2)) < 2:  # two checkpoints, then the kill
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no two checkpoints within 240 s"
            time.sleep(0.2)
    finally:
        kill_session(proc)
    # Ray's worker processes outlive the driver by a moment (until they notice their raylet is
    # gone) and may still seal a checkpoint: wait until the folder is still.
    seen, still_since = None, time.monotonic()
    while time.monotonic() - still_since < 5:
        now = [p.name for p in _newest_checkpoints(ray_train, 10)]
        if now != seen:
            seen, still_since = now, time.monotonic()
        time.sleep(0.5)
    assert_no_unsealed_artifact(tmp_path / "driver-killed")
    assert not (tmp_path / "driver-killed" / "compressed").exists()

    # The newest checkpoint is damaged (cut short); resume must fall back to an older one.
    newest = _newest_checkpoints(ray_train, 1)[0]
    (newest / "rank0").mkdir(exist_ok=True)  # it may be cut short already
    (newest / "rank0" / "engine.pt").write_bytes(b"cut short")
    resumed = run(
        "run", "jobs/quickstart.yaml", *common, f"train.steps={STEPS}",
        "train.eval_every=100", "train.checkpoint_every=100", f"train.resume_from={ray_train}",
        env=env,
    )  # fmt: skip
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-6000:]
    assert f"skipping a damaged checkpoint: checkpoint {newest}/rank0" in out
    step = int(re.search(r"resumed from the checkpoint at step (\d+)", out).group(1))
    assert step >= 2 and step % 2 == 0
    verify_manifest(tmp_path / "driver-killed" / "compressed")
