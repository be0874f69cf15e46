"""The architecture matrix: every declared architecture, built tiny from its transformers config
class (no downloads), compressed end to end and reloaded from its artifact."""

import copy

import pytest
import torch

import presso
from presso import ConfigError, UnsupportedError
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.ptq.architectures import (
    LLAMA,
    Architecture,
    architecture_of,
    register_architecture,
)
from presso.compressors.ptq.blocks import BlockInputs, capture_inputs, compress_model
from presso.compressors.quant.awq import fold_scale

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
HEADS = dict(num_attention_heads=4, head_dim=16)
# Sliding windows shorter than the calibration windows (16 tokens), so that Gemma's sliding and
# global layers are called with different masks.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, **HEADS}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL, **HEADS, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SMALL, **HEADS}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, **HEADS}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**SMALL, **HEADS, "sliding_window": 8}),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **SMALL,
            **HEADS,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),  # fmt: skip
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            **SMALL,
            "num_attention_heads": 4,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),  # fmt: skip
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
    ),  # fmt: skip
}
GRID = {"bits": 4, "group_size": 32}
RECIPES = {
    "rtn": [{"rtn": GRID}],
    "gptq": [{"gptq": GRID}],
    "awq+gptq": [{"awq": GRID}, {"gptq": GRID}],
    "sparsegpt": [{"sparsegpt": {"sparsity": 0.5}}],
}


