"""MLflow tracking: one parent run per pipeline, one nested run per stage.

Everything is logged through :class:`RunLogger`, a small picklable handle that the driver and Ray
Train's rank-0 worker both use, so every process logs the same way — and, if the tracking server
goes away mid-run, spools the same way (see ``delivery.py``): the run still finishes, and what
MLflow missed is replayed when the pipeline ends or by ``presso mlflow sync``.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from pathlib import Path

import presso
from presso import ConfigError
from presso.orchestrator.config import PressoConfig, flatten, to_dict, to_yaml
from presso.orchestrator.delivery import Link, settle
from presso.orchestrator.model_registry import Registered
from presso.orchestrator.spool import new_local_id

_PARAM_LIMIT = 6000  # MLflow's longest param value
_TAG_LIMIT = 5000  # well inside MLflow's longest tag value
ERROR_TAG = "presso.error"
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000  # MLflow's log_batch limits
# The experiment type MLflow's UI reads (mlflow 3's `mlflow.experimentKind`): without it, a new
# experiment opens on the GenAI overview; "custom_model_development" opens the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def resolve_uri(cfg: PressoConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store under run.output_dir.

    Not that store in a job submitted to a Ray cluster whose run.output_dir is relative: it
    would sit in the job's temporary working directory and go with it, unless the submitter
    said it wants that (``presso submit --tracking local-to-job`` sets $PRESSO_TRACKING)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    submitted = _ray_submission_id()
    if (
        submitted
        and not Path(cfg.run.output_dir).is_absolute()
        and os.environ.get("PRESSO_TRACKING") != "local-to-job"
    ):
        raise ConfigError(
            f"tracking: this is Ray job {submitted} with no MLFLOW_TRACKING_URI or tracking.uri; "
            "its sqlite store would be in the job's temporary working directory, lost when it "
            "ends. Give the job a tracking server (`presso submit --tracking URI`, or the env "
            "var in its runtime env), or accept that with PRESSO_TRACKING=local-to-job"
        )
    return f"sqlite:///{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}"


def spool_dir(cfg: PressoConfig) -> Path:
    """Where one pipeline execution spools what MLflow could not take (created on first use)."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return Path(cfg.run.output_dir).resolve() / cfg.run.name / "mlflow-spool" / stamp


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunLogger:
    """Logs metrics, params and files to one MLflow run (to the spool while MLflow is away)."""

    def __init__(self, uri: str, run_id: str, spool: str | Path | None = None) -> None:
        self.link, self.run_id = Link(uri, spool), run_id
        self.finished = False

    @property
    def uri(self) -> str:
        return self.link.uri

    def send(self, kind: str, **fields) -> str | Registered | None:
        return self.link.send({"kind": kind, "run": self.run_id, **fields})

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = _now_ms()
        batch = [[k, float(v), now, step] for k, v in values.items()]
        for i in range(0, len(batch), _METRICS_PER_BATCH):
            self.send("metrics", metrics=batch[i : i + _METRICS_PER_BATCH])

    def params(self, values: dict) -> None:
        items = [(k, str(v)[:_PARAM_LIMIT]) for k, v in values.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.send("params", params=dict(items[i : i + _PARAMS_PER_BATCH]))

    def tags(self, values: dict[str, str]) -> None:
        self.send("tags", tags={k: str(v) for k, v in values.items()})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under ``artifact_path``."""
        self.send("file", path=str(path), artifact_path=artifact_path)

    def text(self, text: str, name: str, artifact_path: str | None = None) -> None:
        self.send("text", name=name, text=text, artifact_path=artifact_path)

    def history(self, key: str) -> list[tuple[int, float]]:
        return self.link.history(self.run_id, key)

    def finish(self, ok: bool = True) -> None:
        self.send("end", status="FINISHED" if ok else "FAILED", end_time=_now_ms())
        self.finished = True

    def fail(self, error: BaseException) -> None:
        """End the run FAILED, with the error as the tag ``presso.error``."""
        self.tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:_TAG_LIMIT]})
        self.finish(ok=False)


class _PipelineRun(RunLogger):
    """The parent run: it finishes last, so finishing it also settles the spool."""

    def finish(self, ok: bool = True) -> None:
        super().finish(ok)
        settle(self.link)


def _git_commit() -> str | None:
    """The commit of the running code: git's, in a checkout; else $PRESSO_GIT_COMMIT, which the
    image records from its build argument GIT_COMMIT (an image holds no .git)."""
    root = Path(presso.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or os.environ.get("PRESSO_GIT_COMMIT", "").strip() or None


def _ray_submission_id() -> str | None:
    """The id of the Ray job this driver runs as: Ray's job supervisor hands the driver its
    job config, submission id included, in this variable."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def run_tags() -> dict[str, str]:
    """Who ran what: presso's version, git commit, user, and the Ray submission id if any."""
    tags = {"presso.version": presso.__version__, "mlflow.source.name": "presso"}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        pass
    if submission := _ray_submission_id():
        tags["ray.submission_id"] = submission
    return tags


class Tracking:
    """The MLflow experiment of a job, and the runs of one pipeline execution in it."""

    def __init__(self, cfg: PressoConfig) -> None:
        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        self.link = Link(self.uri, spool_dir(cfg))
        self.link.retry()
        location = None
        if self.uri.startswith("sqlite:"):  # a local store keeps artifacts beside it
            location = (Path(cfg.run.output_dir).resolve() / "mlartifacts").as_uri()
        name = cfg.tracking.experiment or cfg.run.name
        self.experiment_id = self._create(
            "experiment", name=name, artifact_location=location, tags=EXPERIMENT_TAGS
        )
        self.parent: RunLogger | None = None
        self.stages: list[RunLogger] = []

    def _create(self, kind: str, **fields) -> str:
        """The id of a new experiment or run: MLflow's, or a local one while it is away."""
        record = {"kind": kind, "id": new_local_id(), **fields}
        return self.link.send(record) or record["id"]

    def _run(self, name: str, tags: dict[str, str], cls: type[RunLogger] = RunLogger):
        run_id = self._create(
            "run", experiment=self.experiment_id, name=name, tags=tags, start_time=_now_ms()
        )
        return cls(self.uri, run_id, self.link.spool.root)

    def start(self) -> RunLogger:
        """The parent run, with the resolved config as params and as a YAML artifact."""
        self.parent = self._run(self.cfg.run.name, run_tags(), _PipelineRun)
        self.parent.params(flatten(to_dict(self.cfg)))
        self.parent.text(to_yaml(self.cfg), "config.yaml")
        return self.parent

    def stage(self, name: str) -> RunLogger:
        """A nested run for one stage of the pipeline."""
        run = self._run(name, {"mlflow.parentRunId": self.parent.run_id, "presso.stage": name})
        self.stages.append(run)
        return run

    def finish(self, error: BaseException | None = None) -> None:
        """End the pipeline: on an error, every stage run still open and the parent end FAILED
        with the error as a tag, so no run of a failed pipeline stays RUNNING."""
        if error is None:
            self.parent.finish()
            return
        for run in self.stages:
            if not run.finished:
                run.fail(error)
        self.parent.fail(error)

    def summary(self, summary: dict) -> None:
        self.parent.text(json.dumps(summary, indent=1, default=str), "summary.json")
        numeric = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        self.parent.metrics(numeric, step=0)


def register_model(
    logger: RunLogger, artifact: Path, name: str, perplexity: float | None = None
) -> Registered:
    """Log the packed ``artifact`` to the run as a pyfunc model and register it under ``name``.

    The new version gets the alias ``candidate`` and, as a tag, its test ``perplexity``; it takes
    ``champion`` if ``registry.promotes`` says so. While MLflow is away the registration is
    spooled (and the policy applied on replay): the result then has no version.
    """
    ppl = None if perplexity is None else float(perplexity)
    result = logger.send("register", path=str(artifact), name=name, ppl=ppl)
    return result if isinstance(result, Registered) else Registered(None, False)


def plot_curves(logger: RunLogger, keys: list[str], title: str, filename: str) -> None:
    """A PNG of the metric histories ``keys`` of ``logger``'s run, logged to that run."""
    from presso.orchestrator.plots import plot_series

    plot_series(logger, {key: logger.history(key) for key in keys}, title, filename)
