"""The output folder as a transaction: OUT is replaced only by a complete, verified output, or not at all.

:func:`reserve_output` checks OUT before any work (:func:`resolve_outputs`), locks it (``.OUT.lock``, so a second
run to the same OUT is refused) and removes what runs that died left next to it; :class:`StagedOutput` is the
temporary folder the output is written to, renamed into place only after every check passed (a failed check
moves it to ``OUT.failed/``; an exception deletes it).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import OutputWriteError, UsageError
from .safepath import check_output_name


def reserve_output(out: str | os.PathLike, force: bool, model=None) -> tuple[Path, Path | None, "OutputLock"]:
    """:func:`resolve_outputs`, then OUT locked (now if its folder exists, else once :class:`StagedOutput` creates
    it) and cleared of what dead runs left: ``(artifact folder, engine path or None, lock)``. The caller
    releases the lock."""
    out_dir, plan_path = resolve_outputs(out, force, model)
    lock = OutputLock(out_dir)
    lock.acquire()
    try:
        if lock.held and _clean_stale(out_dir):  # an old output came back to OUT: check OUT again
            resolve_outputs(out, force, model)
            lock.identity = _identity(out_dir)
    except BaseException:
        lock.release()
        raise
    return out_dir, plan_path, lock


def resolve_outputs(out: str | os.PathLike, force: bool, model=None) -> tuple[Path, Path | None]:
    """``OUT`` → (artifact folder, engine path or None). ``X.plan`` puts artifacts in ``X/``.

    Checks everything that can be checked before any work: an existing output is replaced only with
    ``force`` and only if it is a permcompile output that does not hold the input model; the nearest
    existing parent folder must accept a file (a real write probe, not just permission bits).
    """
    check_output_name(out)
    out = Path(out)
    plan = None
    if out.suffix == ".plan":
        plan = out
        out = out.with_suffix("")
    model_path = None
    if isinstance(model, (str, os.PathLike)) and Path(model).expanduser().exists():
        model_path = Path(model).expanduser().resolve()
    resolved_out = out.resolve()
    if model_path is not None and (resolved_out == model_path or resolved_out in model_path.parents):
        raise UsageError(f"refusing to write {out}: it holds the input model {model}")
    for target in [out] + ([plan] if plan else []):
        if not (target.exists() or target.is_symlink()):
            continue
        if not force:
            raise UsageError(f"output {target} already exists (use --force to replace it)")
        _check_replaceable(target, model_path, engine=target is plan, folder=out)
    parent = out.resolve().parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"cannot create {out}: {probe_dir} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {probe_dir}: {exc.strerror or exc}") from None
    return out, plan


def _check_replaceable(target: Path, model_path: Path | None, *, engine: bool, folder: Path) -> None:
    """``--force`` replaces only a permcompile output: a folder with its report.json (or the engine file
    ``X.plan`` of an output folder ``X/``), never another file or folder, and never anything that is, holds
    or lies inside the input model (symlinks resolved)."""
    resolved = target.resolve()
    if model_path is not None:
        if resolved == model_path or resolved in model_path.parents:
            raise UsageError(f"refusing to replace {target}: it holds the input model")
        if model_path in resolved.parents:
            raise UsageError(f"refusing to replace {target}: it lies inside the input model {model_path}")
    if engine:
        if not resolved.is_file() or not (folder / "report.json").is_file():
            raise UsageError(f"refusing to replace {target}: it is not the engine of a permcompile output "
                             f"(no {folder / 'report.json'})")
        return
    if not resolved.is_dir():
        raise UsageError(f"refusing to replace {target}: it is a file, not a permcompile output folder")
    if not (resolved / "report.json").is_file():
        raise UsageError(f"refusing to replace {target}: it is not a permcompile output (no report.json)")


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` so that a crash at any point loses neither: an existing ``dest`` is renamed
    aside (``.DEST.old-PID-*``), ``src`` moved in, and only then the old one deleted. A run that dies between
    the two renames leaves the old output aside; the next run to the same OUT puts it back (``_clean_stale``).
    """
    import secrets

    aside = None
    if dest.exists() or dest.is_symlink():
        aside = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dest, aside)  # a rename: atomic
    try:
        os.replace(src, dest)
    except BaseException:
        if aside is not None and not (dest.exists() or dest.is_symlink()):
            os.replace(aside, dest)
        raise
    if aside is not None:
        _remove(aside)


