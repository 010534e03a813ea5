"""Bar charts of the quality benchmarks: one PNG per ``quality_*.json`` (metric per method, mean ± sd).

Reads every ``quality_*.json`` in ``--results-dir`` (default ``benchmarks/results``). The layout written by
``benchmarks/quality_lm.py`` has ``rows`` (one per run: ``method``, ``calib_seed``, ``ppl``, ``R``, ...) and a
``summary``; other quality scripts may use other metric keys (``metric``, ``cosine``, ``top1``, ``accuracy``, ...,
or ``{"metric": NAME, "value": X}`` rows): every numeric metric found is drawn in its own panel, bars are the mean
over runs of a method and error bars their population standard deviation (as in the tables). Files that cannot
be read are skipped with a printed note. Example::

    python benchmarks/plot_results.py                      # writes benchmarks/results/quality_*.png
    python benchmarks/plot_results.py --results-dir /tmp/r --out-dir /tmp/plots
"""
from __future__ import annotations

import importlib.util
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# metric keys looked for in rows, in display order; keys containing these words are taken too
KNOWN = ["ppl", "R", "kl", "metric", "cosine", "top1", "top5", "accuracy", "acc", "f1", "loss", "mse"]
WORDS = ("ppl", "perplexity", "cosine", "top1", "top5", "accuracy", "recovered", "spearman")
METHOD_KEYS = ("method", "strategy", "permutation", "name")
LOWER_IS_BETTER = ("ppl", "perplexity", "loss", "mse")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _method(row: dict) -> str | None:
    for k in METHOD_KEYS:
        if isinstance(row.get(k), str):
            return row[k]
    return None


def _metric_keys(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for k, v in r.items():
            if not _num(v) or k in seen:
                continue
            if k in KNOWN or any(w in k.lower() for w in WORDS):
                seen.append(k)
    order = {k: i for i, k in enumerate(KNOWN)}
    # quality metrics first, then the "gap recovered" ones (R, R_<metric>)
    return sorted(seen, key=lambda k: (k == "R" or k.startswith("R_"), order.get(k, len(KNOWN)), k))


def _stats(table: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    return {k: {m: (statistics.mean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v)) for m, v in per.items()}
            for k, per in table.items()}


def extract(data) -> tuple[dict[str, dict[str, tuple[float, float, int]]], str]:
    """→ ({metric: {method: (mean, population sd, runs)}}, how it was read). ValueError when nothing fits."""
    if not isinstance(data, dict):
        raise ValueError("top level is not an object")
    rows = data.get("rows")
    table: dict[str, dict[str, list[float]]] = {}
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        # {"metric": "cosine", "value": 0.9} rows: one named metric per row
        for r in rows:
            if isinstance(r.get("metric"), str) and _num(r.get("value")) and _method(r):
                table.setdefault(r["metric"], {}).setdefault(_method(r), []).append(float(r["value"]))
        if table:
            return _stats(table), "rows (metric/value)"
        keys = _metric_keys(rows)
        for k in keys:
            for r in rows:
                m = _method(r)
                if m is not None and _num(r.get(k)):
                    table.setdefault(k, {}).setdefault(m, []).append(float(r[k]))
        if table:
            return _stats(table), "rows"
    summary = data.get("summary")
    stats: dict[str, dict[str, tuple[float, float, int]]] = {}
    if isinstance(summary, dict) and summary and all(isinstance(v, dict) for v in summary.values()):
        # {method: {"<metric>_mean": x, "<metric>_sd": y}} or {method: {"<metric>": x}}
        for method, s in summary.items():
            for k, v in s.items():
                if not _num(v) or k.endswith("_sd") or k in ("n", "glue_ops") or "seconds" in k:
                    continue
                name = k[:-5] if k.endswith("_mean") else k
                if name in KNOWN or any(w in name.lower() for w in WORDS):
                    sd = s.get(f"{name}_sd")
                    n = s.get("n")
                    stats.setdefault(name, {})[method] = (float(v), float(sd) if _num(sd) else 0.0,
                                                          int(n) if _num(n) else 1)
        if stats:
            return stats, "summary"
    raise ValueError("no rows/summary with a known numeric metric (ppl, R, metric, cosine, top1, accuracy, ...)")


def plot_file(path: Path, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text(encoding="utf-8"))
    table, how = extract(data)
    metrics = list(table)[:6]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.6, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        per = table[metric]
        methods = list(per)
        means, sds, ns = ([per[m][i] for m in methods] for i in range(3))
        bars = ax.bar(range(len(methods)), means, yerr=sds, capsize=4, color="#4c72b0", ecolor="black")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        lower = any(w in metric.lower() for w in LOWER_IS_BETTER) or metric == "kl"  # KL to the dense model
        ax.set_title(f"{metric} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        pos = [v for v in means if v > 0]
        if lower and pos and len(pos) == len(means) and max(pos) / min(pos) > 20:
            ax.set_yscale("log")
        ax.margins(y=0.2)  # head-room for the value labels
        for b, mean, n in zip(bars, means, ns):
            ax.annotate(f"{mean:.3g}" + (f"\nn={n}" if n > 1 else ""), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        if metric == "ppl" and _num(data.get("dense_ppl")):
            ax.axhline(data["dense_ppl"], color="gray", ls="--", lw=1, label=f"dense {data['dense_ppl']:.1f}")
            ax.legend(fontsize=7)
        if metric == "R" or metric.startswith("R_"):
            ax.axhline(0, color="gray", lw=0.8)
            ax.axhline(1, color="gray", ls=":", lw=0.8)
    bits = [str(data.get(k)) for k in ("model", "sparsity", "criterion") if data.get(k) is not None]
    fig.suptitle(" · ".join(bits) or path.stem, fontsize=11)
    cmd = data.get("command")
    if isinstance(cmd, str):
        fig.text(0.01, 0.005, cmd[:160], fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    print(f"{path.name}: {', '.join(metrics)} from {how} → {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default=str(RESULTS), help="folder with quality_*.json")
    ap.add_argument("--out-dir", default=None, help="where PNGs go (default: the results folder)")
    ap.add_argument("--pattern", default="quality_*.json")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    src = Path(args.results_dir)
    out_dir = Path(args.out_dir) if args.out_dir else src
    files = sorted(src.glob(args.pattern))
    if not files:
        print(f"no {args.pattern} in {src}")
    written = 0
    for f in files:
        try:
            plot_file(f, out_dir)
            written += 1
        except Exception as exc:  # a colleague's schema we cannot read: say so and go on
            print(f"skipped {f.name}: {type(exc).__name__}: {exc}")
    print(f"{written} chart(s) written, {len(files) - written} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
