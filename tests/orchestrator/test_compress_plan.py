"""The compress stage's driver-side pieces, without Ray: layer plans, calibration sampling,
load balancing and the summing of shard statistics."""

import logging

import pytest
import torch

from presso import ConfigError, DataError, UnsupportedError
from presso.compressors.ptq.calibration import HessianStats, sum_shards
from presso.compressors.ptq.recipe import Recipe
from presso.orchestrator import compress
from presso.orchestrator.compress import (
    assign,
    calibration_batches,
    layer_cost,
    plan_layers,
    run_compression,
)
from presso.orchestrator.config import load_config


def test_bad_group_size_fails_before_any_worker_starts(tiny_llama, monkeypatch):
    """A group size that does not divide a layer must be refused before Ray actors start or the
    model is copied, naming the layer: the user should not wait for a pool to learn it."""

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(compress, "WorkerPool", no_pool)
    recipe = [{"awq": {"bits": 4, "group_size": 32}}, {"gptq": {"bits": 4, "group_size": 48}}]
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn\.q_proj.*48"):
        run_compression(tiny_llama, recipe, 2, ["lm_head"], calibration=[torch.zeros(1, 4)])


def test_calibrated_recipe_without_data_is_refused(tiny_llama, monkeypatch):
    monkeypatch.setattr(compress, "WorkerPool", None)
    with pytest.raises(DataError, match="calibration"):
        run_compression(tiny_llama, [{"gptq": {"group_size": 32}}], 2, ["lm_head"])


def test_plan_lists_block_linears_and_honours_ignore(tiny_llama):
    recipe = Recipe.parse([{"rtn": {"group_size": 32}}])
    plan = plan_layers(tiny_llama, recipe, ["lm_head", "mlp.down_proj"])
    assert [p for p, _ in plan.blocks] == ["model.layers.0", "model.layers.1"]
    assert len(plan.names) == 12 and not any("down_proj" in n for n in plan.names)
    with pytest.raises(UnsupportedError, match="leaves no nn.Linear"):
        plan_layers(tiny_llama, recipe, ["*"])


def test_calibration_batches_are_seeded_windows_of_the_train_split():
    """The calibration set is a function of the seed alone: a rerun, or a run with another
    number of workers, must calibrate on exactly the same tokens."""
    tokens = torch.arange(1000)
    a = calibration_batches(tokens, samples=10, seq_len=16, batch_size=4, seed=3)
    b = calibration_batches(tokens, samples=10, seq_len=16, batch_size=4, seed=3)
    assert [t.shape[0] for t in a] == [4, 4, 2] and a[0].shape[1] == 16
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 16)) for w in torch.cat(a))
    c = calibration_batches(tokens, samples=10, seq_len=16, batch_size=4, seed=4)
    assert not torch.equal(a[0], c[0])
    with pytest.raises(DataError, match="seq_len 2000"):
        calibration_batches(tokens, samples=1, seq_len=2000, batch_size=1, seed=0)


def test_calibration_settings_are_validated():
    with pytest.raises(ConfigError, match="compress.calibration.shards: must be > 0"):
        load_config("jobs/quickstart.yaml", ["compress.calibration.shards=0"])
    with pytest.raises(ConfigError, match="compress.calibration.samples: expected int"):
        load_config("jobs/quickstart.yaml", ["compress.calibration.samples=many"])


def test_lpt_balances_estimated_costs():
    """The largest layer alone, the rest filling the other worker: the slowest worker bounds
    the block's solve time."""
    costs = {"down": 10, "gate": 4, "up": 4, "q": 1, "o": 1}
    assert assign(costs, 2) == [["down"], ["gate", "up", "o", "q"]]
    assert assign(costs, 1) == [["down", "gate", "up", "o", "q"]]
    w = torch.zeros(8, 32)
    assert layer_cost(w, calibrated=True) == 8 * 32 * 32 and layer_cost(w, False) == 8 * 32


def test_shard_sums_keep_shared_statistics_shared():
    """q/k/v see one input and share one statistic in a shard; the sum must stay shared (one
    Hessian shipped to the solvers, not three) and equal the sum in shard order."""
    parts = []
    for seed in range(3):
        h = HessianStats.empty(4)
        h.update(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)))
        parts.append({"q": h, "k": h, "o": HessianStats.empty(4)})
    total = sum_shards(parts)
    assert total["q"] is total["k"] and total["o"] is not total["q"]
    assert torch.equal(total["q"].xtx, (parts[0]["q"] + parts[1]["q"] + parts[2]["q"]).xtx)
    assert total["q"].count == 15


def test_unsupported_modules_are_listed_once(tiny_llama, caplog):
    """The stage plans once (in preflight) and hands the plan on, so the list appears once."""
    tiny_llama.model.layers[1].mlp.extra = torch.nn.Conv1d(4, 4, 1)  # weighted, not a Linear
    with caplog.at_level(logging.WARNING):
        plan = plan_layers(tiny_llama, Recipe.parse([{"gptq": {"group_size": 32}}]), ["lm_head"])
    lines = [r for r in caplog.records if "unsupported" in r.getMessage()]
    assert len(lines) == 1 and "model.layers.1.mlp.extra (Conv1d)" in lines[0].getMessage()
    assert len(plan.names) == 14