def _normalise_modes(folder: Path) -> None:
    """Every file ``0o666``, every folder ``0o777``, less the umask (0644 / 0755 usually), like a file made
    with ``open()``: some writers (safetensors through transformers) create theirs 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


LEGACY_TMP_STALE_S = 86_400  # a temporary folder without a PID in its name is presumed dead after a day


def _clean_stale(out_dir: Path) -> bool:
    """Remove what runs to ``out_dir`` that died (SIGKILL, power loss) left next to it: their temporary
    folders ``.OUT.tmp-PID-*``; an old output renamed aside (``.OUT.old-PID-*``) goes back to OUT if OUT is
    missing (the run died between the two renames of ``_replace``), else is deleted. Only names of that form
    whose process is gone are touched, and temporaries of versions that named them without a PID
    (``.OUT.tmp-XXXXXXXX``) once a day old. Returns True when an old output was put back."""
    restored = False
    parent = out_dir.parent
    legacy = re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-[a-z0-9_]{{8}}")
    for name in (out_dir.name, out_dir.name + ".failed"):
        pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            return restored
        for entry in entries:
            if name == out_dir.name and legacy.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                try:
                    if time.time() - entry.stat().st_mtime > LEGACY_TMP_STALE_S:
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass
                continue
            match = pattern.fullmatch(entry.name)
            if match is None or _pid_alive(int(match.group(2))) or not entry.is_dir() or entry.is_symlink():
                continue
            dest = parent / name
            try:
                if match.group(1) == "old" and not (dest.exists() or dest.is_symlink()):
                    os.replace(entry, dest)
                    restored = True
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass
    return restored


def _identity(path: Path):
    """What tells one output at ``path`` from another written there later (None: nothing there)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    try:
        report = (path / "report.json").stat().st_mtime_ns
    except OSError:
        report = None
    return st.st_dev, st.st_ino, report


class OutputLock:
    """``.OUT.lock`` next to OUT, created exclusively and holding the owner's PID, for the whole run: a
    second run to the same OUT is refused at once instead of silently replacing the first one's result. A
    lock whose process is gone (SIGKILL) is taken over. The state of OUT when the run started is recorded:
    at the end, an OUT that changed meanwhile (a run that did not see the lock) is not replaced."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.held = False
        self.identity = _identity(out_dir)

    def acquire(self) -> None:
        if self.held or not self.path.parent.is_dir():
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text(encoding="utf-8").split()[0])
                except (OSError, ValueError, IndexError):
                    pid = None
                if pid is not None and _pid_alive(pid):
                    raise UsageError(f"another permcompile run (pid {pid}) is writing {self.out_dir}; wait for it "
                                     f"to finish (or delete {self.path} if no run is)") from None
                if pid is None and time.time() - self._mtime() < 5:  # being written by its owner right now
                    time.sleep(0.2)
                    continue
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise UsageError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise UsageError(f"cannot lock {self.out_dir}: {self.path} is in the way")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def check_unchanged(self) -> None:
        if _identity(self.out_dir) != self.identity:
            raise OutputWriteError(f"{self.out_dir} was written by another run while this one worked; "
                                   "it was left as it is and this run's result discarded")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass


class StagedOutput:
    """The temporary folder ``.OUT.tmp-PID-*`` next to OUT that the output is written to (the PID in the name
    tells a later run whether its owner is still alive). :meth:`commit` renames it into place; :meth:`fail`
    moves it to ``OUT.failed/``; leaving the ``with`` block by an exception deletes it."""

    def __init__(self, out_dir: Path, lock: OutputLock | None = None):
        self.out_dir = out_dir
        out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves nothing
        self.lock = lock or OutputLock(out_dir)
        if not self.lock.held:
            self.lock.acquire()
            _clean_stale(out_dir)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-",
                                          dir=out_dir.resolve().parent))

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def fail(self) -> Path:
        """Keep the folder as ``OUT.failed/`` (replacing an older one) for inspection; returns that path."""
        dest = self.out_dir.with_name(self.out_dir.name + ".failed")
        _replace(self.path, dest)
        return dest

    def commit(self) -> None:
        """Put the folder in place of OUT, unless another run wrote OUT meanwhile (:class:`OutputLock`)."""
        self.lock.check_unchanged()
        _normalise_modes(self.path)
        _replace(self.path, self.out_dir)


__all__ = ["reserve_output", "resolve_outputs", "OutputLock", "StagedOutput"]
