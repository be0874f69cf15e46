"""transformers (with compressed-tensors, installed by ``make setup``) loads presso's artifacts
wherever compressed-tensors can express them, and an artifact it cannot load says so."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

import presso
from presso.compressors.formats import artifact
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.ptq.blocks import compress_model
from presso.compressors.quant.embedding import EmbeddingQuant
from presso.compressors.quant.rtn import RTN


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _calib():
    return [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))]


def _load_with(config: dict) -> str:
    return config["quantization_config"]["presso"]["load_with"]


def _both(path, ids, dtype, **kwargs):
    ours = presso.load_compressed(path, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    with torch.no_grad():
        return ours(ids).logits, theirs(ids).logits


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformers_loads_symmetric_artifacts_with_the_same_logits(make_llama, tmp_path):
    """The promise for pack-quantized layers with symmetric grids — GPTQ here, with another
    bit width and group size per layer as a budget plan mixes them: a plain
    ``from_pretrained(artifact)`` loads presso's artifact without presso's code and computes
    the very logits ``presso.load_compressed`` does: exactly in fp32, within fp16 rounding in
    the stored fp16."""
    model = make_llama()
    records = compress_model(model, [{"gptq": {"bits": 4, "group_size": 32}}], _calib())
    for i, name in enumerate(list(records)[::3]):  # every third layer: another setting
        weight = model.get_submodule(name).weight.detach()
        records[name] = RTN(bits=8, group_size=64 if i % 2 else 32).compress(weight, name=name)
    save_compressed(model, records, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert _load_with(config) == artifact.LOADS and config["dtype"] == "float16"
    ids = torch.randint(0, 96, (2, 12))
    ours, theirs = _both(tmp_path / "art", ids, torch.float32)
    assert torch.equal(ours, theirs)
    ours, theirs = _both(tmp_path / "art", ids, None)  # as stored: fp16
    assert ours.dtype == theirs.dtype == torch.float16
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=1e-2)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_decompresses_our_gptq_artifact(tiny_llama, tmp_path, symmetric):
    """Asymmetric grids (and a quantized embedding) load through compressed-tensors'
    dequantizing path, the one its default path cannot take for them (zero points and
    embeddings come back with the wrong shapes): the decompressed weights are exactly ours,
    rounded to the scales' dtype (fp16), and the logits are presso's within fp16 rounding."""
    records = compress_model(
        tiny_llama,
        [{"gptq": {"bits": 4, "group_size": 32, "symmetric": symmetric}}],
        _calib(),
    )
    records.update(EmbeddingQuant(bits=4, group_size=32, symmetric=symmetric).compress_embeddings(
        tiny_llama
    ))  # fmt: skip
    save_compressed(tiny_llama, records, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert _load_with(config) == artifact.DEQUANTIZE_ONLY
    dequantize = CompressedTensorsConfig(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "art", quantization_config=dequantize)
    for name, record in records.items():
        w = theirs.get_submodule(name).weight.detach().float()
        assert torch.equal(w, record.dequantize().half().float()), name
    ids = torch.randint(0, 96, (2, 12))
    ours, theirs = _both(tmp_path / "art", ids, torch.float32, quantization_config=dequantize)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "recipe", [[{"wanda": {"pattern": "2:4"}}], [{"lowrank": {"rank": 8}}]], ids=["2:4", "lowrank"]
)
def test_formats_compressed_tensors_cannot_express_say_so_and_fail_loudly(
    tiny_llama, tmp_path, recipe
):
    """2:4 (compressed-tensors 0.20 dropped ``sparsity_config``) and presso's own formats: the
    artifact's config.json names presso.load_compressed as the way to load it, and transformers
    refuses it rather than loading random weights."""
    records = compress_model(tiny_llama, recipe, _calib())
    save_compressed(tiny_llama, records, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert _load_with(config).startswith("presso.load_compressed(path) only")
    with pytest.raises(Exception, match="validation error"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "art")
    presso.load_compressed(tmp_path / "art")
