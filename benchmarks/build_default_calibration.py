"""Rebuild the embedded multi-domain calibration set (``permcompile/calib/default/text/``) from its sources.

Why a script: the default calibration set must be reproducible and licence-clean. Each domain file is cut from
text that a Debian or PyPI package ships under a licence that allows redistribution:

* ``prose.txt``: *Northanger Abbey* (Jane Austen, public domain), the slice that was the old default.
* ``docs.txt``: pages of the Python 3.11 *Library Reference* (reStructuredText sources; Debian ``python3.11-doc``,
  PSF licence). The held-out Python text of the benchmarks is the *Tutorial*, *HOWTOs* and *FAQ*, never these.
* ``code.txt``: modules of the CPython 3.11 standard library (PSF licence).

Each source contributes its first ``--per-source`` bytes cut at a blank line, so no domain is one long document.
Usage (needs ``apt-get install python3.11-doc`` and a CPython 3.11)::

    python benchmarks/build_default_calibration.py --out permcompile/calib/default/text
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources/library")
DOC_PAGES = ("itertools", "collections", "pathlib", "json", "datetime", "sqlite3", "logging", "csv", "subprocess",
             "argparse", "unittest", "re", "functools", "shutil", "string", "os.path")
CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "shlex", "csv", "functools", "dataclasses",
                "json/encoder", "json/decoder", "pprint", "statistics", "graphlib", "calendar", "string", "colorsys",
                "difflib", "argparse")


def head_at_blank_line(text: str, limit: int) -> str:
    """The first ``limit`` characters of ``text``, cut back to the last blank line (whole paragraphs/functions)."""
    if len(text) <= limit:
        return text.strip() + "\n"
    cut = text.rfind("\n\n", 0, limit)
    return text[:cut if cut > limit // 2 else limit].strip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("permcompile/calib/default/text"))
    ap.add_argument("--per-source", type=int, default=6000, help="characters taken from each page or module")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [head_at_blank_line((DOC_ROOT / f"{p}.rst.txt").read_text(encoding="utf-8"), args.per_source)
            for p in DOC_PAGES]
    code = [f"# Lib/{m}.py\n" + head_at_blank_line((stdlib / f"{m}.py").read_text(encoding="utf-8"), args.per_source)
            for m in CODE_MODULES]
    (args.out / "docs.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (args.out / "code.txt").write_text("\n\n".join(code), encoding="utf-8")
    for name in ("docs.txt", "code.txt"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
