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
from presso import UnsupportedError
from presso.compressors.formats.integrity import sealed_folder, verify_manifest
from presso.compressors.ptq.architectures import registered
from presso.compressors.quant.primitives import FLOAT_DTYPES
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


STORAGE_DTYPES = FLOAT_DTYPES


def storage_dtype(model: torch.nn.Module, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype of every floating tensor presso does not compress. ``auto`` is the model's own
    half precision: its parameters' dtype when that is fp16 or bf16 already; for an fp32 model,
    bf16 if its config declares bf16 (it was trained so) or its architecture's activations do not
    fit fp16 (Gemma: the artifact, computed in its storage dtype, would give NaN), else fp16 (as
    llm-compressor stores).
    transformers overwrites ``config.dtype`` with the dtype a model is loaded in: callers that
    loaded a bf16 checkpoint in fp32 pass ``"bfloat16"`` (the orchestrator reads the folder's
    ``config.json``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in STORAGE_DTYPES:
            raise UnsupportedError(
                f"storage dtype {dtype!r}: expected auto or one of {sorted(STORAGE_DTYPES)}"
            )
        return STORAGE_DTYPES[dtype]
    own = {p.dtype for p in model.parameters()} & {torch.float16, torch.bfloat16}
    if own:
        return own.pop()
    declared = getattr(getattr(model, "config", None), "dtype", None)
    if str(declared).removeprefix("torch.") == "bfloat16":
        return torch.bfloat16
    architecture = registered(model)
    return torch.bfloat16 if architecture and not architecture.fits_fp16 else torch.float16


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()


def save_compressed(
    model: torch.nn.Module,
    records: dict,
    path: str | os.PathLike,
    tokenizer=None,
    dtype: str | torch.dtype = "auto",
    metadata: dict | None = None,
) -> ArtifactInfo:
    """Write ``model`` with the layers in ``records`` (name → stored record) kept packed, every
    other floating tensor in ``dtype`` (see :func:`storage_dtype`); ``metadata`` (how the
    artifact was made) goes into ``quantization_config.presso``."""
    if not hasattr(model, "config"):
        raise UnsupportedError("save_compressed needs a Hugging Face model (one with a .config)")
    dest = Path(path)
    store = storage_dtype(model, dtype)
    modules = dict(model.named_modules())
    tensors = {n: _stored(t, store) for n, t in kept_tensors(model, records).items()}
    layers, compressed_bytes, compressed_weights = {}, 0, 0
    for name, record in records.items():
        for suffix, t in record.tensors().items():
            tensors[f"{name}.{suffix}"] = t.contiguous()
            compressed_bytes += t.numel() * t.element_size()
        compressed_weights += modules[name].weight.numel()
        layers[name] = {"format": record.format, "scheme": record.scheme()}
    config = artifact_config(model, layers, store)
    config["quantization_config"]["presso"].update(metadata or {})

    with sealed_folder(dest) as tmp:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return ArtifactInfo(dest, folder_bytes(dest), compressed_weights, compressed_bytes)


def kept_tensors(model: torch.nn.Module, layers) -> dict[str, torch.Tensor]:
    """The model's own tensors the artifact keeps: all but tied duplicates and the weights of
    the compressed ``layers``."""
    skip = _tied_duplicates(model) | {f"{name}.weight" for name in layers}
    return {n: t for n, t in model.state_dict().items() if n not in skip}


def artifact_config(model: torch.nn.Module, layers: dict, dtype: torch.dtype) -> dict:
    """``config.json``: the model's config, its storage dtype, and the quantization config of
    ``layers`` (name → ``{"format", "scheme"}``)."""
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = _quantization_config(layers, dict(model.named_modules()))
    return config


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in an artifact folder, metadata included."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# What transformers (5.25, with compressed-tensors 0.20) does with an artifact, by its layers:
LOADS = "AutoModelForCausalLM.from_pretrained(path) with compressed-tensors installed"
DEQUANTIZE_ONLY = (
    "AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig("
    "dequantize=True)) when every layer shares one scheme (its default path cannot load "
    "asymmetric zero points or a quantized embedding); else presso.load_compressed(path)"
)
PRESSO_ONLY = (
    "presso.load_compressed(path) only: {formats} are presso's own formats (compressed-tensors "
    "0.20 reads pack-quantized only; it dropped sparsity_config)"
)


def transformers_support(layers: dict, modules: dict) -> str:
    """How the artifact loads outside presso (written into its config.json and the README)."""
    own = sorted({layer["format"] for layer in layers.values()} - {"pack-quantized"})
    if own:
        return PRESSO_ONLY.format(formats=", ".join(own))
    asymmetric = any(not layer["scheme"]["symmetric"] for layer in layers.values())
    embedding = any(isinstance(modules[name], torch.nn.Embedding) for name in layers)
    return DEQUANTIZE_ONLY if asymmetric or embedding else LOADS


def _quantization_config(layers: dict, modules: dict) -> dict:
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
        "ignore": [n for n in linear if n not in layers],
        "presso": {
            "version": presso.__version__,
            "load_with": transformers_support(layers, modules),
            "layers": layers,
        },
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
