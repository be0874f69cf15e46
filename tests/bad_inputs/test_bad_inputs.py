"""Every bad input in this folder must end in one line from the CLI — presso's own error, saying
what to fix — with no traceback, no Ray or MLflow started, and nothing written to the output folder.

Each ``*.yaml`` here is a job; its header comments name the command (default ``run``) and a
substring the error must contain; ``# raw: yes`` keeps the file byte for byte (otherwise a readable
job is completed with a tiny base config, so only its own fault remains). ``@NAME@`` placeholders
point at files the fixture builds: a tiny corpus and model, and broken variants of models,
artifacts and checkpoints.
"""

import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from presso.compressors.formats.artifact import save_compressed
from presso.compressors.formats.integrity import write_manifest
from presso.compressors.quant.rtn import RTN
from presso.orchestrator.cli import main
from presso.orchestrator.data import ByteTokenizer

HERE = Path(__file__).parent
CASES = sorted(HERE.glob("*.yaml"))
BASE = {
    "data": {"val_works": ["beta"], "test_works": ["gamma"]},
    "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "workers": 2},
    "model": {"scratch": {"hidden_size": 64, "num_layers": 1, "intermediate_size": 128}},
}


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    ByteTokenizer().save_pretrained(folder)
    return folder


def _checkpoint(folder: Path, model) -> Path:
    for rank in range(2):
        own = folder / f"rank{rank}"
        own.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "optimizer": {}}, own / "engine.pt")
        torch.save({"step": 2, "world": 2, "rng": torch.get_rng_state()}, own / "train.pt")
        write_manifest(own)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_llama):
    tiny = dict(vocab_size=256, num_layers=1, tied=False)
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("alpha", "beta", "gamma", "delta"):
        (corpus / f"{name}_gut.txt").write_text(f"{name}: to be or not to be. " * 40)
    (root / "empty").mkdir()
    binary = root / "binary_corpus"
    shutil.copytree(corpus, binary)
    (binary / "delta_gut.txt").write_bytes(bytes(range(256)) * 8)  # named like a work, not text
    model = make_llama(**tiny)
    good = _save(model, root / "model")
    corrupt = _save(model, root / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    nan = make_llama(**tiny)
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    _save(nan, root / "nan")
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))  # a valid GGUF without a model
    cut = root / "cut" / "model.gguf"
    cut.parent.mkdir()
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little") + bytes(4))  # 5 tensors?
    records = {
        n: RTN(bits=4, group_size=32).compress(m.weight, name=n)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    save_compressed(model, records, root / "artifact_ok", ByteTokenizer())
    shutil.copytree(root / "artifact_ok", root / "artifact")
    packed = root / "artifact" / "model.safetensors"
    packed.write_bytes(packed.read_bytes()[:-8] + b"\x00" * 8)
    ckpt = _checkpoint(root / "ckpt", make_llama(**tiny, hidden_size=32))
    tampered = _checkpoint(root / "ckpt_tampered", make_llama(**tiny))
    (tampered / "rank1" / "train.pt").write_bytes(b"not a checkpoint")
    # A port where something listens (the kernel completes the handshake) but never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    yield {
        "CORPUS": corpus,
        "EMPTY": root / "empty",
        "BINARY_CORPUS": binary,
        "MISSING": root / "does-not-exist",
        "MODEL": good,
        "CORRUPT_MODEL": corrupt,
        "NAN_MODEL": root / "nan",
        "GGUF": gguf,
        "CUT_GGUF": cut,
        "ARTIFACT": root / "artifact",
        "ARTIFACT_OK": root / "artifact_ok",
        "CKPT": ckpt,
        "CKPT_TAMPERED": tampered,
        "NOT_RAY": f"127.0.0.1:{silent.getsockname()[1]}",
    }
    silent.close()


def _merge(base: dict, case: dict) -> dict:
    out = dict(base)
    for key, value in case.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _job(case: Path, files: dict, tmp_path: Path) -> Path:
    text = re.sub(r"@([A-Z_]+)@", lambda m: str(files[m.group(1)]), case.read_text())
    base = _merge(BASE, {"data": {"path": str(files["CORPUS"])}})
    try:
        parsed = None if _header(case, "raw") == "yes" else yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, dict):  # a readable job: complete it so only its own fault remains
        text = yaml.safe_dump(_merge(base, parsed))
    job = tmp_path / case.name
    job.write_text(text)
    return job


def _header(case: Path, key: str, default: str | None = None) -> str | None:
    m = re.search(rf"^# {key}: (.+)$", case.read_text(), re.M)
    return m.group(1).strip() if m else default


def test_there_are_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_input_is_one_clear_line(case, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a Ray start attempt would fail loudly
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking would write under out/
    monkeypatch.setenv("PRESSO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    command = _header(case, "command", "run")
    code = main([command, str(_job(case, files, tmp_path)), f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("presso: error: ") and err.count("\n") == 1, err
    assert _header(case, "expect") in err
    assert not out.exists(), f"partial output left behind: {list(out.rglob('*'))}"
