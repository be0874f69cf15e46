"""One registry pattern: every selectable component is listed with its settings and builds."""

import re
from pathlib import Path

import pytest
from torch import nn

from presso import ConfigError
from presso.compressors.optim import OptimizerConfig, build_optimizer
from presso.compressors.registry import catalogue


def test_catalogue_lists_every_kind_with_settings_and_descriptions():
    entries = catalogue()
    names = {kind: [e.name for e in found] for kind, found in entries.items()}
    assert {"gptq", "awq", "sparsegpt", "lowrank"} <= set(names["algorithm"])
    assert {"pack-quantized", "presso-lowrank"} <= set(names["stored format"])
    assert names["gradient family"] == ["powersgd", "topk", "quant"]
    assert {"none", "uniform", "lgreco", "torch_powersgd", "galore"} == set(
        names["gradient method"]
    )
    assert {"adamw", "galore", "galore_torch"} <= set(names["optimizer"])
    assert all(e.description for found in entries.values() for e in found)
    gptq = {s.name: s for s in next(e for e in entries["algorithm"] if e.name == "gptq").settings()}
    assert gptq["bits"].type == "int" and gptq["bits"].default == 4
    powersgd = entries["gradient family"][0].settings()
    assert [(s.name, s.default) for s in powersgd] == [
        ("rank", 4),
        ("rank_candidates", [1, 2, 4, 8, 16, 32]),
    ]


def test_the_galore_torch_peer_is_selectable():
    """bench/optim.py's peer row runs through train.optimizer.name: galore_torch."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    cfg = OptimizerConfig(name="galore_torch", rank=2)
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="galore-torch"):
            build_optimizer(cfg, model)
    else:
        assert type(build_optimizer(cfg, model)).__module__.startswith("galore_torch")


def test_readme_catalogue_is_the_registries():
    """The README's algorithm table names exactly the registered components (formats aside)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Algorithms", 1)[1].split("\n\n", 2)[1]
    named = set()
    for row in table.splitlines()[2:]:
        named |= {n.split(": ")[-1] for n in re.findall(r"`([^`]+)`", row.split("|")[3])}
    registered = {
        e.name for kind, found in catalogue().items() if kind != "stored format" for e in found
    }
    assert named == registered
