"""Shared test settings: quiet telemetry, CUDA-only tests skipped without CUDA, tiny models."""

import os
import sys

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Triton's own jit helpers (tl.cdiv, ...) are built when triton.language is first imported,
    # in the mode TRITON_INTERPRET has then. Other tests import it indirectly (torch, DeepSpeed)
    # before the kernel tests run, so build it for the interpreter now, once; the kernel tests
    # set the variable per test, and everything else keeps the torch references.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401

    del os.environ["TRITON_INTERPRET"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _make_llama(vocab_size=96, num_layers=2, hidden_size=64, kv_heads=2, tied=True, seed=0):
    """A tiny Llama (4 heads, MLP width 128) in eval mode, its weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def make_llama():
    """The one tiny-Llama factory of the tests (keyword arguments: vocab_size, num_layers,
    hidden_size, kv_heads, tied, seed)."""
    return _make_llama


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama small enough for exact checks in milliseconds."""
    return _make_llama()
