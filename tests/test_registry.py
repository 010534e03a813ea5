"""The generic name → (handler, config type, help) table."""
from __future__ import annotations

import doctest
from dataclasses import dataclass

import pytest

import permcompile.registry as registry
from permcompile.errors import UsageError
from permcompile.registry import Registry


@dataclass(frozen=True)
class _Knobs:
    k: int = 1


def test_choices_keep_order_and_get_returns_the_entry():
    reg = Registry("thing", "--thing")
    reg.add("b", lambda r: 2, help="second")
    reg.register("a", config_type=_Knobs, help="first")(lambda r: 1)
    assert reg.choices() == ("b", "a") and "a" in reg and len(reg) == 2
    entry = reg.get("a")
    assert entry.handler(None) == 1 and entry.config_type is _Knobs and entry.help == "first"
    assert reg.for_config(_Knobs()).name == "a"
    assert reg.help_text() == "b: second; a: first"


def test_unknown_name_is_one_usage_line_listing_the_choices():
    reg = Registry("thing", "--thing")
    reg.add("x", print, help="")
    reg.add("y", print, help="")
    with pytest.raises(UsageError) as info:
        reg.get("z")
    assert str(info.value) == "unknown --thing z; choose one of x, y"
    with pytest.raises(ValueError):
        reg.add("x", print, help="")


def test_docstring_example_runs():
    assert doctest.testmod(registry).failed == 0
