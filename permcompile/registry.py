"""One table per choice where implementations compete: name → (handler, config type, help).

The CLI reads its choices and help from the table, the config validates against it, and the docs are checked
against it, so adding an implementation touches one place. Two instances exist: the permutation strategies
(``config.STRATEGIES``) and the quantization modes (``quantization.QUANT_MODES``).

>>> colours = Registry("colour", "--colour")
>>> @colours.register("red", help="warm")
... def _red(request):
...     return "r"
>>> colours.choices()
('red',)
>>> colours.get("red").handler(None)
'r'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import UsageError


@dataclass(frozen=True)
class Entry:
    """One implementation: ``handler`` does the work, ``config_type`` (or None) holds its knobs, ``help`` is the
    one-line text the CLI and docs show."""

    name: str
    handler: Callable
    config_type: type | None
    help: str


class Registry:
    """Names in registration order, each with one :class:`Entry`. ``what`` names the choice in messages
    ("permutation strategy"), ``option`` the CLI flag that picks it ("--permutation")."""

    def __init__(self, what: str, option: str | None = None):
        self.what = what
        self.option = option
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, handler: Callable, *, config_type: type | None = None, help: str) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        entry = Entry(name, handler, config_type, help)
        self._entries[name] = entry
        return entry

    def register(self, name: str, *, config_type: type | None = None, help: str):
        """Decorator form of :meth:`add`; returns the function unchanged."""
        def decorate(fn: Callable) -> Callable:
            self.add(name, fn, config_type=config_type, help=help)
            return fn
        return decorate

    def choices(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name raises one ``UsageError`` line listing the choices."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            label = f"{self.option} {name}" if self.option else f"{self.what} {name!r}"
            raise UsageError(f"unknown {label}; choose one of {', '.join(self._entries)}") from None

    def for_config(self, config) -> Entry:
        """The entry whose ``config_type`` is ``type(config)`` (torchao's dispatch on the config's type)."""
        for entry in self._entries.values():
            if entry.config_type is not None and type(config) is entry.config_type:
                return entry
        raise UsageError(f"no {self.what} takes a {type(config).__name__}")

    def help_text(self) -> str:
        """``name: help`` for every entry, joined by "; " (what a CLI option's help lists)."""
        return "; ".join(f"{e.name}: {e.help}" for e in self._entries.values())

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
