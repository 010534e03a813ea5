"""The README stays short and true: every CLI option documented, its commands runnable, CI running its test command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from permcompile.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_CMD = 'pip install torch==2.13.0 && pip install -e ".[dev]" && ruff check . && python -m pytest -q'


def mentions(text: str, flag: str) -> bool:
    """``flag`` as a whole option name (``--seq`` is not found inside ``--seq-len`` or ``--sequential``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_mentions_is_exact():
    assert mentions("use --seq 1,2,3", "--seq") and mentions("`--seq`", "--seq")
    assert not mentions("--sequential and --seq-len", "--seq") and not mentions("--no-seq", "--seq")


@pytest.mark.parametrize("command", ["optimize", "inspect", "verify", "eval"])
def test_every_option_is_in_readme(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", result.output)) - {"--help"}
    assert options, "no options parsed from --help"
    missing = sorted(o for o in options if not mentions(README, o))
    assert not missing, f"README does not mention {command} options {missing}"


def test_readme_is_short():
    assert len(README.splitlines()) <= 150


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_CMD in README.splitlines()
    commands = [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith("#") and not ln.startswith(
        ("set ", "cd "))]
    assert commands == [TEST_CMD], commands  # exactly the README's command, nothing else
    assert "permcompile optimize minilm --sparsity 2:4 --out out/minilm" in README


def test_readme_paths_exist():
    """The walkthrough runs on shipped data: every repository path the README names exists."""
    paths = set(re.findall(r"(?<![\w/.])((?:permcompile|docs|benchmarks|tests)/[\w./-]*\w)", README))
    assert "permcompile/heldout/persuasion.txt" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_readme_names_every_permutation_strategy_and_no_retired_one():
    """The strategy list in the README is the registry's (passes/permute.STRATEGIES), and the retired alias is gone."""
    from permcompile.passes.permute import STRATEGIES

    line = README[README.index("Strategies:"):].split("\n\n", 1)[0]
    assert all(f"`{name}`" in line for name in STRATEGIES), line
    assert "e2e" not in README and not mentions(README, "--learn")
