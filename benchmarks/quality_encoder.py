"""Quality of N:M pruning with and without permutations on a sentence encoder (MiniLM by default).

Rows: dense (measured against itself: cosine 1 by definition); unstructured 50% (same criterion and
statistics: the ceiling); N:M with permutation none / random (control) / hungarian / search (and greedy when
asked), each over several calibration samples (disjoint random sentence draws, chosen by seed) so that the
spread is visible. Metrics, on held-out sentences from a novel not used for calibration, against the dense
model: mean cosine of the sentence embeddings (masked mean of ``last_hidden_state``) and Spearman correlation
of the pairwise similarities; gap recovered R = (metric - metric_none) / (metric_unstructured - metric_none)
against the baseline of the same calibration sample; glue ops; permutation wall time; kept importance.

Every figure is measured by this script in the run that prints it. Example (the Austen novels are in the
workplace's shared data folder; pass any folder holding them)::

    python benchmarks/quality_encoder.py --data-dir ../shared/data/austen --calib-seeds 0 1 2 \
        --methods none random hungarian search --eval-sentences 500

Writes ``benchmarks/results/quality_<model>_<sparsity>_<criterion>.json`` and a markdown table next to it.
The helpers below (``add_gap_recovered``, ``summarise``, ``fmt``, ``write_results``) are shared with
``quality_vision.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import git_state, provenance_lines, write_result  # noqa: E402

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_NOVELS = ("northanger_abbey.txt", "mansfield_park.txt")
EVAL_NOVELS = ("persuasion.txt",)


# ------------------------------------------------------------------------------------------------ shared helpers
def peak_mb() -> float:
    """Peak resident memory of this process (MiB) since the last :func:`reset_peak` (Linux ``VmHWM``; elsewhere
    the lifetime ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart the peak-memory count (Linux: ``/proc/self/clear_refs`` ← 5), so each method's row gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_main(main) -> None:
    """Run a benchmark's ``main()``; a permcompile error (unknown model, bad option value) is one line, exit 2."""
    from permcompile.errors import PermcompileError

    try:
        main()
    except PermcompileError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# "+obs": reconstruction on (update="obs"); "+search": its OBS search objective; "+refit": 30 least-squares
# refit steps after the OBS pass; "+critmask": the criterion picks the mask. Without "+obs" a row is mask-only.
UPDATE_SUFFIXES = ("obs", "search", "refit", "critmask")


def check_methods(methods: list[str], extra: tuple[str, ...] = ()) -> None:
    """Reject an unknown --methods entry before anything slow runs: STRATEGY[/per-layer][+obs[+search|+refit|...]]."""
    from permcompile.errors import UsageError
    from permcompile.passes.permute import STRATEGIES

    valid = list(STRATEGIES) + [f"{s}/per-layer" for s in STRATEGIES] + list(extra)
    bad = []
    for m in methods:
        head, *suffixes = m.split("+")
        if head not in valid or any(x not in UPDATE_SUFFIXES for x in suffixes) or (suffixes and "obs" not in suffixes):
            bad.append(m)
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(valid)}, each optionally "
                         f"with +obs (reconstruction) and then +{', +'.join(UPDATE_SUFFIXES[1:])}")


def method_config(base, method: str):
    """The ``OptimizeConfig`` of one --methods entry on top of ``base`` (mask-only unless ``+obs``)."""
    import dataclasses

    from permcompile.config import ReconstructConfig

    head, *suffixes = method.split("+")
    strategy, _, residual = head.partition("/")  # "hungarian/per-layer": per-layer residual sites
    recon = ReconstructConfig(search="obs" if "search" in suffixes else "criterion",
                              refit_iters=30 if "refit" in suffixes else 0,
                              mask="criterion" if "critmask" in suffixes else "obs")
    return dataclasses.replace(base, permutation=strategy, residual=residual or "global",
                               update="obs" if "obs" in suffixes else "none", reconstruct=recon)


