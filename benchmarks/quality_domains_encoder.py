"""Encoder quality across kinds of text: MiniLM 2:4 calibrated on the embedded mixed set (optimize's defaults),
mean sentence-embedding cosine to the dense model on held-out sentences of several kinds.

The encoder counterpart of ``quality_domains.py``: rows ``masks`` (our permutation, masks only), ``ours`` (the
defaults: reconstruction with the held-out check), ``plain`` (reconstruction without the check) and ``control``
(random permutation + the defaults' reconstruction), per calibration seed. Held-out sentences: *Persuasion*, the
Python tutorial, lines of numpy's source (none in the calibration set). Example::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/quality_domains_encoder.py --seeds 0 1

Writes ``benchmarks/results/domains_<model>_<N>of<M>[_tag].json`` and ``.md`` with the git commit and command.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

import os  # noqa: E402

os.environ.update(unset_hf_env())

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"


def heldout_sentences(limit: int) -> dict[str, list[str]]:
    from permcompile.calib.text import split_sentences

    code_dir = Path(sysconfig.get_paths()["purelib"]) / "numpy" / "lib"
    code = "".join(p.read_text(encoding="utf-8") for p in sorted(code_dir.glob("*.py")) if "test" not in p.name)
    return {"austen": split_sentences((SHARED / "austen" / "persuasion.txt").read_text(encoding="utf-8"))[:limit],
            "py-docs": split_sentences((SHARED / "python_docs" / "tutorial.txt").read_text(encoding="utf-8"))[:limit],
            "py-code": [ln.strip() for ln in code.splitlines() if len(ln.split()) >= 4][:limit]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--sentences", type=int, default=400, help="held-out sentences per kind of text")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()

    from permcompile.calib.data import load_calibration
    from permcompile.config import OptimizeConfig, ReconstructConfig
    from permcompile.evaluate import embedding_similarity
    from permcompile.models import load_model
    from permcompile.pipeline import compress_

    loaded = load_model(args.model)
    dense = copy.deepcopy(loaded.model).eval()
    state = copy.deepcopy(loaded.model.state_dict())
    texts = heldout_sentences(args.sentences)
    meta = {"git": git_state(), "command": command_line("quality_domains_encoder.py"), "model": args.model,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "sentences": {k: len(v) for k, v in texts.items()}}
    rows = []
    for seed in args.seeds:
        base = OptimizeConfig(seed=seed)
        batches = load_calibration(None, loaded, base.calib_samples, base.calib_seq_len, seed)
        for name, cfg in (("masks", dataclasses.replace(base, update="none")), ("ours", base),
                          ("plain", dataclasses.replace(base, reconstruct=ReconstructConfig(heldout="none"))),
                          ("control", dataclasses.replace(base, permutation="random"))):
            loaded.model.load_state_dict(state)
            start = time.perf_counter()
            c = compress_(loaded, cfg, quiet=True, batches=batches)
            seconds = time.perf_counter() - start
            cos = {k: float(embedding_similarity(loaded.model, dense, loaded.tokenizer, v)["mean_cosine"])
                   for k, v in texts.items()}
            rows.append({"seed": seed, "method": name, "cosine": cos, "seconds": round(seconds, 1),
                         "timings": c.timings})
            print(f"seed {seed} {name}: " + "  ".join(f"{k} {v:.4f}" for k, v in cos.items()) + f"  ({seconds:.0f} s)",
                  file=sys.stderr, flush=True)
            _write(args, meta, rows)


def _write(args, meta: dict, rows: list[dict]) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"domains_{args.model}_2of4" + (f"_{args.tag}" if args.tag else "")
    write_result(out / f"{stem}.json", {**meta, "rows": rows})
    kinds = list(meta["sentences"])
    lines = [f"# {args.model} 2:4, defaults (embedded mixed calibration): embedding cosine to dense by kind of text",
             "", *provenance_lines(meta), f"OMP_WAIT_POLICY={meta['omp_wait_policy']}", "",
             "Held-out sentences: " + ", ".join(f"{k} ({n})" for k, n in meta["sentences"].items()) +
             "; mean ± sd over calibration seeds.", "",
             "| method | " + " | ".join(kinds) + " | seconds |", "|---|" + "---|" * len(kinds) + "---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        cells = []
        for k in kinds:
            vals = [r["cosine"][k] for r in rs]
            cells.append(f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    write_result(out / f"{stem}.md", "\n".join(lines) + "\n", meta)


if __name__ == "__main__":
    main()
