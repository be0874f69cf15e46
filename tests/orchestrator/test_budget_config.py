"""compress.budget in the job config: the user's words, validated with the key's path, and a
budget no plan can meet refused from shapes alone, before any calibration."""

import pytest
import torch

from presso import ConfigError
from presso.compressors.plan.candidates import CandidateGrid
from presso.compressors.plan.planner import Planner, measure_model
from presso.orchestrator.budget import check_budget, choice_grid
from presso.orchestrator.config import load_config

JOB = "jobs/smollm2_budget.yaml"


def test_job_budget_and_overrides_load():
    cfg = load_config(JOB)
    assert cfg.compress.budget.bytes is not None and cfg.compress.budget.avg_bits is None
    cfg = load_config(JOB, ["compress.budget.bytes=null", "compress.budget.avg_bits=3.5"])
    assert cfg.compress.budget.avg_bits == 3.5
    cfg = load_config("jobs/smollm2_rtn.yaml", ["compress.budget.bytes=160000000"])
    assert cfg.compress.budget.bytes == "160000000"  # an int in YAML arrives as its digits


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["compress.budget.avg_bits=3"], r"^compress\.budget: set exactly one of"),
        (["compress.budget.bytes=40 parsecs"], r"^compress\.budget\.bytes: expected a byte"),
        (["compress.budget.bytes=null", "compress.budget.avg_bits=0"], r"budget\.avg_bits"),
        (["compress.candidates.bits=[2, 9]"], r"^compress\.candidates\.bits\[1\]: must be in"),
        (["compress.candidates.group_sizes=[0]"], r"^compress\.candidates\.group_sizes\[0\]"),
        (["compress.candidates.sparse_patterns=[5:4]"], r"candidates\.sparse_patterns\[0\]"),
        (["compress.candidates.error=fisher"], r"^compress\.candidates\.error: expected 'loss'"),
        (["compress.recipe=[{awq: {}}, {gptq: {}}]"], r"^compress\.budget: a budget plan"),
    ],
)
def test_bad_budgets_name_their_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(JOB, overrides)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("compress.budget.bytes=40kB", r"compress\.budget\.bytes: 40kB \(40,000 bytes\) is below"),
        ("compress.budget.avg_bits=0.5", r"compress\.budget\.avg_bits: 0\.5 is below the fewest"),
    ],
)
def test_infeasible_budget_is_refused_before_any_work(budget, match, make_llama):
    """The smallest artifact (every layer at its cheapest setting, the embeddings and
    lm_head as they are: ~50 kB here) follows from shapes: no data, no workers needed."""
    cfg = load_config(JOB, ["compress.budget.bytes=null", budget])
    with pytest.raises(ConfigError, match=match):
        check_budget(cfg, make_llama(tied=False), None)
    check_budget(load_config(JOB, ["compress.budget.bytes=200kB"]), make_llama(tied=False), None)


def test_heat_map_grid_is_blocks_by_layer_kind(make_llama):
    """The logged heat map: one row per decoder block, one column per layer kind, the
    stored bits per weight of each layer's choice (W4 per-row here: 4 bits plus scales)."""
    model = make_llama(tied=False)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(2)]
    grid = CandidateGrid(
        bits=[4],
        group_sizes=[-1],
        symmetric=[True],
        sparse_patterns=[],
        lowrank_energy=[],
        dense=False,
    )
    plan = Planner(model, measure_model(model, calib, grid)).for_avg_bits(6)
    blocks, kinds, values = choice_grid(plan)
    assert blocks == ["0", "1"]
    assert kinds == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(4 < v < 4.6 for row in values for v in row)
