"""MLflow tracking: one parent run per pipeline, one nested run per stage.

Everything is logged through :class:`RunLogger`, a small picklable handle ``(uri, run_id)`` that
the driver and Ray Train's rank-0 worker both use, so every process logs the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import presso
from presso.orchestrator.config import PressoConfig, flatten, to_dict, to_yaml

_PARAM_LIMIT = 6000  # MLflow's longest param value


def resolve_uri(cfg: PressoConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store under run.output_dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class RunLogger:
    """Logs metrics, params and files to one MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def __getstate__(self):  # the client holds connections; rebuild it in the receiving process
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def tags(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, str(v))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_text(text)
            self.artifact(Path(tmp) / name)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _git_commit() -> str | None:
    root = Path(presso.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class Tracking:
    """The MLflow experiment of a job, and the runs of one pipeline execution in it."""

    def __init__(self, cfg: PressoConfig) -> None:
        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        self.client = _client(self.uri)
        name = cfg.tracking.experiment or cfg.run.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            location = None
            if self.uri.startswith("sqlite:"):  # a local store keeps artifacts beside it
                location = (Path(cfg.run.output_dir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        self.parent: RunLogger | None = None

    def start(self) -> RunLogger:
        """The parent run, with the resolved config as params and as a YAML artifact."""
        tags = {"presso.version": presso.__version__}
        if commit := _git_commit():
            tags["git.commit"] = commit
        if submission := os.environ.get("RAY_JOB_SUBMISSION_ID"):
            tags["ray.submission_id"] = submission
        run = self.client.create_run(self.experiment_id, run_name=self.cfg.run.name, tags=tags)
        self.parent = RunLogger(self.uri, run.info.run_id)
        self.parent.params(flatten(to_dict(self.cfg)))
        self.parent.text(to_yaml(self.cfg), "config.yaml")
        return self.parent

    def stage(self, name: str) -> RunLogger:
        """A nested run for one stage of the pipeline."""
        tags = {"mlflow.parentRunId": self.parent.run_id, "presso.stage": name}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return RunLogger(self.uri, run.info.run_id)

    def summary(self, summary: dict) -> None:
        self.parent.text(json.dumps(summary, indent=1, default=str), "summary.json")
        numeric = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        self.parent.metrics(numeric, step=0)


def register_model(logger: RunLogger, artifact: Path, name: str) -> str:
    """Log the packed ``artifact`` to the run as a pyfunc model and register it under ``name``;
    the new version gets the alias ``candidate``. Returns the version."""
    import mlflow

    import presso.orchestrator.mlflow_model as model_code

    mlflow.set_tracking_uri(logger.uri)
    with mlflow.start_run(run_id=logger.run_id):
        info = mlflow.pyfunc.log_model(
            name="compressed-model",
            python_model=model_code.__file__,
            artifacts={"packed": str(artifact)},
            registered_model_name=name,
            pip_requirements=[f"presso=={presso.__version__}"],
        )
    version = str(info.registered_model_version)
    logger.client.set_registered_model_alias(name, "candidate", version)
    return version


def plot_curves(logger: RunLogger, keys: list[str], title: str, filename: str) -> None:
    """A PNG of the metric histories ``keys`` of ``logger``'s run, logged to that run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = sorted(logger.history(key))
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / filename, dpi=100, bbox_inches="tight")
        logger.artifact(Path(tmp) / filename, "plots")
    plt.close(fig)
