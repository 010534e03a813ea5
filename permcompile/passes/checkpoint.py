"""Checkpoints of the resumable passes (search, learned, reconstruction), written and read one way.

:class:`Checkpoints` (owned by the pipeline, one per run) decides where each pass keeps its state and when it is
written; :class:`PassCheckpoint` is one pass's folder and implements the one ``--resume`` rule:

- no checkpoint for the pass: the pass starts from the beginning, with one stderr note (not an error: the run may
  have been interrupted before that pass saved anything);
- a checkpoint made from other weights, data or settings, or one that cannot be read: one ``UsageError`` line;
- otherwise the pass continues from it, to the result an uninterrupted run gives.

A pass keys its checkpoint by :func:`content_digest` of what its result depends on: content only (no folder name
or path), so two models in folders of the same name get different checkpoints, and a copy of the same model in
another folder resumes from the same one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import UsageError

# Under the default cache a pass writes its checkpoint only once it has run this long: a shorter run loses little
# when interrupted, and writes nothing to the user's home (README, "Cache and checkpoints"). An explicit folder or
# --resume: from the first save on. Tests set it to 0.
CHECKPOINT_AFTER_S = 30.0


def content_digest(model: nn.Module, batches: list[dict], settings: dict) -> str:
    """sha256 over ``settings`` (JSON), every batch tensor, and each parameter's name, shape, sums and a sample
    of its values (hashing every byte of a billion-parameter model would cost more than it protects)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        total = square = 0.0
        for chunk in flat.split(1 << 20):  # float64 sums a million values at a time: no full-size copy
            c = chunk.double()
            total += float(c.sum())
            square += float(c.square().sum())
        h.update(f"{name}{tuple(p.shape)}{total}{square}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().numpy().tobytes())  # a sample of the values
    return h.hexdigest()


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class PassCheckpoint:
    """One pass's checkpoint: ``folder/state_file`` marks a saved state (written last, atomically), keyed by
    ``digest``. ``saved``: how far the folder's state goes, in the pass's words (``None`` until a save), for the
    Ctrl-C hint."""

    def __init__(self, name: str, folder: Path, state_file: str, digest: str, *, resume: bool, write_after: float,
                 quiet: bool, on_unwritable: Callable[[], None] | None = None):
        self.name, self.folder, self.digest = name, Path(folder), digest
        self.path = self.folder / state_file
        self.resume, self.write_after, self.quiet = resume, write_after, quiet
        self.started = time.perf_counter()
        self.saved: str | None = None
        self._writable = True
        self._on_unwritable = on_unwritable

    def load(self, read: Callable[[Path], tuple[object, str | None]]):
        """The saved state to continue from, or None (no ``--resume``, or no checkpoint: then one note).

        ``read(path)`` returns ``(state, digest it was saved with)``; any error it raises (a truncated or foreign
        file) and a digest other than ours become one ``UsageError`` line."""
        if not self.resume:
            return None
        if not self.path.is_file():
            if not self.quiet:
                print(f"[permcompile] --resume: no {self.name} checkpoint in {self.folder}; the {self.name} pass "
                      "starts from the beginning", file=sys.stderr, flush=True)
            return None
        with self.reading(self.path):
            state, digest = read(self.path)
        if digest != self.digest:
            raise UsageError(f"--resume: the {self.name} checkpoint {self.path} was made from a different model, "
                             "calibration data or configuration; rerun without --resume (or delete it)")
        return state

    @contextlib.contextmanager
    def reading(self, what: Path | None = None):
        """Any error reading ``what`` (default: the folder) — a truncated, corrupt or foreign file — becomes one
        ``UsageError`` line."""
        try:
            yield
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - json, safetensors, KeyError, OSError ...
            why = getattr(exc, "strerror", None) or f"{type(exc).__name__}: truncated or corrupt"
            where = what if what is not None else f"in {self.folder}"
            raise UsageError(f"--resume: the {self.name} checkpoint {where} cannot be read ({why}); rerun without "
                             "--resume") from None

    def due(self) -> bool:
        """Whether a save now would be written (the pass has run ``write_after`` and the folder is writable)."""
        return self._writable and time.perf_counter() - self.started >= self.write_after

    def save(self, write: Callable[[Path], None], saved: str) -> bool:
        """``write(folder)`` if :meth:`due`; ``saved`` then says what the folder holds. An unwritable folder (full or
        read-only cache) warns once and the run goes on without checkpoints; returns whether it was written."""
        if not self.due():
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write(self.folder)
        except OSError as exc:
            self._writable = False
            if self._on_unwritable is not None:
                self._on_unwritable()
            warnings.warn(f"cannot write the {self.name} checkpoint to {self.folder} ({exc.strerror or exc}); the "
                          "run goes on without one (set PERMCOMPILE_CACHE_DIR to a writable folder to be able to "
                          "--resume)", stacklevel=2)
            return False
        self.saved = saved
        return True

    def hint(self, exc: BaseException) -> None:
        """On Ctrl-C or SIGTERM: tell the CLI's error line what is saved and how to go on (``exc.resume_hint``)."""
        if self.saved is not None and self.path.is_file():
            exc.resume_hint = (f"{self.saved} checkpointed in {self.folder}: rerun the same command with --resume "
                               "to continue from it")


class Checkpoints:
    """Where the resumable passes of one run keep their state: ``root/<pass>`` for an explicit ``root`` (kept,
    written from the first save on), else ``<cache>/<pass>/<model>-<digest>`` (written once the pass has run
    ``CHECKPOINT_AFTER_S``; :meth:`remove_cached` deletes them once the output is in place). ``resume``: every pass
    continues from its checkpoint by the rule in this module's docstring."""

    def __init__(self, model_name: str = "model", root: str | os.PathLike | None = None, *, resume: bool = False,
                 quiet: bool = True):
        self.model_name, self.root, self.resume, self.quiet = model_name, root, resume, quiet
        self._cached: list[Path] = []
        self._writable = True  # False once a pass could not write: the later passes do not try (one warning)

    def open(self, name: str, digest: str, state_file: str) -> PassCheckpoint:
        """The checkpoint of pass ``name`` ("search", "learned", "reconstruct") keyed by ``digest``."""
        if self.root is not None:
            folder, write_after = Path(self.root) / name, 0.0
        else:
            from ..models import cache_root

            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.model_name}"[:40])
            folder = cache_root() / name / f"{tag}-{digest[:20]}"
            write_after = 0.0 if self.resume else CHECKPOINT_AFTER_S
            self._cached.append(folder)
        opened = PassCheckpoint(name, folder, state_file, digest, resume=self.resume, write_after=write_after,
                                quiet=self.quiet, on_unwritable=self._unwritable)
        opened._writable = self._writable
        return opened

    def _unwritable(self) -> None:
        self._writable = False

    def cached(self) -> list[Path]:
        """The default-cache folders this run's passes used (explicit folders are the caller's)."""
        return list(self._cached)

    def remove_cached(self) -> None:
        """Delete this run's default-cache checkpoints: the output is in place, they have served their purpose."""
        for folder in self._cached:
            shutil.rmtree(folder, ignore_errors=True)
        self._cached.clear()
