"""The packed artifact: a Hugging Face model folder whose compressed layers stay packed.

Layout (compatible with compressed-tensors' ``pack-quantized`` format where the layer format is):

- ``model.safetensors``: every parameter of the model; a compressed linear layer ``L`` is stored
  as ``L.weight_packed``, ``L.weight_scale``, ``L.weight_shape`` (+ ``L.weight_zero_point``) instead
  of ``L.weight``;
- ``config.json``: the model's config plus ``quantization_config`` (compressed-tensors style
  ``config_groups``, and under ``presso`` each layer's stored format and scheme);
- tokenizer files, when a tokenizer is given;
- ``manifest.json``: sha256 and size of every other file. :func:`load_compressed` refuses an
  artifact whose files do not match it.

The folder is written beside its destination and renamed into place, so a crash never leaves a
half-written artifact under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import presso
from presso import IntegrityError, UnsupportedError
from presso.compressors.formats.integrity import sealed_folder, verify_manifest
from presso.compressors.registry import stored_format

WEIGHTS = "model.safetensors"


@dataclass
class ArtifactInfo:
    path: Path
    artifact_bytes: int  # every file in the folder, metadata included
    compressed_weights: int  # weights in compressed layers
    compressed_bytes: int  # bytes stored for those layers (codes, scales, zeros, masks, ...)

    @property
    def avg_bits(self) -> float:
        """Average stored bits per weight of the compressed layers, all metadata included."""
        return 8 * self.compressed_bytes / max(self.compressed_weights, 1)


def _tied_duplicates(model: torch.nn.Module) -> set[str]:
    """State-dict names whose storage an earlier name already holds (tied embeddings)."""
    seen, dups = set(), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            dups.add(name)
        seen.add(t.data_ptr())
    return dups


def save_compressed(
    model: torch.nn.Module,
    records: dict,
    path: str | os.PathLike,
    tokenizer=None,
    metadata: dict | None = None,
) -> ArtifactInfo:
    """Write ``model`` with the layers in ``records`` (name → stored record) kept packed;
    ``metadata`` (how the artifact was made) goes into ``quantization_config.presso``."""
    if not hasattr(model, "config"):
        raise UnsupportedError("save_compressed needs a Hugging Face model (one with a .config)")
    dest = Path(path)
    modules = dict(model.named_modules())
    skip = _tied_duplicates(model) | {f"{name}.weight" for name in records}
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items() if n not in skip}
    layers, compressed_bytes, compressed_weights = {}, 0, 0
    for name, record in records.items():
        for suffix, t in record.tensors().items():
            tensors[f"{name}.{suffix}"] = t.contiguous()
            compressed_bytes += t.numel() * t.element_size()
        compressed_weights += modules[name].weight.numel()
        layers[name] = {"format": record.format, "scheme": record.scheme()}
    config = model.config.to_dict()
    config["quantization_config"] = _quantization_config(records, layers, modules)
    config["quantization_config"]["presso"].update(metadata or {})

    with sealed_folder(dest) as tmp:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return ArtifactInfo(dest, folder_bytes(dest), compressed_weights, compressed_bytes)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in an artifact folder, metadata included."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _quantization_config(records: dict, layers: dict, modules: dict) -> dict:
    """compressed-tensors' ``quantization_config``: one config group per distinct scheme."""
    groups: dict[str, dict] = {}
    for name, layer in layers.items():
        key = json.dumps([layer["format"], layer["scheme"]], sort_keys=True)
        group = groups.setdefault(
            key,
            {
                "targets": [],
                "weights": layer["scheme"],
                "input_activations": None,
                "output_activations": None,
                "format": layer["format"],
            },
        )
        group["targets"].append(name)
    linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    formats = {layer["format"] for layer in layers.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": [n for n in linear if n not in records],
        "presso": {"version": presso.__version__, "layers": layers},
    }


def read_records(path: str | os.PathLike) -> dict:
    """The stored records of a verified artifact's compressed layers, by layer name."""
    folder = Path(path)
    verify_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / WEIGHTS)
    records = {}
    for name, layer in config["quantization_config"]["presso"]["layers"].items():
        own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        records[name] = stored_format(layer["format"]).from_tensors(own, layer["scheme"])
    return records


def load_compressed(path: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Verify an artifact's checksums and rebuild a runnable model from it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise IntegrityError(f"artifact {folder} does not exist")
    verify_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    layers = config.quantization_config["presso"]["layers"]
    del config.quantization_config  # transformers must not try to apply it on its own
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(folder / WEIGHTS)
    for name, layer in layers.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        record = stored_format(layer["format"]).from_tensors(own, layer["scheme"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, record.module(own.get("bias")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    replaced = tuple(f"{name}." for name in layers)
    missing = (
        set(missing) - _tied_duplicates(model) - {k for k in missing if k.startswith(replaced)}
    )
    if missing or unexpected:
        raise IntegrityError(
            f"artifact {folder} does not match its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}; write the artifact again"
        )
    return model.to(device).eval()
