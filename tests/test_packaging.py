"""The built wheel must carry every sub-package and the job specs, not just what an editable
install happens to find on disk."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_wheel_contains_every_subpackage_and_job(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("presso-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"presso/__init__.py"}
    for folder in ("orchestrator", "compressors", "kernels", "jobs"):
        for module in (ROOT / folder).rglob("*.py"):
            expected.add("presso/" + str(module.relative_to(ROOT)))
    expected |= {f"presso/jobs/{p.name}" for p in (ROOT / "jobs").glob("*.yaml")}
    # the dispatcher's measured tables: without them an installed presso never uses a kernel
    expected |= {f"presso/kernels/measured/{p.name}" for p in (ROOT / "kernels/measured").glob("*")}
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("presso/tests/", "presso/bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "presso = presso.orchestrator.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
