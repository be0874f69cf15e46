"""Every name a benchmark imports from presso exists. The benchmarks are not run by the tests
(they take minutes to hours), and their presso imports sit inside ``main`` after argument
parsing, so a function moved between modules broke ``bench/recover.py`` unnoticed until a
30-minute run began; this reads every ``from presso... import ...`` in ``bench/`` instead."""

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imports():
    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("presso"):
                for alias in node.names:
                    yield pytest.param(node.module, alias.name, id=f"{script.name}:{alias.name}")


@pytest.mark.parametrize(("module", "name"), list(_imports()))
def test_bench_import_exists(module, name):
    imported = importlib.import_module(module)
    assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
        f"{module} has no {name}"
    )
