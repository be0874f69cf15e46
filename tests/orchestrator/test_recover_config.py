"""recover.* is checked like every section: before Ray or MLflow start, naming the key."""

import pytest

from presso import ConfigError
from presso.orchestrator.config import load_config
from presso.orchestrator.pipeline import check_stages

JOB = "jobs/quickstart.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recover.stepz=3", "recover.stepz: unknown key"),
        ("recover.steps=0", "recover.steps: must be > 0, got 0"),
        ("recover.temperature=0", "recover.temperature: must be > 0"),
        ("recover.learn=[scales,codes]", "recover.learn: choose from"),
        ("recover.learn=[]", "recover.learn: choose from"),
        ("recover.optimizer.lr=-1", "recover.optimizer.lr: must be > 0"),
        ("recover.optimizer.name=galore", "recover.optimizer.name: recovery trains scales"),
        ("recover.grad_compression.method=bogus", "recover.grad_compression.method"),
    ],
)
def test_bad_recover_setting_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(JOB, [override])
    assert message in str(err.value)


def test_recovery_is_off_by_default_and_learns_the_continuous_parts():
    r = load_config(JOB).recover
    assert not r.enabled
    assert r.learn == ["scales", "norms", "sparse_values"]


def test_recovery_without_a_compress_stage_is_refused():
    """Recovery trains the artifact the compress stage makes in the same run."""
    cfg = load_config(JOB, ["recover.enabled=true"])
    with pytest.raises(ConfigError, match="recover.enabled: .* enable compress too"):
        check_stages(cfg, ("train", "recover", "eval"))


def test_a_missing_recover_checkpoint_is_refused_before_anything_starts(tmp_path):
    from presso import IntegrityError
    from presso.orchestrator.checkpoint import resolve_resume

    with pytest.raises(IntegrityError, match="recover.resume_from .*: no such checkpoint folder"):
        resolve_resume(tmp_path / "nope", 2, key="recover.resume_from")
