"""The packed artifact reloads to the very model that was evaluated, and refuses tampering."""

import json

import pytest
import torch

import presso
from presso import IntegrityError
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.quant.rtn import RTN


def _compress(model, algo):
    return {
        name: algo.compress(m.weight, name=name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


@pytest.mark.parametrize("symmetric", [True, False])
def test_reload_computes_what_was_compressed(tiny_llama, tmp_path, symmetric):
    records = _compress(tiny_llama, RTN(bits=4, group_size=32, symmetric=symmetric))
    info = save_compressed(tiny_llama, records, tmp_path / "art")
    packed = presso.load_compressed(tmp_path / "art")
    for name, record in records.items():
        tiny_llama.get_submodule(name).weight.data = record.dequantize()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, tiny_llama(ids).logits)
    # avg bits: 4-bit codes + fp16 scale per 32 weights (+ zeros) + the shape tensor
    assert 4.5 <= info.avg_bits <= 5.0
    config = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]


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
