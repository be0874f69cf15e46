"""``presso.compress``: the README's first Python example, run as written, and the one call's
promises (a packed copy equal to its artifact, the pipeline's own results, clear refusals)."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import presso
from presso import ConfigError, DataError
from presso.compressors.ptq.blocks import compress_model
from presso.orchestrator.api import text_windows
from presso.orchestrator.config import load_config

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the "
    "clouds that lour'd upon our house in the deep bosom of the ocean buried. "
) * 20


def make_tokenizer(folder: Path, bos: bool):
    """A small byte-level BPE tokenizer trained here (no download), saved as a HF tokenizer;
    with ``bos`` it puts ``<s>`` before every text, as Llama's and Gemma's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture
def model_folder(tmp_path, make_llama):
    """A tiny random Llama and its tokenizer in a Hugging Face folder, as a user has one."""
    folder = tmp_path / "tiny-llama"
    tokenizer = make_tokenizer(folder, bos=True)
    make_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    return folder


def test_the_readmes_first_python_example_runs_as_written(model_folder, tmp_path):
    """The example a new user copies: run it unchanged but for the model's folder, in a fresh
    interpreter, on two text files; the artifact it writes must reload to the model it returns."""
    section = README.read_text().split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 10
    assert '"path/to/a-causal-lm"' in code
    code = code.replace('"path/to/a-causal-lm"', repr(str(model_folder)))
    check = """
ids = tokenizer(texts[0][:200], return_tensors="pt").input_ids
import torch
with torch.no_grad():
    again = presso.load_compressed("model-w4", dtype=torch.float32)  # as stored, in fp32
    assert torch.equal(again(ids).logits, small(ids).logits)
    assert not torch.equal(model(ids).logits, small(ids).logits)
print("ok", type(small.model.layers[0].mlp.down_proj).__name__)
"""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text(TEXT)
    (work / "report.txt").write_text(TEXT.upper())
    out = subprocess.run(
        [sys.executable, "-c", code + check], cwd=work, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok QuantizedLinear" in out.stdout
    assert (work / "model-w4" / "manifest.json").is_file()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _calib():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (6, 16), generator=gen)


def test_one_call_is_the_pipelines_compress_path(tiny_llama, tmp_path):
    """The returned model computes exactly what compress_model's model computes (same block
    loop, same records), exactly what its artifact reloads to, and the input stays dense."""
    dense = copy.deepcopy(tiny_llama)
    recipe = [{"awq": {"group_size": 32}}, {"gptq": {"group_size": 32}}]
    small = presso.compress(
        tiny_llama, recipe, calibration=_calib(), output=tmp_path / "art", dtype=torch.float32
    )
    reference = copy.deepcopy(dense)
    compress_model(reference, recipe, list(_calib().split(8)))
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        logits = small(ids).logits
        assert torch.equal(logits, reference(ids).logits)
        assert torch.equal(logits, presso.load_compressed(tmp_path / "art")(ids).logits)
        assert torch.equal(tiny_llama(ids).logits, dense(ids).logits)


def test_a_budget_in_one_call(tiny_llama, tmp_path):
    """A budget instead of a recipe: the planner chooses per layer and the artifact keeps to it
    (stored bits per planned weight, the block linears' and the tied embedding's, scales
    included, whatever stays dense counted at 32)."""
    import json

    from safetensors.torch import load_file

    presso.compress(tiny_llama, {"avg_bits": 4.5}, calibration=_calib(), output=tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    packed = config["quantization_config"]["presso"]["layers"]
    state = load_file(tmp_path / "a" / "model.safetensors")
    planned = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)][:-1]
    planned.append("model.embed_tokens")
    stored = sum(
        t.numel() * t.element_size() for k, t in state.items() if k.rpartition(".")[0] in packed
    )
    stored += sum(
        4 * tiny_llama.get_submodule(n).weight.numel() for n in planned if n not in packed
    )
    weights = sum(tiny_llama.get_submodule(n).weight.numel() for n in planned)
    assert packed and 8 * stored / weights <= 4.5
    with pytest.raises(ConfigError, match="max_ppl_increase_pct"):
        presso.compress(tiny_llama, {"max_ppl_increase_pct": 5}, calibration=_calib())


def test_text_windows_start_with_bos_where_the_tokenizer_puts_one(tmp_path):
    """Texts become one stream cut into equal windows; with a BOS-using tokenizer every window
    starts with BOS (Gemma computes garbage without it), without one none is added."""
    with_bos = make_tokenizer(tmp_path / "a", bos=True)
    batches = text_windows([TEXT, TEXT], with_bos, seq_len=32, batch_size=4)
    windows = torch.cat(batches)
    assert windows.shape[1] == 32 and len(batches[0]) == 4
    assert (windows[:, 0] == with_bos.bos_token_id).all()
    assert (windows[:, 1:] != with_bos.bos_token_id).all()
    plain = make_tokenizer(tmp_path / "b", bos=False)
    windows = torch.cat(text_windows([TEXT], plain, seq_len=32, batch_size=4))
    assert windows.shape[1] == 32 and (windows != plain.bos_token_id).all()
    short = torch.cat(text_windows(["a few words"], plain, seq_len=512, batch_size=4))
    assert short.shape[0] == 1  # shorter texts than a window: one window of all of them


def test_refusals_say_what_to_pass(tiny_llama):
    """What a new user gets wrong is refused before any work, naming the argument."""
    with pytest.raises(ConfigError, match="tokenizer="):
        presso.compress(tiny_llama, "gptq", calibration=["some text"])
    with pytest.raises(DataError, match="calibration="):
        presso.compress(tiny_llama, {"gptq": {"group_size": 32}})
    with pytest.raises(ConfigError, match=r"recipe\[0\]: unknown algorithm 'gtpq'"):
        presso.compress(tiny_llama, "gtpq")
    with pytest.raises(ConfigError, match="workers"):
        presso.compress(tiny_llama, "rtn", workers=-1)
    from presso.compressors.ptq.architectures import LLAMA

    with pytest.raises(ConfigError, match="register_architecture"):  # not silently ignored
        presso.compress(tiny_llama, {"avg_bits": 4}, calibration=_calib(), architecture=LLAMA)
    with pytest.raises(ConfigError, match="model.architecture: a budget plan"):
        load_config(
            None, ["model.architecture={blocks: model.layers}", "compress.budget.avg_bits=4"]
        )
