"""The train stage on a tiny model, for the integration tests (the services they start — a local
Ray, an `mlflow server` — are in the root conftest)."""

import pytest

# A model and run small enough for a Ray Train stage to take well under a minute on 2 cores.
TINY_TRAIN = [
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.scratch.hidden_size=64",
    "model.scratch.num_layers=2",
    "model.scratch.intermediate_size=128",
]


@pytest.fixture
def train_stage(tmp_path, monkeypatch):
    """``train_stage(overrides, name, fault=None)`` runs the Ray Train stage of the quickstart job
    (on ``TINY_TRAIN`` plus ``overrides``) under ``tmp_path/name``; ``fault="RANK:STEP"`` kills that
    worker once. Returns the trained model folder and the stage's MLflow run."""
    from presso.orchestrator.config import load_config
    from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
    from presso.orchestrator.tracking import Tracking
    from presso.orchestrator.train import run_training

    works = load_works(None)
    corpus = build_corpus(works, split_works(works, ["hamlet"], ["macbeth"]), ByteTokenizer())

    def run(overrides, name="run", fault=None):
        out = tmp_path / name
        cfg = load_config(
            "jobs/quickstart.yaml", [*TINY_TRAIN, *overrides, f"run.output_dir={out}"]
        )
        tracking = Tracking(cfg)
        tracking.start()
        stage = tracking.stage("train")
        if fault:
            monkeypatch.setenv("PRESSO_INJECT_FAULT", fault)
        else:
            monkeypatch.delenv("PRESSO_INJECT_FAULT", raising=False)
        return run_training(cfg, corpus, ByteTokenizer.vocab_size, None, stage, out), stage

    return run
