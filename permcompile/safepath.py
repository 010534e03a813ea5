"""Files read from a folder someone else made: an ``optimize`` output given to ``verify``, a model folder.

Such a folder is untrusted input. A name it lists (report.json's file digests, a safetensors index's shards, an
ONNX graph's external data) may climb out of it (``../``, an absolute path); a file in it may be a symlink to a
file elsewhere (``LICENSE -> ~/.ssh/id_rsa``) or a named pipe that blocks whoever opens it. Every such path is
resolved and checked here before anything opens it, and JSON is parsed within bounds (a config of a million
nested brackets otherwise ends in ``RecursionError``).

A Hugging Face Hub cache snapshot (``models--org--name/snapshots/<rev>/``) links every file to the repository's
``blobs/`` folder: those links are the layout's own, and count as inside the folder.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError

MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 100
_SIDE_NAME_BYTES = 32  # what the names of an output's temporaries and lock add to its own (pipeline.py)


class UnsafePathError(UsageError):
    """A path in an untrusted folder leaves it, or names something that is not a regular file."""


class JSONBoundsError(UsageError):
    """A JSON file larger or more deeply nested than anything permcompile reads is meant to be."""


def _roots(root: Path) -> list[Path]:
    """``root`` resolved, and the Hub cache's blob store when ``root`` is one of its snapshots."""
    base = root.resolve()
    roots = [base]
    if base.parent.name == "snapshots" and (base.parent.parent / "blobs").is_dir():
        roots.append((base.parent.parent / "blobs").resolve())
    return roots


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is (None for a regular file or a folder)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def resolve_inside(root, name, what: str = "") -> Path:
    """``root/name`` once checked: ``name`` is relative, and the path (every symlink on it followed) stays in
    ``root``. Returns the path as ``root/name`` (not resolved, for messages); :class:`UnsafePathError` else.
    Nothing is opened."""
    root = Path(root)
    text = os.fspath(name)
    label = f"{what} {text!r}" if what else repr(text)
    if not text or "\x00" in text:
        raise UnsafePathError(f"{label} in {root} is not a file name")
    if os.path.isabs(text) or Path(text).drive:
        raise UnsafePathError(f"{label} in {root} is an absolute path; only files inside the folder are read")
    path = root / text
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UnsafePathError(f"{label} in {root} cannot be resolved ({exc})") from None
    if not _within(real, _roots(root)):
        raise UnsafePathError(f"{label} in {root} leads outside the folder (to {real}); refusing to read it")
    return path


def regular_file(root, name, what: str = "") -> Path:
    """:func:`resolve_inside`, and what it names is a regular file (checked with ``stat``: a named pipe or a
    device is refused without being opened). ``FileNotFoundError`` when it does not exist."""
    path = resolve_inside(root, name, what)
    mode = path.stat().st_mode
    kind = _kind(mode)
    if kind is not None:
        raise UnsafePathError(f"{path} is {kind}, not a regular file; refusing to open it")
    return path


def unsafe_entries(root) -> list[str]:
    """What in the tree under ``root`` must not be read: symlinks that lead outside it (or nowhere) and special
    files (named pipes, devices, sockets), as one short phrase each. Nothing is opened; links are not followed
    into folders."""
    root = Path(root)
    roots = _roots(root)
    problems = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    real = path.resolve(strict=True)
                    if not _within(real, roots):
                        problems.append(f"{rel} is a symbolic link to {real}, outside the folder")
                        continue
                    mode = real.stat().st_mode
                kind = _kind(mode)
            except (OSError, RuntimeError):
                problems.append(f"{rel} is a broken symbolic link")
                continue
            if kind is not None:
                problems.append(f"{rel} is {kind}")
    return problems


def iter_files(root) -> Iterator[Path]:
    """Regular files under ``root`` (sorted), symlinks included only when they lead to a regular file inside it
    (or the Hub blob store of a snapshot). What a copy from an untrusted folder may take."""
    root = Path(root)
    roots = _roots(root)
    for path in sorted(root.rglob("*")):
        try:
            real = path.resolve(strict=True)  # every link on the way followed, folders' included
            if _within(real, roots) and stat.S_ISREG(real.stat().st_mode):
                yield path
        except (OSError, RuntimeError):
            continue


def read_json(path, what: str | None = None, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse the JSON file ``path`` within bounds: a regular file (a pipe is refused unopened) of at most
    ``max_bytes``, UTF-8, nested at most ``max_depth`` deep. Every failure is one :class:`UsageError` line naming
    ``what`` (default: the path); :class:`JSONBoundsError` for a file over the bounds."""
    path = Path(path)
    what = what or str(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError(f"{what} is {_kind(mode)}, not a regular file; refusing to open it")
        size = path.stat().st_size
        if size > max_bytes:
            raise JSONBoundsError(f"{what} is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB a "
                                  "JSON file here may hold")
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {exc.strerror or exc}") from None
    return parse_json(raw, what, max_bytes, max_depth)


def parse_json(raw: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """:func:`read_json` for bytes or text already read."""
    if len(raw) > max_bytes:
        raise JSONBoundsError(f"{what} is larger than the {max_bytes / 2**20:.0f} MiB a JSON file here may hold")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not a UTF-8 text file") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise JSONBoundsError(f"{what} is nested more than {max_depth} levels deep; refusing to read it") from None
    if _depth(data) > max_depth:
        raise JSONBoundsError(f"{what} is nested more than {max_depth} levels deep; refusing to read it")
    return data


def _depth(data: Any) -> int:
    """How deeply lists and objects nest in ``data`` (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, level)
        stack.extend((v, level + 1) for v in value if isinstance(v, (dict, list)))
    return deepest


def check_output_name(path) -> None:
    """An output path the file system takes but ONNX, ONNX Runtime or safetensors cannot (their paths are UTF-8
    strings): refused before any work, in one line."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        absolute = os.path.abspath(text)
        absolute.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raise UsageError(f"output path {shown} is not valid UTF-8 (here or in a parent folder); ONNX Runtime and "
                         "safetensors cannot write or read such paths: choose another name") from None
    if "\x00" in text:
        raise UsageError("output path holds a NUL character")
    # the run writes next to OUT under longer names (.OUT.tmp-PID-XXXXXXXX, .OUT.failed.old-PID-XXXXXXXX, the
    # lock): a name the file system takes for OUT itself can still fail there, after all the work
    name = os.fsencode(os.path.basename(os.path.normpath(absolute)))
    parent = os.path.dirname(os.path.normpath(absolute))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    try:
        name_max = os.pathconf(parent or "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(name) + _SIDE_NAME_BYTES > name_max:
        raise UsageError(f"output name {os.path.basename(text)[:40]}... is {len(name)} bytes; permcompile writes "
                         f"next to it under names up to {_SIDE_NAME_BYTES} bytes longer and the file system allows "
                         f"{name_max}: choose a shorter name")
