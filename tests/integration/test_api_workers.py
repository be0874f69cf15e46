"""``presso.compress(..., workers=N)``: the one call on Ray actors gives what it gives in one
process, bit for bit (the records depend on the calibration shards, never on the workers)."""

import copy

import pytest
import torch

import presso

pytestmark = pytest.mark.integration


def test_workers_change_nothing_but_where_it_runs(local_ray, tiny_llama, tmp_path):
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 96, (8, 16), generator=gen)
    recipe = [{"awq": {"group_size": 32}}, {"gptq": {"group_size": 32, "bits": 3}}]
    here = presso.compress(copy.deepcopy(tiny_llama), recipe, calibration=calib)
    there = presso.compress(tiny_llama, recipe, calibration=calib, workers=2, output=tmp_path / "a")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(here(ids).logits, there(ids).logits)
        again = presso.load_compressed(tmp_path / "a", dtype=torch.float32)  # as stored, in fp32
        assert torch.equal(there(ids).logits, again(ids).logits)
