"""Where a benchmark result comes from: the git commit (and uncommitted changes) and the command.

Every writer in benchmarks/ stores ``{"command": ..., "git": git_state()}`` in its JSON and
:func:`provenance_lines` under its Markdown table, so a table can be traced to the code that made it
(``make_results.py`` reads the commit back).
"""
from __future__ import annotations

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