def text_model_args(ap, model: str) -> None:
    """The options every text-model quality script shares: ``--model``, ``--data-dir``, ``--sparsity``,
    ``--criterion``."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--data-dir", required=True, help="folder with the Austen novels (.txt)")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--criterion", default="wanda", choices=["magnitude", "wanda", "ria"])


def text_calibration(model: str, base):
    """A fresh copy of ``model`` and its text calibration for ``base`` (an OptimizeConfig):
    ``(loaded, batches, stats, seconds)``."""
    from permcompile.calib.data import load_calibration
    from permcompile.calib.stats import collect_input_stats
    from permcompile.models import load_model

    loaded = load_model(model)
    t = time.perf_counter()
    batches = load_calibration(base.calib, loaded, base.calib_samples, base.calib_seq_len, base.seed)
    stats = collect_input_stats(loaded.model, batches, progress=False, forward_kwargs=loaded.forward_kwargs())
    return loaded, batches, stats, time.perf_counter() - t


def unstructured_ceiling_(loaded, stats, sparsity, criterion: str):
    """Prune ``loaded`` in place to unstructured ``1 - n/m`` sparsity with the same criterion and statistics (the
    ceiling every N:M row is measured against). Returns ``(groups, linears)`` of the analysis it ran."""
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears, unstructured_masks_

    captured = capture(loaded.model, loaded.example_inputs(), loaded.forward_kwargs())
    groups = analyze(captured)
    linears = select_linears(loaded.model, captured, groups, sparsity.m)
    unstructured_masks_(loaded.model, linears, stats, criterion, 1 - sparsity.n / sparsity.m)
    return groups, linears


def free_permutation_masks_(loaded, stats, sparsity, criterion: str, trials: int = 1000, seed: int = 0):
    """The *permutation ceiling* (an oracle, not a deployable artifact): every pruned linear gets its own input
    permutation, free of all coupling (no shared residual order, no per-head constraint on ``o_proj``), chosen
    like the search strategy (``hungarian`` warm start, then ``trials`` checked exchanges on the diagonal error
    ``W² E[x²]``); the N:M mask of the criterion's scores in that order is mapped back and applied in place.
    Deploying it would need one gather per linear (PermLLM's and RIA's setting).

    Returns ``(seconds, glue, dropped, perms)``: ``perms[module]`` is the linear's input order and
    ``dropped[kind]`` is the share of the diagonal energy ``W² E[x²]`` that the criterion's masks drop, summed
    over the linears of that kind (``q_proj``, ``down_proj``, ...) for the N:M mask in the original order
    (``identity``), in the free order (``free``) and unstructured per row (``unstructured``): where the gap
    between N:M and unstructured is, and how much of it any permutation closes.
    """
    from permcompile.capture import capture
    from permcompile.math.search import diagonal_exchanges
    from permcompile.math.nm import nm_mask, unstructured_mask
    from permcompile.math.strategies import hungarian
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import consumer_scores, select_linears, weight_kout

    t = time.perf_counter()
    model = loaded.model
    captured = capture(model, loaded.example_inputs(), loaded.forward_kwargs())
    linears = [i for i in select_linears(model, captured, analyze(captured), sparsity.m) if i.prune]
    gen = torch.Generator().manual_seed(seed)
    n, m = sparsity.n, sparsity.m
    sums: dict[str, dict[str, float]] = {}
    perms: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for info in linears:
            w = weight_kout(model, info)
            s = consumer_scores(model, info, stats, criterion)  # [out, K]
            st = stats.get(info.module) if stats else None
            e = w.float().square()
            if st is not None:
                e = e * st.mean_sq
            k = s.shape[1]
            labels, fixed = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.bool)
            perm = hungarian(s, n, m, labels, fixed, generator=gen)
            perm, *_ = diagonal_exchanges(e.T.contiguous(), s.T.contiguous(), perm, n, m, labels, fixed,
                                          trials=trials, generator=gen)
            mask = torch.empty_like(s, dtype=torch.bool)
            mask[:, perm] = nm_mask(s[:, perm], n, m)
            acc = sums.setdefault(info.module.rsplit(".", 1)[-1], dict.fromkeys(("identity", "free", "unstructured",
                                                                                 "total"), 0.0))
            acc["identity"] += float(e[~nm_mask(s, n, m)].sum())
            acc["free"] += float(e[~mask].sum())
            acc["unstructured"] += float(e[~unstructured_mask(s, 1 - n / m)].sum())
            acc["total"] += float(e.sum())
            w.mul_(mask.to(w.dtype))
            perms[info.module] = perm
    dropped = {kind: {key: v[key] / max(v["total"], 1e-30) for key in ("identity", "free", "unstructured")}
               for kind, v in sums.items()}
    return time.perf_counter() - t, len(linears), dropped, perms


def timed_compress(loaded, cfg, stats, batches):
    """One method's ``compress_`` run on shared calibration data: ``(result, wall seconds, peak MiB)``. The peak
    is the whole process's resident memory during the run (it includes the evaluation data the script holds)."""
    from permcompile.pipeline import compress_

    reset_peak()
    t = time.perf_counter()
    c = compress_(loaded, cfg, quiet=True, stats=stats, batches=batches,
                  checkpoint_dir=tempfile.mkdtemp(prefix="pc-checkpoints-"))
    return c, time.perf_counter() - t, peak_mb()


