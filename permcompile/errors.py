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
