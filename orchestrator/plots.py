"""PNG plots a stage logs to its MLflow run, drawn from plain data (lists and dicts).

Each function draws one figure and logs it under ``plots/`` of ``logger``'s run (any object with
``artifact(path, artifact_path)``, normally a :class:`~presso.orchestrator.tracking.RunLogger`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402

Points = list[tuple[float, float]]


def log_figure(logger, fig, filename: str) -> None:
    """Save ``fig`` as a PNG, log it to ``plots/filename`` of the run, and free it."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fig.savefig(Path(tmp) / filename, dpi=100, bbox_inches="tight")
            logger.artifact(Path(tmp) / filename, "plots")
    finally:
        plt.close(fig)


def plot_series(
    logger,
    series: dict[str, Points],
    title: str,
    filename: str,
    xlabel: str = "step",
    ylabel: str = "",
    log_y: bool = False,
    markers: bool = False,
    baseline: tuple[str, float] | None = None,
    points_only: dict[str, str] | None = None,
) -> None:
    """One line per ``series`` entry (label → ``(x, y)`` points, in any order); ``baseline``
    draws a labelled horizontal reference line; series named in ``points_only`` (label →
    matplotlib marker) are markers without a line (points that are not a curve)."""
    points_only = points_only or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            style = {"marker": "o" if markers else None}
            if label in points_only:
                style = {"linestyle": "none", "marker": points_only[label], "markersize": 9}
            ax.plot(xs, ys, label=label, **style)
    if baseline is not None:
        ax.axhline(baseline[1], color="gray", linestyle="--", label=baseline[0])
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    log_figure(logger, fig, filename)


def plot_bytes_per_step(
    logger,
    steps: list[int],
    sent: list[float],
    dense: list[float] | None = None,
    filename: str = "bytes_per_step.png",
) -> None:
    """Bytes each worker sent per step, against what a dense all-reduce would have sent."""
    series = {"sent": list(zip(steps, sent, strict=True))}
    if dense is not None:
        series["dense all-reduce"] = list(zip(steps, dense, strict=True))
    plot_series(logger, series, "communication per step", filename, ylabel="bytes", log_y=True)


def plot_layer_choices(
    logger,
    layers: list[str],
    steps: list[int] | list[str],
    choices: list[list[float]],
    label: str = "rank",
    filename: str = "layer_choices.png",
    xlabel: str = "step",
) -> None:
    """A heat map of the per-layer parameter (rank, density, bits) chosen over time:
    ``choices[i][j]`` is layer ``layers[i]``'s choice at ``steps[j]`` (columns may be any
    labelled axis, named by ``xlabel``)."""
    if len(choices) != len(layers) or any(len(row) != len(steps) for row in choices):
        raise ValueError(
            f"choices must be {len(layers)} layers × {len(steps)} steps, "
            f"got {len(choices)} × {sorted({len(row) for row in choices})}"
        )
    fig, ax = plt.subplots(figsize=(max(6, len(steps) * 0.4), max(3, len(layers) * 0.25)))
    image = ax.imshow(choices, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 20 else 9)
    stride = max(1, len(steps) // 12)  # at most a dozen step labels stay readable
    ax.set_xticks(range(0, len(steps), stride), [str(s) for s in steps[::stride]])
    ax.set(title=f"per-layer {label}", xlabel=xlabel)
    fig.colorbar(image, ax=ax, label=label)
    log_figure(logger, fig, filename)


def plot_ppl_vs_bits(
    logger,
    results: dict[str, Points],
    dense_ppl: float | None = None,
    filename: str = "ppl_vs_bits.png",
) -> None:
    """Test perplexity against average bits per weight: ``results`` maps a method to its
    ``(bits, perplexity)`` points; ``dense_ppl`` is the uncompressed model's reference line."""
    plot_series(
        logger,
        results,
        "perplexity vs bits",
        filename,
        xlabel="average bits per weight",
        ylabel="test perplexity",
        log_y=True,
        markers=True,
        baseline=None if dense_ppl is None else ("dense", dense_ppl),
    )