def add_gap_recovered(rows: list[dict], metrics: list[str]) -> None:
    """R_<metric> = (metric - metric_none) / (metric_unstructured - metric_none), per calibration seed."""
    for r in rows:
        if r.get("calib_seed") is None or r["method"] in ("dense", "unstructured"):
            continue
        none = next((x for x in rows if x["method"] == "none" and x["calib_seed"] == r["calib_seed"]), None)
        uns = next((x for x in rows if x["method"] == "unstructured" and x["calib_seed"] == r["calib_seed"]), None)
        for mt in metrics:
            if none and uns and uns[mt] != none[mt]:
                r[f"R_{mt}"] = (r[mt] - none[mt]) / (uns[mt] - none[mt])


def _ms(values: list[float]) -> tuple[float | None, float]:
    values = [v for v in values if v is not None]
    if not values:
        return None, 0.0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], methods: list[str], metrics: list[str]) -> dict:
    """Mean and sample sd over calibration seeds of every metric, R, permute time, kept importance."""
    summary = {}
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        s = {"n": len(sel)}
        for key in metrics + [f"R_{m}" for m in metrics] + ["permute_seconds", "compress_seconds",
                                                             "kept_identity", "kept_chosen", "peak_rss_mb"]:
            mean, sd = _ms([r.get(key) for r in sel])
            s[f"{key}_mean"], s[f"{key}_sd"] = mean, sd
        s["glue_ops"] = max((r.get("glue_ops") or 0) for r in sel)
        summary[method] = s
    return summary


def fmt(s: dict, key: str, digits: int = 4) -> str:
    mean = s.get(f"{key}_mean")
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {s.get(f'{key}_sd', 0.0):.{digits}f}"


def peak_cell(s: dict) -> str:
    """The peak-memory cell of a summary row (— for rows without a compress run)."""
    return "—" if s.get("peak_rss_mb_mean") is None else f"{s['peak_rss_mb_mean']:.0f}"


def compress_row(c, wall: float, peak: float) -> dict:
    """What a ``compress_`` run decided: glue, timings, kept importance over the groups it moved."""
    moved = [g for g in c.group_results if g.strategy != "none"]
    return {"glue_ops": c.fold_report.glue_ops, "permute_seconds": c.timings.get("permute"),
            "compress_seconds": wall,
            "kept_identity": (sum(g.kept_identity for g in moved) / len(moved)) if moved else None,
            "kept_chosen": (sum(g.kept_chosen for g in moved) / len(moved)) if moved else None,
            "groups_moved": len(moved), "fold_max_rel_err": c.fold_err,
            "peak_rss_mb": peak,
            "group_notes": {g.name: f"{g.strategy}: {g.note}" for g in c.group_results if g.note},
            "timings": dict(c.timings)}


def group_overview(groups) -> list[dict]:
    """The coupling groups of the model (kind, size, fixed elements, pins), for the record."""
    return [{"name": g.name, "kind": g.kind, "size": g.size, "consumers": len(g.consumers), "fixed": len(g.fixed),
             "pins": [f"{p.op} at {p.module or p.node}: {p.reason}" for p in g.pins][:4]} for g in groups]


