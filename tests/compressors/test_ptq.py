"""The block-by-block pipeline on a tiny Llama: composable steps, exact artifacts, early errors."""

import copy
import logging
import subprocess
import sys

import pytest
import torch

import presso
from presso import ConfigError, DataError, UnsupportedError
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.ptq.blocks import (
    InProcess,
    Recipe,
    accumulate_stats,
    block_outputs,
    capture_block_inputs,
    compress_blocks,
    compress_model,
    select_layers,
)

GRID = {"bits": 4, "group_size": 32}
RECIPES = {
    "rtn": [{"rtn": GRID}],
    "gptq": [{"gptq": GRID}],
    "gptq-actorder-asym": [{"gptq": {**GRID, "act_order": True, "symmetric": False}}],
    "awq": [{"awq": GRID}],
    "awq+gptq": [{"awq": GRID}, {"gptq": GRID}],
    "spqr": [{"spqr": {"bits": 3}}],
    "adadim": [{"adadim": {**GRID, "method": "rtn"}}],
    "magnitude": [{"magnitude": {}}],
    "wanda-2:4": [{"wanda": {"pattern": "2:4"}}],
    "sparsegpt": [{"sparsegpt": {"sparsity": 0.5}}],
    "sparsegpt-2:4-w4": [{"sparsegpt": {"pattern": "2:4", **GRID}}],
    "sparsegpt-w4": [{"sparsegpt": {"sparsity": 0.5, **GRID}}],
}


@pytest.fixture
def calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(4)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(RECIPES))
def test_artifact_reloads_to_the_compressed_model_exactly(tiny_llama, calib, tmp_path, name):
    """Every stored format must reload into a model whose logits equal, bit for bit, those of
    the model the pipeline left behind (weights replaced by their dequantized values), and the
    artifact's size must count every tensor the records store (masks, outliers, statistics)."""
    records = compress_model(tiny_llama, RECIPES[name], calib)
    assert len(records) == 2 * 7
    info = save_compressed(tiny_llama, records, tmp_path / "art", dtype="float32")
    stored = sum(
        t.numel() * t.element_size() for r in records.values() for t in r.tensors().values()
    )
    assert info.compressed_bytes == stored
    loaded = presso.load_compressed(tmp_path / "art")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_llama(ids).logits)


def test_sharded_statistics_give_compress_models_records(tiny_llama, calib):
    """The block loop with statistics summed over two data shards (what the Ray steps do) must
    give exactly the records the one-process run gives."""
    reference = compress_model(copy.deepcopy(tiny_llama), [{"gptq": GRID}], calib)
    recipe = Recipe.parse([{"gptq": GRID}])
    layers = select_layers(tiny_llama, recipe, ["lm_head"])
    records, reports = compress_blocks(tiny_llama, layers, recipe, InProcess(shards=2), calib)
    assert records.keys() == reference.keys() == {r.name for r in reports}
    for name, rec in records.items():
        assert torch.equal(rec.q, reference[name].q), name
        assert torch.equal(rec.scale, reference[name].scale), name


def test_later_blocks_calibrate_on_compressed_earlier_blocks(tiny_llama, calib):
    """Sequential calibration: block 1's statistics must come from block 0's compressed outputs,
    so that block 1 can compensate block 0's errors."""
    recipe = Recipe.parse([{"gptq": GRID}])
    (prefix0, _), (prefix1, names1) = select_layers(tiny_llama, recipe).blocks
    block0, block1 = tiny_llama.get_submodule(prefix0), tiny_llama.get_submodule(prefix1)
    lin1 = {n: tiny_llama.get_submodule(n) for n in names1}
    inputs = capture_block_inputs(tiny_llama, calib)
    clean = accumulate_stats(block1, block_outputs(block0, inputs), recipe.solver.make_stats, lin1)
    seen = {}
    compress_model(
        tiny_llama,
        recipe,
        calib,
        progress=lambda r: seen.setdefault(r.block, r),
    )
    inputs = capture_block_inputs(tiny_llama, calib)  # block 0 is compressed now
    after = accumulate_stats(block1, block_outputs(block0, inputs), recipe.solver.make_stats, lin1)
    name = next(iter(lin1))
    assert not torch.allclose(clean[name].xtx, after[name].xtx, rtol=1e-6)
    assert set(seen) == {0, 1} and 0 <= seen[0].rel_error < 1


