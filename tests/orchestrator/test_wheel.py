"""The presso wheel a registered model carries: built from the checkout, without its tests, and
without leaving build files in the checkout."""

import subprocess
import zipfile

from presso.orchestrator.model_registry import serving_requirements
from presso.orchestrator.wheel import build_wheel, checkout_root


def test_wheel_holds_the_package_and_the_checkout_stays_clean(tmp_path):
    """What `pip install code/presso-*.whl` needs to load and serve an artifact is in it; the
    build ran on a copy, so `git status` of the checkout shows nothing new; the model's
    requirements name the wheel by its path inside the model, not a version no index has."""
    root = checkout_root()
    before = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                            capture_output=True, text=True).stdout  # fmt: skip
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("presso/__init__.py", "presso/compressors/formats/loading.py",
                   "presso/orchestrator/mlflow_model.py", "presso/kernels/wquant_matmul.py"):  # fmt: skip
        assert module in names
    assert not any(n.startswith(("tests/", "presso/tests/")) for n in names)
    after = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                           capture_output=True, text=True).stdout  # fmt: skip
    assert after == before
    requirements = serving_requirements(wheel)
    assert requirements[0] == f"code/{wheel.name}"
    assert [r.split("==")[0] for r in requirements[1:]] == ["torch", "transformers", "safetensors"]
