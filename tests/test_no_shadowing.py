"""No folder of the checkout may stand in for an installed distribution.

The checkout root is first on ``sys.path`` under ``python -m pytest``, in every Ray worker whose
driver started there (Ray puts the driver's working directory first), in ``presso submit
--working-dir .`` jobs and in the container image; a script's own folder is first on its path. A
folder with an ``__init__.py`` found there wins over an installed package of the same name:
``kernels/`` used to hide the Hugging Face package ``kernels`` that transformers >= 5.25 imports
while building any model. The code folders are therefore namespace portions (no ``__init__.py``),
which always lose to an installed package, and no script in ``bench/`` is named like one.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("compressors", "kernels", "orchestrator", "jobs")


def installed_kernels() -> Path:
    """Where the Hugging Face distribution ``kernels`` put its package."""
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))


def test_code_folders_are_namespace_portions():
    """A regular package (one with ``__init__.py``) at the root would shadow; a namespace portion
    cannot, whatever gets installed later under its name."""
    assert [f for f in CODE_FOLDERS if (ROOT / f / "__init__.py").exists()] == []


def test_no_root_package_or_script_is_named_like_an_installed_distribution():
    installed = set(importlib.metadata.packages_distributions())
    assert "kernels" in installed, "transformers' dependency `kernels` should be installed"
    importable = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    importable |= {p.stem for p in ROOT.glob("*.py")} | {
        p.stem for p in (ROOT / "bench").glob("*.py")
    }
    assert importable & installed == set()


@pytest.mark.parametrize("cwd", [".", "bench", "kernels"])
def test_interpreter_started_in_the_checkout_finds_the_installed_kernels(cwd):
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels').origin)"],
        cwd=ROOT / cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(out.stdout.strip()).resolve() == installed_kernels().resolve()


def _probe_worker() -> tuple[str, list[str], int]:
    """In a Ray worker: what ``kernels`` resolves to, and that transformers builds a Llama."""
    import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels` itself)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    origin = importlib.util.find_spec("kernels").origin
    return origin, list(sys.path), sum(p.numel() for p in model.parameters())


@pytest.mark.integration
def test_ray_worker_started_from_the_checkout_root_imports_installed_kernels(monkeypatch):
    import ray

    monkeypatch.chdir(ROOT)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        origin, worker_path, n_params = ray.get(ray.remote(_probe_worker).remote(), timeout=120)
    finally:
        ray.shutdown()
    # The scenario is real only if the checkout root is on the worker's path.
    assert any(Path(p or ".").resolve() == ROOT for p in worker_path), worker_path[:4]
    assert Path(origin).resolve() == installed_kernels().resolve()
    assert n_params > 0
