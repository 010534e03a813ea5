"""Quality of N:M pruning with and without permutations on a causal LM (SmolLM2-135M by default).

Rows: dense; unstructured 50% (same criterion: the ceiling); N:M with permutation none / random (control) /
greedy / hungarian / search (the exchange search; ``learned``: the end-to-end method), optionally with
per-layer residual permutations (``hungarian/per-layer``: one gather per reading site, counted as glue ops)
and the permutation ceiling ``free`` (an oracle: every linear its own unconstrained permutation, one gather per
linear, chosen like ``search``), each over several calibration
samples (disjoint windows, chosen by seed) so that the spread is visible. Columns: held-out perplexity, gap
recovered R = (ppl_none - ppl) / (ppl_none - ppl_unstructured) against the baseline of the same calibration
sample, glue ops, permutation wall time.

Every figure is measured by this script in the run that prints it. Example (the Austen novels are in the
workplace's shared data folder; pass any folder of .txt files)::

    python benchmarks/quality_lm.py --data-dir ../shared/data/austen --calib-seeds 0 1 2 \
        --methods none random hungarian search --eval-tokens 10000

Writes ``benchmarks/results/quality_<model>_<sparsity>_<criterion>.json`` and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

import torch

from permcompile.config import OptimizeConfig, Sparsity
from permcompile.evaluate import perplexity
from permcompile.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_encoder import (add_output_arguments, add_search_arguments, calib_folder, check_methods,  # noqa: E402
                             compress_row, method_config,
                             free_permutation_masks_, search_config, search_note, method_seeds, peak_mb, reset_peak,
                             run_main,
                             text_calibration, text_model_args, timed_compress, unstructured_ceiling_, write_results)

CALIB_NOVELS = ("northanger_abbey.txt", "mansfield_park.txt", "sense_and_sensibility.txt")
EVAL_NOVELS = ("persuasion.txt",)


def _eval_text(data_dir: Path) -> str:
    return "\n".join((data_dir / n).read_text(encoding="utf-8") for n in EVAL_NOVELS if (data_dir / n).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    text_model_args(ap, "smollm2")
    ap.add_argument("--methods", nargs="+", default=["none", "random", "hungarian", "search"],
                    help="permutation strategies; STRATEGY/per-layer uses per-layer residual permutations (glue); "
                         "free: the permutation ceiling, one unconstrained permutation per linear (oracle)")
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=10000)
    ap.add_argument("--context", type=int, default=512)
    add_search_arguments(ap)
    ap.add_argument("--kl", action="store_true",
                    help="also measure KL(dense || pruned) per token and next-token top-1 agreement with the dense "
                         "model on the same windows (doubles evaluation time)")
    add_output_arguments(ap)
    args = ap.parse_args()
    check_methods(args.methods, ("free",))
    torch.manual_seed(0)

    data_dir = Path(args.data_dir)
    calib_dir = calib_folder(data_dir, CALIB_NOVELS)
    text = _eval_text(data_dir)
    sparsity = Sparsity.parse(args.sparsity)
    knobs = search_config(args)
    rows = []

    reference = None

    def evaluate(loaded) -> dict:
        r = perplexity(loaded.model, loaded.tokenizer, text, context=args.context, max_tokens=args.eval_tokens,
                       reference=reference)
        return {k: r[k] for k in ("ppl", "kl", "top1_agreement") if k in r}

    def log(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    dense = load_model(args.model)
    ppl_dense = evaluate(dense)["ppl"]
    log({"method": "dense", "calib_seed": None, "ppl": ppl_dense, "seconds": time.perf_counter() - t0})
    if args.kl:
        reference = dense.model

    for seed in args.calib_seeds:
        base = OptimizeConfig(sparsity=sparsity, criterion=args.criterion, calib=str(calib_dir),
                              calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=seed,
                              search=knobs)
        loaded, batches, stats, calib_s = text_calibration(args.model, base)
        unstructured_ceiling_(loaded, stats, sparsity, args.criterion)
        log({"method": "unstructured", "calib_seed": seed, **evaluate(loaded), "calib_seconds": calib_s})

        for method in args.methods:
            if not method_seeds(args, method, seed):
                continue
            loaded = load_model(args.model)
            if method == "free":  # the permutation ceiling: one free permutation per linear (an oracle)
                reset_peak()
                secs, glue, dropped, _ = free_permutation_masks_(loaded, stats, sparsity, args.criterion,
                                                                 trials=knobs.swap_trials, seed=seed)
                log({"method": method, "calib_seed": seed, **evaluate(loaded), "glue_ops": glue,
                     "permute_seconds": secs, "peak_rss_mb": peak_mb(), "dropped_energy": dropped})
                continue
            cfg = method_config(base, method)
            c, wall, peak = timed_compress(loaded, cfg, stats, batches)
            log({"method": method, "calib_seed": seed, **evaluate(loaded), **compress_row(c, wall, peak)})

    # gap recovered, per calibration sample
    for r in rows:
        if r["calib_seed"] is None or r["method"] == "unstructured":
            continue
        none = next((x for x in rows if x["method"] == "none" and x["calib_seed"] == r["calib_seed"]), None)
        uns = next(x for x in rows if x["method"] == "unstructured" and x["calib_seed"] == r["calib_seed"])
        if none and none["ppl"] != uns["ppl"]:
            r["R"] = (none["ppl"] - r["ppl"]) / (none["ppl"] - uns["ppl"])
        if none and "kl" in r and none["kl"] != uns["kl"]:  # the same gap measured in KL to the dense model
            r["R_kl"] = (none["kl"] - r["kl"]) / (none["kl"] - uns["kl"])

    summary = {}
    for method in ["unstructured"] + args.methods:
        sel = [r for r in rows if r["method"] == method]
        ppls = [r["ppl"] for r in sel]
        rs = [r["R"] for r in sel if "R" in r]
        kls = [r["kl"] for r in sel if "kl" in r]
        rkl = [r["R_kl"] for r in sel if "R_kl" in r]
        agree = [r["top1_agreement"] for r in sel if "top1_agreement" in r]
        summary[method] = {
            "kl_mean": statistics.mean(kls) if kls else None, "kl_sd": statistics.stdev(kls) if len(kls) > 1 else 0.0,
            "top1_agreement_mean": statistics.mean(agree) if agree else None,
            "R_kl_mean": statistics.mean(rkl) if rkl else None,
            "R_kl_sd": statistics.stdev(rkl) if len(rkl) > 1 else 0.0,
            "ppl_mean": statistics.mean(ppls), "ppl_sd": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
            "R_mean": statistics.mean(rs) if rs else None, "R_sd": statistics.stdev(rs) if len(rs) > 1 else 0.0,
            "permute_seconds": (statistics.mean([r["permute_seconds"] for r in sel])
                                if sel and "permute_seconds" in sel[0] else None),
            "peak_rss_mb": (statistics.mean([r["peak_rss_mb"] for r in sel])
                            if sel and "peak_rss_mb" in sel[0] else None),
            "glue_ops": sel[0].get("glue_ops", 0) if sel else None, "n": len(sel)}
    out = {"model": args.model, "sparsity": str(sparsity), "criterion": args.criterion, "context": args.context,
           "eval_tokens": args.eval_tokens, "eval_text": list(EVAL_NOVELS), "calib_text": list(CALIB_NOVELS),
           "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "dense_ppl": ppl_dense,
           "rows": rows, "summary": summary, "search": dataclasses.asdict(knobs), "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "command": " ".join(["python", "benchmarks/quality_lm.py"] + sys.argv[1:])}
    model_tag = Path(args.model).name if os.sep in args.model else args.model  # an HF folder: its name
    stem = f"quality_{model_tag}_{str(sparsity).replace(':', 'of')}_{args.criterion}{args.tag}"
    lines = [f"### {args.model}, {sparsity}, {args.criterion}: held-out perplexity ({', '.join(EVAL_NOVELS)}, "
             f"{args.eval_tokens} tokens, context {args.context}); dense {ppl_dense:.2f}",
             ""]
    kl_cols = args.kl
    lines += ["| method | ppl (mean ± sd) | R (mean ± sd) | "
              + ("KL to dense (nats/token) | R (KL) | top-1 agreement | " if kl_cols else "")
              + "glue ops | permute time (s) | peak memory (MiB) | runs |",
              "|---|---|---|" + ("---|---|---|" if kl_cols else "") + "---|---|---|---|"]
    for method, s in summary.items():
        r = "—" if s["R_mean"] is None else f"{s['R_mean']:.3f} ± {s['R_sd']:.3f}"
        pt = "—" if s["permute_seconds"] is None else f"{s['permute_seconds']:.1f}"
        pk = "—" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f}"
        kl = ""
        if kl_cols:
            rk = "—" if s["R_kl_mean"] is None else f"{s['R_kl_mean']:.3f} ± {s['R_kl_sd']:.3f}"
            kl = ("— | — | — | " if s["kl_mean"] is None else
                  f"{s['kl_mean']:.4f} ± {s['kl_sd']:.4f} | {rk} | {s['top1_agreement_mean']:.4f} | ")
        lines.append(f"| {method} | {s['ppl_mean']:.2f} ± {s['ppl_sd']:.2f} | {r} | {kl}{s['glue_ops'] or 0} | {pt} "
                     f"| {pk} | {s['n']} |")
    seeds = list(args.calib_seeds)
    def per_seed(title: str, key: str, fmt: str) -> list[str]:
        out_lines = ["", title, "", "| method | " + " | ".join(f"seed {x}" for x in seeds) + " |",
                     "|---|" + "---|" * len(seeds)]
        for method in ["unstructured"] + args.methods:
            hits = [next((r for r in rows if r["method"] == method and r["calib_seed"] == x), None) for x in seeds]
            cells = ["—" if h is None or key not in h else format(h[key], fmt) for h in hits]
            out_lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return out_lines

    lines += per_seed("Per calibration seed (ppl; compare methods on the same seed):", "ppl", ".2f")
    if kl_cols:
        lines += per_seed("Per calibration seed (KL to dense, nats/token):", "kl", ".4f")
    lines += ["", "Mean ± sample sd over calibration seeds; R = (ppl_none − ppl) / (ppl_none − ppl_unstructured) per "
              "seed. Peak memory: the benchmark process's resident set during the method's compress run."]
    lines[-1] += search_note(args)
    free_rows = [r for r in rows if r["method"] == "free"]
    if free_rows:
        kinds = list(free_rows[0]["dropped_energy"])
        lines += ["", "Share of the diagonal energy W²·E[x²] the masks drop, per linear kind (mean over calibration "
                  "seeds): N:M in the original order, N:M in the free per-linear order (the oracle above), "
                  "unstructured per row; *closed* = (original − free) / (original − unstructured).", "",
                  "| linear | N:M original | N:M free order | unstructured | closed |", "|---|---|---|---|---|"]
        for kind in kinds:
            v = {key: statistics.mean(r["dropped_energy"][kind][key] for r in free_rows)
                 for key in ("identity", "free", "unstructured")}
            gap = v["identity"] - v["unstructured"]
            closed = (v["identity"] - v["free"]) / gap if gap > 0 else float("nan")
            lines.append(f"| {kind} | {v['identity']:.4f} | {v['free']:.4f} | {v['unstructured']:.4f} | {closed:.2f} |")
    if "free" in args.methods:
        lines[-1] += ("\n\nfree (an oracle, not deployable without one gather per linear): every pruned linear its "
                      f"own permutation, hungarian warm start + {knobs.swap_trials} checked exchanges on the diagonal "
                      "error, no coupling constraint (the permutation ceiling of this criterion).")
    write_results(stem, out, lines, args.out_dir)


if __name__ == "__main__":
    run_main(main)
