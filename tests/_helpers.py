"""Helpers shared by test modules (fixtures are in conftest.py).

:func:`child_at_marker` runs the command line in a child interpreter until it says it has reached a point, for
the signal tests: the test signals on that line, never after a delay.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

# Only a safety net: a healthy child reaches its marker, or exits after a signal, in seconds; these bound a hung
# one, however loaded the machine, and are never what a test waits for.
SAFETY_S = 600


def child_at_marker(patch: str, args: list, marker: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``permcompile`` ``args`` in a child interpreter that first runs ``patch`` (Python source which makes
    the child print ``marker`` on stderr when it reaches the point under test, then wait there, e.g. in
    ``signal.pause()``), and return ``(child, stderr so far)`` once the marker line has been read.

    Fails the test if the child ends before its marker (its stderr is shown); a child still silent after
    ``SAFETY_S`` is killed, which ends it the same way. Send the signal, then call :func:`finish`."""
    code = patch + "\nfrom permcompile.cli import main; main()"
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(SAFETY_S, child.kill)
    watchdog.start()
    seen = []
    try:
        for line in child.stderr:  # blocks until the child writes a line or exits
            if line.startswith(marker):
                return child, "".join(seen)
            seen.append(line)
    finally:
        watchdog.cancel()
    child.wait()
    raise AssertionError(f"the child ended (exit {child.returncode}) before it printed {marker!r}:\n"
                         + "".join(seen)[-3000:])


def finish(child: subprocess.Popen) -> str:
    """Wait for ``child`` (started by :func:`child_at_marker`) to exit; returns what it wrote on stderr after its
    marker line."""
    _, rest = child.communicate(timeout=SAFETY_S)
    return rest