def test_bad_group_size_fails_before_any_work(tiny_llama):
    """A group size that does not divide a layer's width must fail up front, naming the layer,
    without touching the model or reading calibration data."""
    consumed = []

    def batches():
        consumed.append(True)
        yield torch.zeros(1, 4, dtype=torch.long)

    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn\.q_proj.*48"):
        compress_model(tiny_llama, [{"gptq": {"group_size": 48}}], batches())
    assert not consumed
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_activations_fail_naming_the_layer(tiny_llama, calib):
    """A NaN produced inside the model (here by a corrupt up_proj) must stop calibration with
    the name of the layer whose inputs it reached."""
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"model\.layers\.0\.mlp\.down_proj"):
        compress_model(tiny_llama, [{"gptq": GRID}], calib, ignore=["up_proj"])


def test_unsupported_modules_are_listed_once_and_ignore_works(tiny_llama, calib, caplog):
    tiny_llama.model.layers[1].mlp.extra = torch.nn.Conv1d(4, 4, 1)  # weighted, not a Linear
    with caplog.at_level(logging.WARNING):
        records = compress_model(tiny_llama, [{"rtn": GRID}], calib, ignore=["mlp.down_proj"])
    lines = [r for r in caplog.records if "unsupported" in r.getMessage()]
    assert len(lines) == 1 and "model.layers.1.mlp.extra (Conv1d)" in lines[0].getMessage()
    assert not any(n.endswith("down_proj") for n in records) and len(records) == 12


def test_recipe_composition_rules():
    """Transforms first, one solver last; anything else is a config error naming the entry."""
    assert Recipe.parse([{"awq": GRID}]).transforms  # AWQ alone: transform and solver
    assert len(Recipe.parse([{"awq": GRID}, {"gptq": GRID}]).transforms) == 1
    with pytest.raises(ConfigError, match=r"compress\.recipe\[0\].*last entry"):
        Recipe.parse([{"gptq": GRID}, {"awq": GRID}])
    with pytest.raises(ConfigError, match="empty"):
        Recipe.parse([])
    with pytest.raises(ConfigError, match=r"compress\.recipe\[0\]\.gptq\.bits"):
        Recipe.parse([{"gptq": {"bits": 9}}])


# One recipe per stored format; the test below checks that this covers every registered format.
FORMAT_RECIPES = {
    "pack-quantized": RECIPES["rtn"],
    "presso-pack-quantized-ic": RECIPES["adadim"],
    "presso-spqr": RECIPES["spqr"],
    "sparse-bitmask": RECIPES["magnitude"],
    "sparse-24-bitmask": RECIPES["wanda-2:4"],
    "presso-sparse-quantized": RECIPES["sparsegpt-w4"],
    "presso-sparse24-quantized": RECIPES["sparsegpt-2:4-w4"],
    "presso-lowrank": [{"lowrank": {"rank": 8}}],
}

FRESH_LOAD = """
import sys, torch, presso
torch.set_num_threads(1)
ids = torch.load(sys.argv[1])
with torch.no_grad():
    out = {p: presso.load_compressed(p)(ids).logits for p in sys.argv[2:]}
torch.save(out, sys.argv[1] + ".logits")
"""


def test_every_format_loads_in_a_fresh_interpreter(make_llama, calib, tmp_path):
    """A user's process (or the MLflow pyfunc) imports nothing but ``presso`` before loading:
    each stored format must be found without an earlier import of the module defining it."""
    from presso.compressors.registry import FORMATS

    ids = torch.randint(0, 96, (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    expected, written = {}, set()
    for fmt, recipe in FORMAT_RECIPES.items():
        model = make_llama()
        records = compress_model(model, recipe, calib)
        written |= {r.format for r in records.values()}
        assert fmt in written
        save_compressed(model, records, tmp_path / fmt, dtype="float32")
        with torch.no_grad():  # what the same artifact gives in this (warm) process
            expected[str(tmp_path / fmt)] = presso.load_compressed(tmp_path / fmt)(ids).logits
    subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(tmp_path / "ids.pt"), *expected],
        cwd=tmp_path, check=True, timeout=300,
    )  # fmt: skip
    assert written == set(FORMATS.names())
    loaded = torch.load(tmp_path / "ids.pt.logits")
    for path, logits in expected.items():
        assert torch.equal(loaded[path], logits), path