def build(model_type: str, kv_heads: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type``: 2 blocks, width 64, tied embeddings (where the
    architecture has them), grouped KV heads unless ``kv_heads`` is 4."""
    import transformers

    config_name, model_name, kwargs = ARCHS[model_type]
    if model_type != "opt":  # OPT has no grouped KV heads
        kwargs = {**kwargs, "num_key_value_heads": kv_heads}
    config = getattr(transformers, config_name)(**kwargs, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random norms: an exact fold must hold for any norm weight
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (2, 16), generator=gen) for _ in range(3)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_every_declared_type_is_in_the_matrix():
    """A description added without a tiny model here would go untested."""
    from presso.compressors.ptq.architectures import ARCHITECTURES

    assert set(ARCHITECTURES) == set(ARCHS)


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_compress_save_load(model_type, recipe, tmp_path):
    """RTN, GPTQ, AWQ+GPTQ and SparseGPT on each architecture, through save → load_compressed:
    the reloaded artifact must compute exactly what the in-memory compressed model computes,
    keep the tied head tied, and every block's linears must have been compressed."""
    model = build(model_type)
    dense = copy.deepcopy(model)
    records = compress_model(model, RECIPES[recipe], calibration())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    arch = architecture_of(model)
    assert set(records) == {n for n in linears if n.startswith(arch.blocks)}
    save_compressed(model, records, tmp_path / "art", dtype=torch.float32)  # exact reload
    loaded = presso.load_compressed(tmp_path / "art")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert not torch.equal(dense(ids).logits, expected)  # something was compressed
    head, embed = (loaded.get_submodule(n).weight for n in (arch.lm_head, arch.embeddings))
    assert head.data_ptr() == embed.data_ptr()


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_block_by_block_replays_the_model(model_type):
    """The block loop feeds each block the captured arguments of that very block; run block by
    block, the model must give the hidden states its own forward gives. With one set of
    arguments for all blocks, Gemma's global layers would calibrate with a sliding-window mask."""
    model = build(model_type)
    batches = calibration()
    hidden, kwargs = capture_inputs(model, batches)
    _, blocks = architecture_of(model).find_blocks(model)
    with torch.no_grad():
        for b, (h, ids) in enumerate(zip(hidden, batches)):
            states = model(ids, output_hidden_states=True).hidden_states
            assert torch.equal(h, states[0])
            for i, block in enumerate(blocks[:-1]):  # the last one is followed by the final norm
                h = block(h, **kwargs[i][b])
                assert torch.allclose(h, states[i + 1], atol=1e-5), (b, i)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_declared_groups_fold_exactly(model_type):
    """Each declared group is an exact fold: dividing the producer's outputs by any positive
    scale and multiplying the linears' inputs by it leaves the logits unchanged (Gemma's norms
    scale by 1 + weight, OPT's fc1 → fc2 passes a ReLU). A wrong group would not."""
    model = build(model_type, kv_heads=4)  # v → o folds only without grouped KV heads
    arch = architecture_of(model)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    _, blocks = arch.find_blocks(model)
    gen = torch.Generator().manual_seed(2)
    for block in blocks:
        for prev, names in arch.groups:
            lins = [block.get_submodule(n) for n in names]
            s = torch.rand(lins[0].in_features, generator=gen) * 1.5 + 0.5
            fold_scale(block.get_submodule(prev), lins, s, arch.norm_offset)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_awq_searches_every_declared_group(model_type):
    """AWQ's scale search runs on each group the architecture declares (none skipped because
    a name or a statistic failed to line up), here on the first block of each model."""
    from presso.compressors.ptq.blocks import InProcess, Recipe, select_layers
    from presso.compressors.quant.awq import AWQ

    model = build(model_type, kv_heads=4)  # v → o folds only without grouped KV heads
    awq = AWQ(group_size=32, clip=False)
    layers = select_layers(model, Recipe([awq], awq), ["lm_head"])
    prefix, names = layers.blocks[0]
    block = model.get_submodule(prefix)
    hidden, kwargs = capture_inputs(model, calibration())
    inputs = BlockInputs(hidden, kwargs[0])
    stats = InProcess().stats(block, prefix, inputs, awq.make_stats, names)
    alphas = awq.transform_block(block, stats, prefix, layers.architecture)
    assert set(alphas) == {prev for prev, _ in layers.architecture.groups}


def test_unknown_architecture_fails_up_front_saying_how_to_describe_it():
    """A model type with no description is refused before any work, with the way out."""
    model = build("llama")
    model.config.model_type = "mything"
    with pytest.raises(UnsupportedError, match="mything.*register_architecture") as e:
        compress_model(model, RECIPES["rtn"], calibration())
    assert "Architecture(blocks=" in str(e.value)


def test_a_description_can_be_passed_or_registered():
    """The documented ways in for another architecture: pass a description, or register it
    for the model type; a description that does not match the model is refused."""
    model = build("llama")
    model.config.model_type = "mything"
    records = compress_model(copy.deepcopy(model), RECIPES["awq+gptq"], calibration(),
                             architecture=LLAMA)  # fmt: skip
    assert len(records) == 14
    wrong = Architecture(blocks="model.blocks")
    with pytest.raises(UnsupportedError, match="model.blocks"):
        compress_model(copy.deepcopy(model), RECIPES["rtn"], architecture=wrong)
    misnamed = Architecture(blocks="model.layers", groups=[("ln_1", ["self_attn.q_proj"])])
    with pytest.raises(UnsupportedError, match="ln_1"):
        compress_model(copy.deepcopy(model), RECIPES["rtn"], architecture=misnamed)
    register_architecture("mything", LLAMA)
    try:
        assert compress_model(model, RECIPES["rtn"]).keys() == records.keys()
    finally:
        from presso.compressors.ptq.architectures import ARCHITECTURES

        del ARCHITECTURES["mything"]


def test_a_job_file_description_is_checked_like_any_config():
    """``model.architecture`` in a job file becomes the same description; a misspelt key or a
    malformed group fails naming the key, before any work."""
    d = {"blocks": "model.layers", "groups": [["input_layernorm", ["self_attn.q_proj"]]]}
    arch = Architecture.from_dict(d)
    assert arch.groups == (("input_layernorm", ("self_attn.q_proj",)),)
    with pytest.raises(ConfigError, match=r"model.architecture: unknown keys \['group'\]"):
        Architecture.from_dict({"blocks": "model.layers", "group": []})
    with pytest.raises(ConfigError, match="model.architecture.groups"):
        Architecture.from_dict({"blocks": "model.layers", "groups": [["input_layernorm"]]})
    with pytest.raises(ConfigError, match="blocks is required"):
        Architecture.from_dict({"groups": []})


def test_the_readmes_description_of_another_architecture_works(tmp_path):
    """The README's example description (GPT-NeoX, which presso does not describe itself),
    taken from the README: its groups fold exactly, and AWQ + GPTQ through it round-trips."""
    from pathlib import Path

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("gpt_neox = Architecture(")
    source = readme[start : readme.index("\n)\n", start) + 2]
    namespace = {"Architecture": Architecture}
    exec(source, namespace)
    arch = namespace["gpt_neox"]
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128)  # fmt: skip
    model = GPTNeoXForCausalLM(config).eval()
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        compress_model(copy.deepcopy(model), RECIPES["rtn"])
    ids = torch.randint(3, VOCAB, (2, 12))
    folded = copy.deepcopy(model)
    for block in arch.find_blocks(folded)[1]:
        for prev, names in arch.groups:
            lins = [block.get_submodule(n) for n in names]
            s = torch.rand(lins[0].in_features) + 0.5
            fold_scale(block.get_submodule(prev), lins, s, arch.norm_offset)
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    records = compress_model(model, RECIPES["awq+gptq"], calibration(), architecture=arch)
    save_compressed(model, records, tmp_path / "art", dtype=torch.float32)  # exact reload
    with torch.no_grad():
        assert torch.equal(presso.load_compressed(tmp_path / "art")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_automatic_half_precision_is_bf16_where_fp16_overflows(model_type):
    """An fp32 model's artifact is stored, and by default computed, in half precision. Gemma's
    residual stream outgrows fp16 (Gemma-3-270M reaches |h| = 1e5 > 65,504: NaN perplexity from
    an fp16 artifact, found by bench/ptq.py), so Gemma gets bf16; the others fp16, as
    llm-compressor stores them."""
    from presso.compressors.formats.artifact import storage_dtype

    expected = torch.bfloat16 if model_type.startswith("gemma") else torch.float16
    assert storage_dtype(build(model_type)) == expected
