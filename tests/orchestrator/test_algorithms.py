"""``presso algorithms``: one source for what a recipe may say — the algorithms' dataclasses —
shown by the CLI, copied into the README, and enforced on every recipe entry."""

import subprocess
import sys
from pathlib import Path

import pytest

from presso import ConfigError
from presso.compressors.registry import ALGORITHMS, build
from presso.orchestrator.algorithms import BEGIN, END, render, with_reference
from presso.orchestrator.config import load_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_the_generated_one():
    """The README's settings reference is exactly what the registry renders today; when it
    fails, `python -m presso.orchestrator.algorithms README.md` brings it up to date."""
    readme = README.read_text()
    assert BEGIN in readme and END in readme
    assert with_reference(readme) == readme


def test_every_algorithm_says_what_it_is_for_and_what_each_setting_does():
    """A listing with a blank purpose or setting is no help to a user choosing between them."""
    for name in ALGORITHMS.names():
        entry = ALGORITHMS.get(name, "test")
        assert entry.description and not entry.description.startswith(entry.config.__name__)
        for setting in entry.settings():
            assert setting.help, (name, setting.name)
            assert setting.type in ("int", "float", "bool", "str"), (name, setting.name)


def test_cli_lists_one_or_all_and_refuses_unknown_names():
    """`presso algorithms gptq` shows its settings with types and defaults (act-order on);
    an unknown name is one error line naming the known ones, exit status 2."""
    cli = [sys.executable, "-m", "presso.orchestrator.cli", "algorithms"]
    one = subprocess.run([*cli, "gptq"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stdout == render(["gptq"])
    assert "| `act_order` | bool | `true` |" in one.stdout
    every = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert every.stdout == render() and every.stdout.count("#### ") == len(ALGORITHMS.names())
    bad = subprocess.run([*cli, "gtpq"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown algorithm 'gtpq'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bitz": 3}, r"gptq\.bitz: unknown setting"),
        ({"bits": "3"}, r"gptq\.bits: expected int, got '3'"),
        ({"act_order": 1}, r"gptq\.act_order: expected bool, got 1"),
    ],
)
def test_recipe_entries_are_checked_against_the_definitions(params, message):
    with pytest.raises(ConfigError, match=message):
        build("gptq", params, "compress.recipe[0]")


def test_string_settings_are_type_checked_too():
    with pytest.raises(ConfigError, match=r"magnitude\.pattern: expected str, got 24"):
        build("magnitude", {"pattern": 24})


def test_config_show_spells_out_every_setting():
    """The resolved config shows each recipe entry with all its settings, defaults included."""
    cfg = load_config(None, ["compress.recipe=[{gptq: {bits: 3}}]"])
    (entry,) = cfg.compress.recipe
    expected = {s.name: s.default for s in ALGORITHMS.settings("gptq")} | {"bits": 3}
    assert entry == {"gptq": expected}
