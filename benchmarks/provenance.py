"""Where a benchmark result comes from: the git commit (and uncommitted changes) and the command.

Every writer in benchmarks/ stores ``{"command": ..., "git": git_state()}`` in its JSON and
:func:`provenance_lines` under its Markdown table, so a table can be traced to the code that made it
(``make_results.py`` reads the commit back). Every result file is written by :func:`write_result`, which refuses
one whose provenance lacks a commit or a command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict:
    """``{"commit": HEAD, "modified": tracked files with uncommitted changes}``; outside a checkout, the
    environment's ``PERMCOMPILE_COMMIT`` (``"unknown"`` when unset) and ``modified: None``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        if head:
            return {"commit": head, "modified": [x[3:] for x in dirty]}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": os.environ.get("PERMCOMPILE_COMMIT", "unknown"), "modified": None}


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python benchmarks/<script> ARGS`` (``argv`` default: this process's arguments)."""
    return " ".join(["python", f"benchmarks/{script}"] + list(sys.argv[1:] if argv is None else argv))


def provenance_lines(out: dict) -> list[str]:
    """The Markdown lines naming ``out["git"]``'s commit and ``out["command"]``."""
    git = out.get("git") or {}
    commit = f"Commit `{(git.get('commit') or 'unknown')[:12]}`"
    if git.get("modified"):
        commit += f" plus uncommitted changes to {', '.join(git['modified'])}"
    return [commit, f"Command: `{out.get('command', '?')}`"]


class MissingProvenance(ValueError):
    """A result without the commit or the command that made it: it cannot be traced, so it is not written."""


def commit_of(provenance: dict) -> str:
    """The commit recorded in ``provenance`` (``{"git": {"commit": ...}}`` or a flat ``{"commit": ...}``)."""
    return str((provenance.get("git") or {}).get("commit") or provenance.get("commit") or "").strip()


def write_result(path: str | os.PathLike, content: dict | str, provenance: dict | None = None) -> Path:
    """Write one result file: ``content`` as JSON (``indent=1``) when it is a dict, as text otherwise.

    ``provenance`` (default: ``content`` itself) must name a commit (not "unknown": outside a checkout set
    ``PERMCOMPILE_COMMIT``) and a non-empty command; otherwise :class:`MissingProvenance` and nothing is written."""
    path = Path(path)
    prov = provenance if provenance is not None else content
    if not isinstance(prov, dict):
        raise MissingProvenance(f"refusing to write {path}: no provenance given (a dict with commit and command)")
    commit = commit_of(prov)
    if not commit or commit == "unknown":
        raise MissingProvenance(f"refusing to write {path}: the result records no commit (run from a git checkout "
                                "or set PERMCOMPILE_COMMIT)")
    if not str(prov.get("command") or "").strip():
        raise MissingProvenance(f"refusing to write {path}: the result records no command")
    path.write_text(json.dumps(content, indent=1) if isinstance(content, dict) else content)
    return path
