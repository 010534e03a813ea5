"""Reading text: the embedded default, one UTF-8 file, and sentences.

One module for what calibration (:mod:`permcompile.calib.data`) and ``eval`` (:mod:`permcompile.evaluate`)
both read, so that an encoder is calibrated and evaluated on sentences cut by the same rule. Torch-free.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from ..errors import UsageError

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_TEXT_DIR = DEFAULT_DIR / "text"
# The embedded calibration set, one file per kind of text (default/README.md says where each comes from). A
# single novel made the weight update fit Austen and cost twice the masks-only perplexity on Python code
# (docs/FINDINGS.md, "quality off the calibration domain"): every kind is sampled equally.
DEFAULT_DOMAINS = ("prose", "docs", "code")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Mt.", "Jr.", "Sr.", "vs.", "e.g.", "i.e.", "etc.", "No.")
# a sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace and a capital,
# a digit or an opening quote/bracket
_SENTENCE_END = re.compile(r"(?<=[.!?][\"'\u201d\u2019)\]])\s+(?=[\"'\u201c\u2018(\[A-Z0-9])"
                           r"|(?<=[.!?])\s+(?=[\"'\u201c\u2018(\[A-Z0-9])")


@functools.lru_cache(maxsize=1)
def default_domains() -> dict[str, str]:
    """The embedded calibration set: ``{kind of text: text}`` (literary prose, technical documentation,
    source code; all public domain or PSF-licensed)."""
    return {name: (DEFAULT_TEXT_DIR / f"{name}.txt").read_text(encoding="utf-8") for name in DEFAULT_DOMAINS}


def default_text() -> str:
    """The embedded prose sample (Northanger Abbey, public domain): a short English text for checks that need
    one (a tokenizer probe), not the calibration set (:func:`default_domains`)."""
    return default_domains()["prose"]


# ------------------------------------------------------------------------------------------------ reading text
MAX_FILE_BYTES = 64 * 1024 * 1024  # read at most this much of one calibration file
_CHUNK_BYTES = 1 << 20


def read_text_file(path: Path, what: str = "calibration", max_bytes: int | None = MAX_FILE_BYTES) -> str:
    """One UTF-8 text file (BOM dropped; at most ``max_bytes`` read). ``what`` names the file in errors.

    Raises :class:`UsageError` for a path that is not a regular file (a device or pipe would block or never
    end), an unreadable file, binary data or invalid UTF-8.
    """
    import codecs
    import stat as _stat

    # decoded chunk by chunk: a file cut at ``max_bytes`` ends inside a multi-byte character more often than
    # not, and that partial character is dropped, not taken for invalid UTF-8
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    parts: list[str] = []
    left = max_bytes
    try:
        mode = path.stat().st_mode
        if not _stat.S_ISREG(mode):
            raise UsageError(f"{what} path {path} is not a regular file (device, pipe or socket)")
        with open(path, "rb") as fh:
            first = True
            while left is None or left > 0:
                chunk = fh.read(_CHUNK_BYTES if left is None else min(_CHUNK_BYTES, left))
                if first and b"\x00" in chunk[:8192]:
                    raise UsageError(f"{what} file {path} is binary, not UTF-8 text")
                first = False
                if left is not None:
                    left -= len(chunk)
                parts.append(decoder.decode(chunk, final=not chunk))
                if not chunk:
                    break
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} file {path} is not UTF-8 text (binary data?)") from None
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ sentences
def split_sentences(text: str, min_words: int = 4, max_sentences: int | None = None) -> list[str]:
    """Split ``text`` into sentences with a simple regex (paragraph by paragraph, whitespace normalised).

    Common abbreviations ("Mr.", "Mrs.", ...) do not end a sentence; sentences with fewer than ``min_words``
    words are dropped; at most ``max_sentences`` (the first ones) are returned.
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        merged: list[str] = []
        for piece in _SENTENCE_END.split(para):
            piece = piece.strip()
            if not piece:
                continue
            if merged and merged[-1].endswith(_ABBREVIATIONS):
                merged[-1] = f"{merged[-1]} {piece}"
            else:
                merged.append(piece)
        for sentence in merged:
            if len(sentence.split()) >= min_words:
                out.append(sentence)
                if max_sentences is not None and len(out) >= max_sentences:
                    return out
    return out
