"""The exact byte size of the artifact ``save_compressed`` would write, from shapes alone.

A budget is about the whole folder, so everything is counted, not only the tensors:

- ``model.safetensors``: an 8-byte header length, the JSON header (every tensor's name, dtype,
  shape and byte offsets, padded with spaces to a multiple of 8) and the data. The header is
  rendered the way the safetensors library writes it: tensors sorted by dtype (widest first),
  then by name, offsets in that order. Offsets change digit counts, so the order matters.
- ``config.json``: the model's config, storage dtype and the ``quantization_config`` of the
  planned records, rendered by the artifact module's own function;
- tokenizer files: written once to a temporary folder and measured;
- ``manifest.json``: one entry per other file; a sha256 is always 64 hex digits, so only the sizes
  (rendered above) change its length.

The tests compare every number with a real ``save_compressed`` folder, byte for byte; a new
safetensors or transformers release that writes differently fails them rather than a budget.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from presso.compressors.formats.artifact import (
    WEIGHTS,
    artifact_config,
    kept_tensors,
    storage_dtype,
)
from presso.compressors.formats.integrity import MANIFEST
from presso.compressors.plan.candidates import Specs

# safetensors' dtype names, in its sort order (a file lists the last ones first)
DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(DTYPE_NAMES)}

# A planned layer as the artifact sees it: (format, scheme, stored tensors by suffix)
LayerRecord = tuple[str, dict, Specs]


def _entry(name: str, dtype: torch.dtype, shape: tuple[int, ...], start, end) -> str:
    dims = ",".join(str(d) for d in shape)
    return (
        f'{json.dumps(name)}:{{"dtype":"{DTYPE_NAMES[dtype]}","shape":[{dims}],'
        f'"data_offsets":[{start},{end}]}}'
    )


def entry_bytes(name: str, dtype: torch.dtype, shape: tuple[int, ...], digits: int) -> int:
    """Header bytes of one tensor whose offsets have ``digits`` digits (and its comma)."""
    return len(_entry(name, dtype, shape, "0" * digits, "0" * digits).encode()) + 1


def safetensors_bytes(tensors: Specs) -> int:
    """Size of the safetensors file holding ``tensors`` (full name → dtype, shape)."""
    names = sorted(tensors, key=lambda n: (-_DTYPE_RANK[tensors[n][0]], n))
    entries, offset = [], 0
    for name in names:
        dtype, shape = tensors[name]
        end = offset + math.prod(shape) * dtype.itemsize
        entries.append(_entry(name, dtype, shape, offset, end))
        offset = end
    header = len(("{" + ",".join(entries) + "}").encode())
    return 8 + header + (-header) % 8 + offset


def manifest_bytes(files: dict[str, int]) -> int:
    """Size of ``manifest.json`` for files of these relative paths and sizes."""
    entries = {rel: {"sha256": "0" * 64, "bytes": files[rel]} for rel in sorted(files, key=Path)}
    return len(json.dumps({"files": entries}, indent=1).encode())


class ArtifactSizer:
    """Predicts ``save_compressed(model, records, path, tokenizer).artifact_bytes`` for records
    described by their format, scheme and tensor shapes (in the order the records will have),
    and the same storage ``dtype``."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, dtype="auto") -> None:
        self.model, self.dtype = model, storage_dtype(model, dtype)
        self.tokenizer_files: dict[str, int] = {}
        if tokenizer is not None:
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                self.tokenizer_files = {
                    str(p.relative_to(tmp)): p.stat().st_size
                    for p in Path(tmp).rglob("*")
                    if p.is_file()
                }

    def tensors(self, layers: dict[str, LayerRecord]) -> Specs:
        """Every tensor of the safetensors file: the model's own, planned weights replaced."""
        out = {
            n: (self.dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
            for n, t in kept_tensors(self.model, layers).items()
        }
        for name, (_, _, specs) in layers.items():
            out.update({f"{name}.{suffix}": spec for suffix, spec in specs.items()})
        return out

    def files(self, layers: dict[str, LayerRecord]) -> dict[str, int]:
        """Bytes of every file of the artifact, by relative path."""
        meta = {
            name: {"format": fmt, "scheme": scheme} for name, (fmt, scheme, _) in layers.items()
        }
        config = artifact_config(self.model, meta, self.dtype)
        files = {
            WEIGHTS: safetensors_bytes(self.tensors(layers)),
            "config.json": len(json.dumps(config, indent=1, default=str).encode()),
            **self.tokenizer_files,
        }
        files[MANIFEST] = manifest_bytes(files)
        return files

    def total(self, layers: dict[str, LayerRecord]) -> int:
        return sum(self.files(layers).values())
