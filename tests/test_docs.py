"""The README documents every CLI option (help and README must not drift apart)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from permcompile.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("command", ["optimize", "inspect", "verify", "eval"])
def test_every_option_is_in_readme(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", result.output)) - {"--help"}
    assert options, "no options parsed from --help"
    missing = sorted(o for o in options if o not in README)
    assert not missing, f"README does not mention {command} options {missing}"


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    assert test_cmd in README and test_cmd in ci
    assert "permcompile optimize minilm --sparsity 2:4 --out out/minilm" in README
