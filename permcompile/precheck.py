"""Checks of the arguments and paths of ``optimize`` that need neither torch nor the model.

Loading a large model, capturing it and analysing its groups takes minutes: a missing calibration file, an
unknown model name or a seed out of range must be refused before any of that, in one line. Everything here
uses the standard library only (the command line calls it before it imports torch); the loaders repeat the
deeper checks that need the model (text vs images, token counts).
"""
from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

from .errors import UsageError
from .shortnames import SHORT_NAMES

MAX_SEED = 2**32 - 1  # numpy's range; torch takes more, but the learned pass derives per-block seeds from it
# suffixes the calibration loader reads as something other than plain text
_NOT_PLAIN_TEXT = (".json", ".jsonl", ".csv", ".parquet", ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif",
                   ".tiff")
_SNIFF_BYTES = 1 << 16


def check_range(value, name: str) -> tuple[int, int, int]:
    """A TensorRT profile range: ``"MIN,OPT,MAX"`` (the command line's text) or three integers (the API's), with
    ``1 <= MIN <= OPT <= MAX``; else :class:`UsageError` naming ``name``."""
    try:
        parts = [int(x) for x in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3:
        raise UsageError(f"{name} must be three integers MIN,OPT,MAX, got {value!r}")
    if not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise UsageError(f"{name} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {value!r}")
    return parts[0], parts[1], parts[2]


def check_seed(seed) -> int:
    """``seed`` as an int in ``[0, MAX_SEED]``, else :class:`UsageError`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"--seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def suggest_short_name(text: str) -> str | None:
    """The short name nearest to ``text`` (case and punctuation ignored), or None."""
    key = "".join(ch for ch in text.lower() if ch.isalnum())
    names = {"".join(ch for ch in n if ch.isalnum()): n for n in SHORT_NAMES}
    match = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return names[match[0]] if match else None


def check_model_spec(spec) -> None:
    """A model argument that names nothing (neither a short name nor an existing path) is refused, with the
    nearest short name when one is close (``MiniLM`` -> ``minilm``). In-memory modules pass unchecked."""
    if not isinstance(spec, (str, os.PathLike)):
        return
    text = os.fspath(spec)
    if text in SHORT_NAMES or Path(text).expanduser().exists():
        return
    if text.strip() == "":
        raise UsageError("the model argument is empty; give a short name or a Hugging Face model folder")
    looks_like_path = os.sep in text or text.startswith(".") or text.endswith((".gguf", ".json", ".safetensors"))
    guess = None if looks_like_path else suggest_short_name(text)
    if guess is not None:
        raise UsageError(f"model {text!r} is neither a folder nor a known short name; did you mean {guess!r}?")
    hint = "" if looks_like_path else f" (short names: {', '.join(SHORT_NAMES)})"
    raise UsageError(f"model path {text} does not exist{hint}")


def check_calibration_source(source) -> None:
    """What can be said of ``--calib`` without the model: it exists, can be read, and is not empty or binary.

    Whether text or images are right for the model, and whether there are enough tokens, is checked by
    :func:`permcompile.calib.data.load_calibration` once the model is known.
    """
    if source is None or str(source) == "":
        return
    path = Path(source).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"calibration path {source} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read calibration path {source}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        try:
            entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        except OSError as exc:
            raise UsageError(f"cannot read calibration folder {source}: {exc.strerror or exc}") from None
        if not entries:
            raise UsageError(f"calibration folder {source} is empty")
        return
    if not stat.S_ISREG(mode):
        raise UsageError(f"calibration path {source} is not a regular file (device, pipe or socket)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read calibration file {source}: {exc.strerror or exc}") from None
    if not head:
        raise UsageError(f"calibration file {source} is empty")
    if path.suffix.lower() in _NOT_PLAIN_TEXT:
        return  # tables and images: their own loaders say what is wrong with them
    if b"\x00" in head[:8192]:
        raise UsageError(f"calibration file {source} is binary, not UTF-8 text")
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sniffed bytes
            raise UsageError(f"calibration file {source} is not UTF-8 text (binary data?)") from None
        text = head[: exc.start].decode("utf-8-sig", errors="ignore")
    if not text.strip() and len(head) < _SNIFF_BYTES:
        raise UsageError(f"calibration file {source} is empty (only white space)")
