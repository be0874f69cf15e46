"""The packed artifact reloads to the very model that was evaluated, and refuses tampering."""

import json

import pytest
import torch
from safetensors.torch import load_file

import presso
from presso import IntegrityError, UnsupportedError
from presso.compressors.formats.artifact import save_compressed, storage_dtype
from presso.compressors.formats.linear import QuantizedEmbedding
from presso.compressors.ptq import compress_model
from presso.compressors.quant.rtn import RTN


def _compress(model, algo):
    return {
        name: algo.compress(m.weight, name=name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


def _as_stored(model, records, dtype):
    """``model`` as its artifact stores it: compressed layers at their dequantized values, every
    other floating tensor rounded to the storage ``dtype`` (kept in fp32 to compute exactly)."""
    for name, record in records.items():
        model.get_submodule(name).weight.data = record.dequantize()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] not in records:
                p.copy_(p.to(dtype).float())
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reload_computes_what_was_compressed(tiny_llama, tmp_path, symmetric, dtype):
    """Loaded in fp32, the artifact computes exactly what the model it saved computes once its
    uncompressed tensors are rounded to the storage dtype: nothing else changes on the way."""
    records = _compress(tiny_llama, RTN(bits=4, group_size=32, symmetric=symmetric))
    info = save_compressed(tiny_llama, records, tmp_path / "art", dtype=dtype)
    packed = presso.load_compressed(tmp_path / "art", dtype=torch.float32)
    _as_stored(tiny_llama, records, dtype)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, tiny_llama(ids).logits)
    # avg bits: 4-bit codes + fp16 scale per 32 weights (+ zeros) + the shape tensor
    assert 4.5 <= info.avg_bits <= 5.0
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["dtype"] == str(dtype)[6:]
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized" and quantization["ignore"] == ["lm_head"]


def test_uncompressed_tensors_are_stored_in_the_models_half_dtype(make_llama, tmp_path):
    """The default storage dtype is the model's own half precision: fp16 for an fp32 model,
    bf16 for one whose config declares bf16 or whose weights are bf16; by default the artifact
    loads in that dtype too, and an fp32 model's artifact is about half the size of fp32's."""
    model = make_llama(vocab_size=512)
    records = _compress(model, RTN(bits=4, group_size=32))
    half = save_compressed(model, records, tmp_path / "fp16")
    full = save_compressed(model, records, tmp_path / "fp32", dtype="float32")
    embedding = model.get_input_embeddings().weight.numel()
    assert full.artifact_bytes - half.artifact_bytes >= 2 * embedding
    assert presso.load_compressed(tmp_path / "fp16").lm_head.weight.dtype == torch.float16
    model.config.dtype = "bfloat16"
    assert storage_dtype(model) == torch.bfloat16
    assert storage_dtype(make_llama().to(torch.bfloat16)) == torch.bfloat16
    with pytest.raises(UnsupportedError, match="float8"):
        storage_dtype(model, "float8")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_quantized_embedding_reloads_exactly_and_stays_tied(
    make_llama, tmp_path, tied, bits, symmetric
):
    """The embedding entry quantizes the embedding and lm_head; a tied pair is stored once (the
    artifact has no lm_head tensor) and shares one set of tensors after loading; an untied head
    gets its own record. The reloaded model computes what the in-memory one does. The entry
    stands first in the recipe here: it still runs after the solver."""
    model = make_llama(vocab_size=512, tied=tied)
    entry = {"embedding": {"bits": bits, "group_size": 32, "symmetric": symmetric}}
    records = compress_model(model, [entry, {"rtn": {"bits": 4, "group_size": 32}}])
    embedded = sorted(n for n in records if "layers" not in n)
    assert embedded == (["model.embed_tokens"] if tied else ["lm_head", "model.embed_tokens"])
    save_compressed(model, records, tmp_path / "art", dtype="float32")
    stored = load_file(tmp_path / "art" / "model.safetensors")
    assert "model.embed_tokens.weight" not in stored and "lm_head.weight" not in stored
    assert ("lm_head.weight_packed" in stored) is not tied
    loaded = presso.load_compressed(tmp_path / "art")
    assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
    if tied:
        assert loaded.lm_head.weight_packed is loaded.model.embed_tokens.weight_packed
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(
            loaded(ids).logits, _as_stored(model, records, torch.float32)(ids).logits
        )


def test_tampered_or_truncated_artifact_is_refused(tiny_llama, tmp_path):
    records = _compress(tiny_llama, RTN(bits=4, group_size=32))
    save_compressed(tiny_llama, records, tmp_path / "art")
    weights = tmp_path / "art" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        presso.load_compressed(tmp_path / "art")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        presso.load_compressed(tmp_path / "art")
    (tmp_path / "art" / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="no manifest.json"):
        presso.load_compressed(tmp_path / "art")


def test_rewrite_replaces_atomically(tiny_llama, tmp_path):
    records = _compress(tiny_llama, RTN(bits=4, group_size=32))
    save_compressed(tiny_llama, records, tmp_path / "art")
    records = _compress(tiny_llama, RTN(bits=8, group_size=32))
    save_compressed(tiny_llama, records, tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp folders left behind
    presso.load_compressed(tmp_path / "art")


def test_float32_scales_are_stored_as_float32(tiny_llama, tmp_path):
    """``scale_dtype: float32`` buys accuracy with bytes: the artifact must keep the scales in
    fp32 whatever the storage dtype of the uncompressed tensors, and reload to the same model."""
    records = _compress(tiny_llama, RTN(bits=3, group_size=32, scale_dtype="float32"))
    save_compressed(tiny_llama, records, tmp_path / "art", dtype=torch.float16)
    stored = load_file(tmp_path / "art" / "model.safetensors")
    scales = {n: t.dtype for n, t in stored.items() if n.endswith("weight_scale")}
    assert scales and set(scales.values()) == {torch.float32}
    packed = presso.load_compressed(tmp_path / "art", dtype=torch.float32)
    _as_stored(tiny_llama, records, torch.float16)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, tiny_llama(ids).logits)
