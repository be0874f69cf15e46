"""The plot helpers the stages call: each draws plain data into a PNG logged under plots/."""

import shutil
from pathlib import Path

import matplotlib.image
import pytest

from presso.orchestrator.plots import (
    plot_bytes_per_step,
    plot_layer_choices,
    plot_ppl_vs_bits,
    plot_series,
)


class FakeRun:
    """Stands in for a RunLogger: keeps a copy of every file logged, by artifact path."""

    def __init__(self, root: Path) -> None:
        self.root, self.logged = root, {}

    def artifact(self, path, artifact_path=None):
        dest = self.root / (artifact_path or "") / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        self.logged[f"{artifact_path}/{Path(path).name}"] = dest


def image(run: FakeRun, name: str):
    """The logged PNG as pixels; a figure with nothing drawn would be one flat colour."""
    pixels = matplotlib.image.imread(run.logged[f"plots/{name}"])
    assert pixels.std() > 0.05, f"{name} looks blank"
    return pixels


def test_each_helper_logs_one_png(tmp_path):
    run = FakeRun(tmp_path)
    plot_series(run, {"train": [(2, 3.0), (1, 4.0)], "val": [(0, 5.0), (2, 2.5)]}, "loss", "l.png")
    plot_bytes_per_step(run, [1, 2, 3], [100.0, 120.0, 90.0], dense=[4000.0] * 3)
    plot_layer_choices(run, ["q", "k", "v"], [10, 20], [[4, 8], [2, 2], [16, 8]])
    plot_ppl_vs_bits(run, {"rtn": [(4.25, 30.0), (3.25, 90.0)]}, dense_ppl=20.0)
    assert set(run.logged) == {
        "plots/l.png",
        "plots/bytes_per_step.png",
        "plots/layer_choices.png",
        "plots/ppl_vs_bits.png",
    }
    for name in run.logged:
        assert image(run, name.removeprefix("plots/")).shape[2] in (3, 4)


def test_heat_map_grows_with_its_data(tmp_path):
    """Hundreds of layers or steps must stay legible: the figure grows instead of cramming."""
    run = FakeRun(tmp_path)
    plot_layer_choices(run, ["a", "b"], [1, 2], [[1, 2], [3, 4]], filename="small.png")
    layers = [f"layers.{i}.mlp" for i in range(60)]
    steps = list(range(0, 400, 10))
    plot_layer_choices(
        run, layers, steps, [[i + s for s in steps] for i in range(60)], "bits", "big.png"
    )
    small, big = image(run, "small.png"), image(run, "big.png")
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_heat_map_refuses_a_ragged_table(tmp_path):
    """A table that does not match its labels would silently mislabel layers."""
    with pytest.raises(ValueError, match="2 layers × 3 steps"):
        plot_layer_choices(FakeRun(tmp_path), ["a", "b"], [1, 2, 3], [[1, 2, 3], [1, 2]])
