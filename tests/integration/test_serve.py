"""The registered model serves where presso is not installed: from a fresh virtual environment
holding only mlflow and what the model's own requirements list, `mlflow models serve` on the
champion alias answers a request with the logits presso computes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import presso
from presso.compressors.formats.artifact import save_compressed
from presso.compressors.quant.rtn import RTN
from presso.orchestrator.model_registry import INPUT_EXAMPLE, log_and_register

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ping(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer (server exit code {server.poll()})")


def _pip(venv: Path, *args: str, cwd: Path) -> None:
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        cwd=cwd, check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _constraints(tmp_path: Path) -> Path:
    """requirements.lock without its hashes: the locked versions (so the fresh environment gets
    what the tests ran with, from pip's cache), without turning on pip's hash-checking mode."""
    lines = [
        line.split("\\")[0].strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
    ]
    pins = [line for line in lines if "==" in line and not line.startswith("#")]
    path = tmp_path / "constraints.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


@pytest.mark.timeout(1200)
def test_champion_serves_from_a_fresh_venv(mlflow_server, make_llama, tmp_path):
    """The whole delivery path: presso registers a packed model (the presso wheel rides along
    under code/, its requirements name it by that path); elsewhere — a new venv, outside the
    checkout, nothing but `pip install mlflow` and `pip install -r requirements.txt` from the
    downloaded model — `mlflow models serve -m models:/NAME@champion --env-manager local`
    answers the model's own input example with presso's next-token logits."""
    torch.set_num_threads(1)
    model = make_llama()
    records = {
        name: RTN(bits=4, group_size=32).compress(m.weight, name=name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    save_compressed(model, records, tmp_path / "artifact")
    name, uri = f"serve-{uuid.uuid4().hex[:8]}", mlflow_server.uri
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(name))
    registered = log_and_register(client, uri, run.info.run_id, tmp_path / "artifact", name, 2.0)
    assert registered.champion
    client.set_terminated(run.info.run_id)

    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}@champion", dst_path=str(tmp_path / "model"), tracking_uri=uri
        )
    )
    requirements = (model_dir / "requirements.txt").read_text().split()
    wheel = next(r for r in requirements if r.startswith("code/presso-"))
    assert (model_dir / wheel).is_file() and not any(r.startswith("presso==") for r in requirements)
    signature = json.loads((model_dir / "serving_input_example.json").read_text())
    assert signature == {"inputs": INPUT_EXAMPLE}

    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tick = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    constraints = _constraints(tmp_path)
    _pip(venv, f"mlflow=={mlflow.__version__}", "-c", str(constraints), cwd=elsewhere)
    _pip(venv, "-r", "requirements.txt", "-c", str(constraints), cwd=model_dir)
    install_s = time.monotonic() - tick

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{venv / 'bin'}:{env['PATH']}")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import presso; print(presso.__file__)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(venv) in where and str(ROOT) not in where  # the wheel's presso, not the checkout

    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [str(venv / "bin" / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere, env=env, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_ping(f"http://127.0.0.1:{port}/ping", server, timeout=300)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": INPUT_EXAMPLE}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            (served,) = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    expected = presso.load_compressed(tmp_path / "artifact", dtype=torch.float32)
    with torch.no_grad():
        logits = expected(torch.tensor(INPUT_EXAMPLE)).logits[0, -1]
    torch.testing.assert_close(torch.tensor(served, dtype=torch.float64), logits.double())
    print(f"fresh venv: install {install_s:.0f} s")  # ~2 min here, 3.2 GB (ray, triton, ...)
