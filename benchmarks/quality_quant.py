"""Quality of quantized 2:4 (``--quantize fp8|int8``) against our unquantized 2:4 default, through ONNX Runtime.

Each row is a full ``permcompile optimize`` run (defaults: hungarian + OBS reconstruction; the quantized rows add
``--quantize``), evaluated with ``permcompile.evaluate`` on the output folder's ``model.onnx`` (``backend="onnx"``):
the Q/DQ graph itself, not a torch emulation. Rows: ``2:4`` (unquantized default), ``2:4+int8``, ``2:4+fp8`` and
``2:4+int8 random`` (a random-permutation control), each over calibration seeds. Metrics: held-out perplexity on
each ``--data`` text (causal LMs; first ``--max-tokens`` tokens) or embedding cosine / Spearman against the dense
model (encoders), and the ratio of each quantized row to the unquantized default of the same seed.

    python benchmarks/quality_quant.py --model minilm --seeds 0 1 --data ../shared/data/austen/persuasion.txt
    python benchmarks/quality_quant.py --model smollm2 --seeds 0 1 --rows 2:4 2:4+fp8 \\
        --data ../shared/data/austen/persuasion.txt ../shared/data/python_docs/tutorial.txt --max-tokens 8192

Writes ``benchmarks/results/quality_quant_<model>[_tag].json`` and ``.md`` (with the commit and command).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"2:4": {}, "2:4+int8": {"quantize": "int8"}, "2:4+fp8": {"quantize": "fp8"},
        "2:4+int8 random": {"quantize": "int8", "permutation": "random"},
        "2:4+fp8 random": {"quantize": "fp8", "permutation": "random"}}


def _metric_keys(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "seconds"
            and any(t in k for t in ("perplexity", "cosine", "spearman"))}


def main() -> None:
    from permcompile.config import OptimizeConfig
    from permcompile.evaluate import evaluate
    from permcompile.pipeline import optimize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", nargs="+", default=["2:4", "2:4+int8", "2:4+fp8", "2:4+int8 random"],
                    choices=list(ROWS))
    ap.add_argument("--data", nargs="+", required=True, help="held-out text files (never the calibration text)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="causal LMs: tokens of each text evaluated")
    ap.add_argument("--max-sentences", type=int, default=500, help="encoders: sentences of each text")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quality_quant-"))
    try:
        for seed in args.seeds:
            for name in args.rows:
                cfg = OptimizeConfig(seed=seed, calib_samples=args.calib_samples, **ROWS[name])
                out = work / f"{name.replace(':', '').replace('+', '_').replace(' ', '_')}_{seed}"
                start = time.perf_counter()
                result = optimize(args.model, out, cfg, quiet=True)
                wall = time.perf_counter() - start
                row = {"row": name, "seed": seed, "optimize_s": round(wall, 1),
                       "checks_passed": all(c["passed"] for c in result.report["checks"]),
                       "peak_memory_gib": max(result.report.get("peak_memory_gib", {}).values(), default=None)}
                for data in args.data:
                    ev = evaluate(str(out), data, backend="onnx", max_tokens=args.max_tokens,
                                  max_sentences=args.max_sentences)
                    for k, v in _metric_keys(ev).items():
                        row[f"{Path(data).stem}:{k}"] = v
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = sorted({k for r in rows for k in r if ":" in k})
    for r in rows:  # ratio to the unquantized default of the same seed
        base = next((b for b in rows if b["row"] == "2:4" and b["seed"] == r["seed"]), None)
        if base is not None:
            for k in metrics:
                if k in r and k in base and base[k]:
                    r[f"{k} / 2:4"] = r[k] / base[k]
    out = {"model": args.model, "rows": rows, "command": command_line("quality_quant.py"), "git": git_state()}
    stem = f"quality_quant_{args.model}" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(exist_ok=True)
    write_result(RESULTS / f"{stem}.json", out)
    lines = [f"# Quantized 2:4 on {args.model}, through ONNX Runtime on the exported graph", "",
             "mean ± sd over calibration seeds " + ", ".join(map(str, args.seeds)) + "; ratio = row / unquantized "
             "2:4 default of the same seed", "",
             "| row | " + " | ".join(metrics) + " | ratio | all checks |", "|---" * (len(metrics) + 3) + "|"]
    for name in args.rows:
        sel = [r for r in rows if r["row"] == name]
        cells = []
        for k in metrics:
            vals = [r[k] for r in sel if k in r]
            cells.append(f"{statistics.mean(vals):.4g} ± {statistics.pstdev(vals):.2g}" if vals else "")
        ratios = [r[f"{k} / 2:4"] for r in sel for k in metrics if f"{k} / 2:4" in r]
        ratio = "; ".join(f"{r:.4f}" for r in ratios) if name != "2:4" else "1"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {all(r['checks_passed'] for r in sel)} |")
    lines += [""] + provenance_lines(out)
    write_result(RESULTS / f"{stem}.md", "\n".join(lines) + "\n", provenance=out)
    print("\n".join(lines))


if __name__ == "__main__":
    from quality_encoder import run_main  # noqa: E402

    run_main(main)
