"""How every ``permcompile`` command runs: one ``error:`` line per failure, SIGTERM and SIGHUP like Ctrl-C.

Shared by :mod:`permcompile.cli` and :mod:`permcompile.cli_eval` (which ``cli`` registers), so neither
imports the other's module at run time.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import click

from .errors import PermcompileError, Terminated
from .hfenv import set_hf_env

set_hf_env()


# SIGHUP: an ssh session or terminal that goes away; the run is as dead as after SIGTERM and must clean up alike
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _on_signal(signum, frame):
    for sig in _SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name, 128 + signum)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a CLI user sees it: ``warning: <first line of the message>``."""
    click.echo("warning: " + ((str(message).strip().splitlines() or [""])[0]), err=True)


def run_command(fn, debug: bool, precheck=None):
    """Run ``fn`` turning every error into one line; ``precheck`` (torch-free argument checks) runs first,
    before transformers and torch are imported. SIGTERM and SIGHUP unwind like Ctrl-C (temporaries removed), exit
    128 + the signal's number."""
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        if precheck is not None:
            precheck()
        _quiet_hf()
        with warnings.catch_warnings():
            if not debug:  # one plain line each; Python's format names our source file
                warnings.showwarning = _warning_line
            return fn()
    except PermcompileError as exc:
        if debug:
            traceback.print_exc()
        msg = str(exc).strip()
        click.echo(f"error: {msg}", err=True)
        sys.exit(exc.exit_code)
    except Terminated as exc:
        hint = getattr(exc, "resume_hint", None)
        _echo_error(f"error: terminated by {exc.signal_name} (nothing was written to the output"
                    + (f"; {hint})" if hint else ")"))
        sys.exit(exc.exit_status)
    except KeyboardInterrupt as exc:
        # a pass that keeps a checkpoint says what is in it (``passes/checkpoint.py`` sets ``resume_hint``)
        hint = getattr(exc, "resume_hint", None)
        click.echo("error: interrupted (nothing was written to the output" + (f"; {hint})" if hint else ")"),
                   err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", ""), err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        click.echo(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for details)",
                   err=True)
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _echo_error(line: str) -> None:
    """The error line; after SIGHUP the terminal may be gone, and a failed write must not become a traceback."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


def _quiet_hf() -> None:
    """Our own step lines say what is happening; transformers' per-file bars only clutter stderr.

    transformers reads the variable when first imported; importing it here (and torch with it) would cost
    seconds before the arguments are even checked, so an already imported one is switched off directly."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        try:
            hf_logging.disable_progress_bar()
        except Exception:  # an older transformers without the switch
            pass
