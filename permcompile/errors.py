"""Errors the CLI turns into one-line messages.

Every failure a user can cause (bad model folder, bad sparsity string, unreadable data, ...) raises a
subclass of :class:`PermcompileError`; the CLI prints ``error: <message>`` and exits with ``exit_code``
(2 for usage errors, 1 for failed checks) and never shows a traceback unless ``--debug`` is given.
"""
from __future__ import annotations


class PermcompileError(Exception):
    """Base class: a problem we can explain in one line."""

    exit_code = 1


class UsageError(PermcompileError):
    """Bad input from the user: arguments, model folders, data paths (exit code 2)."""

    exit_code = 2


class CaptureError(PermcompileError):
    """torch.export could not capture the model, or the graph holds something we refuse to touch."""

    exit_code = 2


class VerificationError(PermcompileError):
    """A numerical or structural check failed: the artifact must not be deployed."""

    exit_code = 1


class MissingDependencyError(PermcompileError):
    """An optional dependency (TensorRT, gguf, a model package) is not installed."""

    exit_code = 2


class OutputWriteError(PermcompileError):
    """The output could not be written (full disk, quota, read-only file system, file size limit)."""

    exit_code = 1


class OnnxExportError(PermcompileError):
    """The model could not be exported to ONNX (or the exported graph is unusable)."""

    exit_code = 1


_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "File too large")


def write_failure(exc: BaseException) -> str | None:
    """The reason if ``exc`` is a failed write (an ``OSError``, or a library's wrapped I/O error), else None.

    Libraries wrap I/O errors in their own types (safetensors: ``SafetensorError: ... No space left on
    device (os error 28)``); the message is the only common ground.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    for reason in _WRITE_FAILURES:
        if reason.lower() in text.lower():
            return reason
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, CI timeouts, orchestrators) or SIGHUP (the ssh session or terminal went away),
    raised in the main thread like Ctrl-C so that every ``finally`` runs: temporary folders are removed and
    nothing is left at OUT. The CLI exits 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signal_name: str = "SIGTERM", exit_status: int = 143):
        super().__init__(signal_name)
        self.signal_name, self.exit_status = signal_name, exit_status