class CachedReference(torch.nn.Module):
    """The dense reference model with its outputs memoised by input: every row of a table compares against the
    same reference on the same inputs, so its forward passes are computed once (identical results, half the
    evaluation time). Attribute access (``config``, ...) falls through to the wrapped model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.config = getattr(model, "config", None)
        self._memo: dict = {}

    def forward(self, **kwargs):
        key = tuple((k, tuple(v.shape), v.detach().cpu().numpy().tobytes()) if isinstance(v, torch.Tensor) else (k, v)
                    for k, v in sorted(kwargs.items()))
        if key not in self._memo:
            self._memo[key] = self.inner(**kwargs)
        return self._memo[key]


# the slow strategies --learned-seeds restricts: the exchange search and the end-to-end method
SLOW_STRATEGIES = ("search", "learned")


def method_seeds(args, method: str, seed: int) -> bool:
    """Whether ``method`` runs for calibration ``seed`` (``--learned-seeds`` restricts the costly search/learned
    strategies)."""
    return not method.startswith(SLOW_STRATEGIES) or args.learned_seeds is None or seed in args.learned_seeds


def add_search_arguments(ap: argparse.ArgumentParser) -> None:
    """``--search KEY=VALUE`` (repeatable), parsed like ``permcompile optimize --search`` by ``config.parse_search``,
    and ``--learned-seeds`` (the calibration seeds the slow search and learned rows run on)."""
    from permcompile.config import SearchConfig

    keys = [f.name for f in dataclasses.fields(SearchConfig)]
    ap.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                    help="search strategy (exchange search) setting, repeatable; KEY one of " + ", ".join(keys))
    ap.add_argument("--learned-seeds", nargs="+", type=int, default=None,
                    help="run the (slow) search and learned strategies only for these calibration seeds "
                         "(default: all)")


def add_output_arguments(ap: argparse.ArgumentParser) -> None:
    """``--out-dir`` and ``--tag``: where a quality script writes its JSON/markdown and the suffix of its name."""
    ap.add_argument("--out-dir", default=None, help="where the JSON/markdown results go (default benchmarks/results)")
    ap.add_argument("--tag", default="")


def search_config(args):
    """The search strategy's settings from the shared ``--search KEY=VALUE`` options (``add_search_arguments``)."""
    from permcompile.config import parse_search
    from permcompile.errors import UsageError

    try:
        return parse_search(getattr(args, "search", None) or [])
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None


def search_note(args) -> str:
    """The search strategy's full settings (SearchConfig) for a table's footnote ("" when no search row was asked
    for)."""
    if not any(m.startswith("search") for m in args.methods):
        return ""
    knobs = search_config(args)
    seeds = args.learned_seeds if getattr(args, "learned_seeds", None) is not None else args.calib_seeds
    return ("\n\nsearch (calibration seeds " + ", ".join(map(str, seeds)) + "): "
            + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(knobs).items()))


