"""Loading a packed artifact: the model skeleton on the meta device, the stored tensors put in
place.

Nothing dense is built and then thrown away: the skeleton (``from_config`` under
``torch.device("meta")``) holds no memory; each compressed layer becomes its format's runtime
module over the stored tensors themselves; every other tensor is read, cast to ``dtype`` one at
a time and assigned. Peak memory is about the artifact's size plus the largest tensor being
cast (measured in ``bench/artifact_size.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from presso import IntegrityError
from presso.compressors.formats.artifact import STORAGE_DTYPES, WEIGHTS
from presso.compressors.formats.integrity import verify_manifest
from presso.compressors.formats.linear import QuantizedEmbedding, QuantizedLinear
from presso.compressors.registry import stored_format


def load_compressed(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Verify an artifact's checksums and rebuild a runnable model from it.

    ``dtype`` is the dtype of the model's uncompressed tensors and activations (default: the
    dtype they are stored in, fp16 or bf16 for presso's artifacts); packed codes and scales stay
    as stored. ``device``: where every tensor is read to.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise IntegrityError(f"artifact {folder} does not exist")
    verify_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    layers = config.quantization_config["presso"]["layers"]
    del config.quantization_config  # transformers must not try to apply it on its own
    dtype = dtype or STORAGE_DTYPES.get(str(config.dtype).removeprefix("torch."), torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(folder / WEIGHTS, "pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for name, layer in layers.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        bias = own.pop("bias", None)
        replace_module(model, name, runtime_module(model, name, layer, own, bias, dtype))
    for key in state:  # one cast at a time: peak is the artifact plus the largest tensor
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    replaced = tuple(f"{name}." for name in layers)
    missing = {k for k in missing if not k.startswith(replaced)} - tie_head(model, layers)
    if missing or unexpected:
        raise IntegrityError(
            f"artifact {folder} does not match its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}; write the artifact again"
        )
    _materialize_buffers(model, device)
    return model.eval()


def runtime_module(model, name: str, layer: dict, own: dict, bias, dtype) -> torch.nn.Module:
    """The module computing with one stored layer; an embedding gets a quantized lookup."""
    record_type, scheme = stored_format(layer["format"]), layer["scheme"]
    bias = None if bias is None else bias.to(dtype)
    if record_type.format == "pack-quantized":  # straight over the stored tensors
        group = scheme.get("group_size") or int(own["weight_shape"][1])
        if isinstance(model.get_submodule(name), torch.nn.Embedding):
            return QuantizedEmbedding(own, scheme["num_bits"], group, dtype)
        return QuantizedLinear(own, scheme["num_bits"], group, bias)
    return record_type.from_tensors(own, scheme).module(bias)


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def tie_head(model: torch.nn.Module, layers: dict) -> set[str]:
    """Tie the output head to the input embedding when the config says so; returns the state
    keys the tie provides. A quantized embedding lends its stored tensors to a
    :class:`QuantizedLinear` head: still one tensor in memory."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    if head is None or names.get(id(head)) in layers:
        return set()
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantizedEmbedding):
        tensors = {**embedding.tensors(), "weight_shape": torch.tensor(
            [embedding.num_embeddings, embedding.embedding_dim])}  # fmt: skip
        replace_module(
            model, names[id(head)], QuantizedLinear(tensors, embedding.bits, embedding.group_size)
        )
    else:
        model.tie_weights()
    return {f"{names[id(head)]}.weight"}


def _materialize_buffers(model: torch.nn.Module, device) -> None:
    """Buffers the checkpoint does not hold (rotary frequencies) are still on the meta device:
    allocate them and let the model's own initialisation compute them, as transformers does.
    The module's loaded parameters are put back afterwards: a module that holds both (Gemma's
    scaled embedding: its weight and a non-persistent ``embed_scale``) would otherwise be
    re-initialised at random."""
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            loaded = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            with torch.no_grad():
                for n, p in module.named_parameters(recurse=False):
                    if not loaded[n].is_meta:
                        p.copy_(loaded[n])
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise IntegrityError(f"artifact: {meta[:5]} were not in the artifact; write it again")
