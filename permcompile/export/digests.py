"""sha256 digests of an output folder's files: the writer records them in ``report.json``, ``verify`` recomputes
them (tamper detection). Apart from the verifier so that writing an output does not import it."""
from __future__ import annotations

import hashlib
from pathlib import Path

REPORT = "report.json"  # holds the digests, so it is not digested itself


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(out_dir) -> dict[str, str]:
    """sha256 of every file under ``out_dir`` (relative POSIX path -> hex), ``report.json`` excluded.

    The writer stores this under ``report["files"]``; :func:`permcompile.export.verify.verify_artifacts`
    recomputes it.
    """
    out_dir = Path(out_dir)
    digests = {}
    by_inode: dict[tuple, str] = {}  # hard-linked copies (triton/) are hashed once
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(out_dir).as_posix()
            if rel != REPORT:
                st = p.stat()
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if key not in by_inode:
                    by_inode[key] = sha256_file(p)
                digests[rel] = by_inode[key]
    return digests


__all__ = ["REPORT", "sha256_file", "file_digests"]
