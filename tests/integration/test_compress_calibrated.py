"""Calibrated compression over Ray actors: data-parallel statistics, layer-parallel solves.

The records must not depend on the number of workers nor on a worker dying mid-run, must be
those of the single-process pipeline, and the stage's perplexity must be that of the artifact
as reloaded from disk.
"""

import copy

import pytest
import torch

import presso
from presso import DataError
from presso.compressors.ptq import Recipe, compress_model
from presso.compressors.quant.gptq import GPTQ
from presso.orchestrator.compress import compress_layers, plan_layers, run_compression
from presso.orchestrator.pool import WorkerPool

pytestmark = pytest.mark.integration

GRID = {"bits": 4, "group_size": 32}
RECIPES = {
    "gptq": [{"gptq": GRID}],
    "awq+sparsegpt": [{"awq": GRID}, {"sparsegpt": {"sparsity": 0.5}}],
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # as in the workers, so the in-process reference matches them


@pytest.fixture(scope="module")
def pools():
    """One Ray and two pools (1 and 2 workers) for the whole module: starting actors is the
    slow part. Ray is told of more CPUs than the machine has so that they all fit at once."""
    import ray

    ray.init(num_cpus=6, include_dashboard=True, logging_level="WARNING")
    pools = {1: WorkerPool(1), 2: WorkerPool(2)}
    yield pools
    for pool in pools.values():
        pool.close()
    ray.shutdown()


@pytest.fixture
def calib():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(4)]


def _compress(model, recipe, pool, calib, shards=2, **kwargs):
    recipe = Recipe.parse(recipe)
    plan = plan_layers(model, recipe, ["lm_head"])
    return compress_layers(copy.deepcopy(model), plan, recipe, pool, calib, shards, **kwargs)


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key, t in a[name].tensors().items():
            assert torch.equal(t, b[name].tensors()[key]), (name, key)


@pytest.mark.parametrize("name", list(RECIPES))
def test_workers_and_failures_do_not_change_the_records(
    pools, tiny_llama, calib, monkeypatch, name
):
    """1 worker, 2 workers, and 2 workers of which one dies after its first two tasks (in the
    statistics phase of block 0) run the same shard and layer tasks: bit-identical records.
    With one shard the statistics are summed exactly as the single-process pipeline sums them,
    so those records equal compress_model's too: the distribution changes nothing."""
    recipe = RECIPES[name]
    one, _ = _compress(tiny_llama, recipe, pools[1], calib)
    two, layers = _compress(tiny_llama, recipe, pools[2], calib)
    monkeypatch.setenv("PRESSO_INJECT_COMPRESS_FAULT", "1:2")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    faulty = run_compression(tiny_llama, recipe, 2, ["lm_head"], calibration=calib, shards=2)
    monkeypatch.delenv("PRESSO_INJECT_COMPRESS_FAULT")
    single, _ = _compress(tiny_llama, recipe, pools[2], calib, shards=1)

    assert len(one) == 14
    _same(one, two)
    _same(one, faulty.records)
    assert faulty.reassigned >= 1 and len(faulty.worker_s) == 2
    assert {layer.worker for layer in layers} == {0, 1}
    assert all(0 <= layer.rel_error < 1 for layer in layers)
    _same(single, compress_model(copy.deepcopy(tiny_llama), recipe, calib))
    # run_compression works on a copy: the model is untouched, the copy holds the records
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())
    down = "model.layers.1.mlp.down_proj"
    weight = faulty.model.get_submodule(down).weight
    assert torch.equal(weight, faulty.records[down].dequantize())


def test_per_layer_solvers_override_the_recipe(pools, tiny_llama, calib):
    """A budget planner assigns algorithms per layer; those solves use the recipe's stats."""
    first = "model.layers.0.self_attn.q_proj"
    records, _ = _compress(
        tiny_llama, RECIPES["gptq"], pools[2], calib, solvers={first: GPTQ(3, 32)}
    )
    assert records[first].bits == 3
    assert {r.bits for n, r in records.items() if n != first} == {4}


def test_loss_weights_are_the_same_on_workers_as_in_process(pools, tiny_llama, calib):
    """The budget planner's backward pass runs data-parallel like calibration: its per-output
    loss weights from shards on 1 or 2 workers equal the single-process pass (up to fp64
    summation order), and the model is left untouched."""
    from presso.compressors.plan.planner import output_sensitivity
    from presso.orchestrator.budget import loss_weights

    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    reference = output_sensitivity(tiny_llama, calib)
    for workers in (1, 2):
        spread = loss_weights(tiny_llama, calib, ["lm_head"], workers, shards=3)
        assert spread.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(spread[name], value, rtol=1e-6, atol=0)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_nan_activations_fail_naming_the_layer(pools, tiny_llama, calib):
    """The worker's error reaches the user as presso's own one-line DataError, not a remote
    traceback, and names the layer whose inputs the NaN reached."""
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    recipe = Recipe.parse(RECIPES["gptq"])
    plan = plan_layers(tiny_llama, recipe, ["up_proj"])
    with pytest.raises(DataError, match=r"model\.layers\.0\.mlp\.down_proj") as err:
        compress_layers(tiny_llama, plan, recipe, pools[2], calib)
    assert type(err.value) is DataError and "\n" not in str(err.value)


def test_stage_perplexity_is_the_reloaded_artifacts(pools, tmp_path, make_llama):
    """The compress → eval stages measure the artifact as saved: reloading it afterwards gives
    the reported perplexity bit for bit (what is registered is what was measured)."""
    from presso.orchestrator.config import load_config
    from presso.orchestrator.data import ByteTokenizer, build_corpus, load_works, split_works
    from presso.orchestrator.evaluate import perplexity
    from presso.orchestrator.pipeline import run_pipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("alpha", "beta", "gamma", "delta")):
        (corpus / f"{name}_gut.txt").write_text(f"{name} {i}: to be or not to be. " * 60)
    make_llama(vocab_size=256, tied=False).save_pretrained(tmp_path / "model")
    ByteTokenizer().save_pretrained(tmp_path / "model")
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'out'}",
            f"model.source={tmp_path / 'model'}",
            f"data.path={corpus}",
            "data.val_works=[beta]",
            "data.test_works=[gamma]",
            "compress.recipe=[{awq: {bits: 4, group_size: 32}}, {gptq: {bits: 3, group_size: 32}}]",
            "compress.calibration.samples=8",
            "compress.calibration.seq_len=32",
            "compress.calibration.batch_size=2",
            "eval.seq_len=64",
            "eval.max_tokens=1024",
            "tracking.register=false",
        ],
    )
    summary = run_pipeline(cfg, ("compress", "eval"))
    assert summary["method"].startswith("awq(bits=4") and " + gptq(bits=3" in summary["method"]
    works = load_works(str(corpus))
    test = build_corpus(works, split_works(works, ["beta"], ["gamma"]), ByteTokenizer()).test
    packed = presso.load_compressed(summary["artifact"], dtype=torch.float32)  # as evaluated
    reloaded = perplexity(packed, test, 64, 1024)
    assert reloaded.perplexity == summary["compressed_ppl"]
    assert summary["compressed_ppl"] != summary["dense_ppl"]