def write_results(stem: str, out: dict, lines: list[str], out_dir: str | Path | None = None) -> None:
    """``<out_dir>/<stem>.json`` (everything, with the commit) and ``.md`` (the table, the commit and the command),
    default benchmarks/results."""
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    out.setdefault("git", git_state())
    write_result(folder / f"{stem}.json", out)
    lines = lines + [""] + provenance_lines(out)
    write_result(folder / f"{stem}.md", "\n".join(lines) + "\n", out)
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------ this benchmark
def calib_folder(data_dir: Path, names=CALIB_NOVELS) -> Path:
    """A temporary folder with the files ``names`` of ``data_dir`` (the calibration novels), to pass as ``--calib``."""
    tmp = Path(tempfile.mkdtemp(prefix="pc-calib-"))
    for name in names:
        src = data_dir / name
        if src.is_file():
            (tmp / name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    if not any(tmp.iterdir()):
        sys.exit(f"none of {names} found in {data_dir}")
    return tmp


def _eval_sentences(data_dir: Path, n: int, seed: int) -> list[str]:
    from permcompile.evaluate import split_sentences

    text = "\n\n".join((data_dir / f).read_text(encoding="utf-8") for f in EVAL_NOVELS if (data_dir / f).is_file())
    if not text:
        sys.exit(f"none of {EVAL_NOVELS} found in {data_dir}")
    sentences = split_sentences(text, min_words=4)
    if len(sentences) > n:
        sentences = random.Random(seed).sample(sentences, n)
    return sentences


def main() -> None:
    from permcompile.config import OptimizeConfig, Sparsity
    from permcompile.evaluate import embedding_similarity
    from permcompile.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    text_model_args(ap, "minilm")
    ap.add_argument("--methods", nargs="+", default=["none", "random", "hungarian", "search"],
                    help="permutation strategies (none random greedy hungarian search learned); "
                         "STRATEGY/per-layer uses per-layer residual permutations (one gather per reading site, "
                         "counted as glue ops)")
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration sentences")
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-sentences", type=int, default=500)
    ap.add_argument("--eval-seed", type=int, default=0, help="which held-out sentences (fixed across rows)")
    add_search_arguments(ap)
    add_output_arguments(ap)
    args = ap.parse_args()
    check_methods(args.methods)
    torch.manual_seed(0)

    data_dir = Path(args.data_dir)
    calib_dir = calib_folder(data_dir)
    sentences = _eval_sentences(data_dir, args.eval_sentences, args.eval_seed)
    sparsity = Sparsity.parse(args.sparsity)
    knobs = search_config(args)
    metrics = ["mean_cosine", "spearman"]
    rows: list[dict] = []
    t_start = time.perf_counter()

    dense = load_model(args.model)
    reference = CachedReference(dense.model)

    def evaluate(loaded) -> dict:
        r = embedding_similarity(loaded.model, reference, dense.tokenizer, sentences)
        return {"mean_cosine": r["mean_cosine"], "min_cosine": r["min_cosine"], "spearman": r["spearman"],
                "pairs": r["pairs"]}

    def log(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    t = time.perf_counter()
    log({"method": "dense", "calib_seed": None, **evaluate(load_model(args.model)),
         "seconds": time.perf_counter() - t})

    groups_info = None
    for seed in args.calib_seeds:
        base = OptimizeConfig(sparsity=sparsity, criterion=args.criterion, calib=str(calib_dir),
                              calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=seed,
                              search=knobs)
        loaded, batches, stats, calib_s = text_calibration(args.model, base)
        groups, linears = unstructured_ceiling_(loaded, stats, sparsity, args.criterion)
        if groups_info is None:
            groups_info = group_overview(groups)
        log({"method": "unstructured", "calib_seed": seed, **evaluate(loaded), "calib_seconds": calib_s,
             "pruned_layers": sum(i.prune for i in linears), "dense_layers": sum(not i.prune for i in linears)})

        for method in args.methods:
            if not method_seeds(args, method, seed):
                continue
            loaded = load_model(args.model)
            cfg = method_config(base, method)
            c, wall, peak = timed_compress(loaded, cfg, stats, batches)
            log({"method": method, "calib_seed": seed, **evaluate(loaded), **compress_row(c, wall, peak)})

    add_gap_recovered(rows, metrics)
    methods = ["dense", "unstructured"] + args.methods
    summary = summarise(rows, methods, metrics)
    out = {"model": args.model, "sparsity": str(sparsity), "criterion": args.criterion,
           "eval_text": list(EVAL_NOVELS), "eval_sentences": len(sentences), "eval_seed": args.eval_seed,
           "calib_text": list(CALIB_NOVELS), "calib_samples": args.calib_samples,
           "calib_seq_len": args.calib_seq_len, "calib_seeds": args.calib_seeds, "learned_seeds": args.learned_seeds,
           "search": knobs.__dict__,
           "groups": groups_info, "rows": rows, "summary": summary, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "benchmarks/quality_encoder.py"] + sys.argv[1:])}
    model_tag = Path(args.model).name if os.sep in args.model else args.model  # an HF folder: its name
    stem = f"quality_{model_tag}_{str(sparsity).replace(':', 'of')}_{args.criterion}{args.tag}"
    lines = [f"### {args.model}, {sparsity}, {args.criterion}: sentence-embedding agreement with the dense model "
             f"({len(sentences)} held-out sentences from {', '.join(EVAL_NOVELS)}; calibration: "
             f"{args.calib_samples} sentences from {', '.join(CALIB_NOVELS)}, seeds {args.calib_seeds})",
             "", "| method | mean cosine | R (cosine) | Spearman | R (Spearman) | kept importance (identity → chosen) "
             "| glue ops | permute time (s) | peak memory (MiB) | runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        kept = "—" if s["kept_chosen_mean"] is None else f"{s['kept_identity_mean']:.4f} → {s['kept_chosen_mean']:.4f}"
        pt = "—" if s["permute_seconds_mean"] is None else fmt(s, "permute_seconds", 1)
        glue = s['glue_ops'] if method not in ('dense', 'unstructured') else '—'
        lines.append(f"| {method} | {fmt(s, 'mean_cosine')} | {fmt(s, 'R_mean_cosine', 3)} | {fmt(s, 'spearman')} "
                     f"| {fmt(s, 'R_spearman', 3)} | {kept} | {glue} "
                     f"| {pt} | {peak_cell(s)} | {s['n']} |")
    lines += ["", "Mean ± sample sd over calibration seeds; R = (metric − metric_none) / (metric_unstructured − "
              "metric_none) per seed. Kept importance: share of the criterion's score kept by the N:M mask, averaged "
              "over the groups the strategy moved. Peak memory: the benchmark process's resident set during the "
              "method's compress run (model, calibration data and what the script holds for evaluation). Runs = "
              "calibration seeds the row was measured on."]
    lines[-1] += search_note(args)
    write_results(stem, out, lines, args.out_dir)
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    run_main(main)
