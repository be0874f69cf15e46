"""The presso wheel a registered model carries, built from the checkout presso runs from.

presso is on no package index, so a model whose requirements say ``presso==0.1.0`` cannot be
rebuilt anywhere else. Instead the model version holds the wheel itself (under ``code/``) and its
requirements name it by that path, the way MLflow's own wheeled models do (``wheels/...``): from
the model's folder, ``pip install -r requirements.txt`` installs presso without any index.

The wheel is built from a copy of the package's sources (what ``pyproject.toml`` packages), so
the build leaves nothing in the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import presso

# What the wheel is built from: pyproject.toml maps these to the `presso` package.
SOURCES = (
    "pyproject.toml",
    "README.md",
    "__init__.py",
    "compressors",
    "kernels",
    "orchestrator",
    "jobs",
)


def checkout_root() -> Path | None:
    """The checkout presso is imported from, or None for an installed (non-editable) presso."""
    root = Path(presso.__file__).resolve().parent
    return root if all((root / name).exists() for name in SOURCES) else None


def build_wheel(dest: Path) -> Path | None:
    """Build presso's wheel (no dependencies bundled) into ``dest``; None without a checkout or
    when it cannot be built (the model then requires ``presso==<version>``, as before)."""
    root = checkout_root()
    if root is None:
        return None
    src = dest / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=ignore)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, src / name)
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "--disable-pip-version-check", "-w", str(dest), str(src)],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:  # no pip or setuptools here: register
        detail = getattr(e, "stderr", None) or e  # anyway, with the version requirement
        print(f"presso: could not build the presso wheel ({str(detail)[-300:]})", file=sys.stderr)
        return None
    (wheel,) = dest.glob("presso-*.whl")
    return wheel
