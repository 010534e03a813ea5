"""Assemble benchmarks/RESULTS.md from the markdown tables the benchmark scripts wrote in results/.

Every table in results/*.md was written by the script named in its "Command:" line, in the run that
measured it; this script only concatenates them (nothing is typed in by hand).
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

INTRO = """# Benchmark results

Produced on the project's CPU machine (2 cores, shared with other jobs while these ran, so wall times are
upper bounds) unless a table names a GPU. Each section is a table written by a benchmark script; the command
that produced it is under the table (and, in tables written since 2026-12-06, the commit). Regenerate this file
with `python benchmarks/make_results.py`. Superseded tables (a newer table repeats their settings and seeds) are
kept in `results/archive/` and not shown.

R = gap recovered = (metric_none − metric_method) / (metric_none − metric_unstructured) for perplexity
(sign flipped for similarity metrics): the share of the loss between N:M without permutation and
unstructured sparsity at the same density (the ceiling) that a method closes. `random` is the
random-permutation control.

The learned strategy's defaults changed on 2026-12-03 (from `steps=30, swap_trials=0, objective=output` to
`steps=0, swap_trials=1000, objective=auto`). A command that does not pass `--steps`/`--swap-trials`/`--objective`
reproduces its table only with the defaults of its day: the perplexity and MiniLM tables list every learned
setting they used under the table (the vision tables do so since that date). Peak memory columns (process resident set
during each method's compress run) exist in tables written since the same date, and perplexity tables show
the sample sd over seeds like the others (before, the population sd: smaller by √((n−1)/n)).
Also on 2026-12-03, later that day: exchange searches on groups with fewer candidate pairs than trials
(tiny models; of the benchmark models only the ViT-digits classifier's heads) try every pair per pass and
stop at a local optimum instead of drawing pairs at random; the ViT-digits `_learned_default` tables were
re-measured after that change. SmolLM2, MiniLM and DINOv2-S groups are larger and search as before.
Strategy names changed at commit d127696 (issue 21): in tables written before it, `learned` is the exchange search
(today `search`); from it on, `learned` is the end-to-end method (`e2e` before).
"""


# Columns of the overview, in order. "none" is R = 0 by definition and "unstructured" is the ceiling.
OVERVIEW_METHODS = ("random", "greedy", "hungarian", "search", "learned", "hungarian/per-layer", "search/per-layer",
                    "learned/per-layer", "free")
# Strategy names changed at this commit (issue 21); rows of tables written before it are relabelled to today's names.
RENAME_COMMIT = "d127696"
OLD_NAMES = {"learned": "search", "learned/per-layer": "search/per-layer", "e2e": "learned",
             "e2e/per-layer": "learned/per-layer"}
# The primary R of each kind of table (the first one present in its rows is used): R key, metric key, label.
PRIMARY_R = (("R", "ppl", "perplexity"), ("R_mean_cosine", "mean_cosine", "mean cosine"),
             ("R_cls_cosine", "cls_cosine", "CLS cosine"), ("R_top1", "top1", "top-1"))
STEM = re.compile(r"quality_(?P<model>.+?)_(?P<n>\d+)of(?P<m>\d+)_(?P<criterion>magnitude|wanda|ria)(?P<tag>.*)$")


def _current_learn_defaults() -> dict | None:
    try:
        from permcompile.config import SearchConfig
    except ImportError:  # the overview still lists the heuristics
        return None
    d = dataclasses.asdict(SearchConfig())
    d.pop("amp", None)  # autocast is a CPU no-op and older tables do not record it
    return d


def _learn_dependent(method: str) -> bool:
    """Cells that depend on SearchConfig (the exchange search's settings): only tables run with today's defaults."""
    return method.startswith("search") or method == "free"


def _newest_first(method: str) -> bool:
    """The searches changed most between sessions: their cells come from the newest table."""
    return _learn_dependent(method) or method.startswith("learned")


def _has_rename(data: dict, cwd: Path) -> bool:
    """Whether a table was written by code that already had today's strategy names (its recorded commit
    descends from ``RENAME_COMMIT``); tables without a commit predate the rename."""
    commit = (data.get("git") or {}).get("commit") or data.get("commit")
    if not commit:
        return False
    try:
        out = subprocess.run(["git", "merge-base", "--is-ancestor", RENAME_COMMIT, commit], cwd=cwd,
                             capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def _runs_today_defaults(learn: dict, defaults: dict | None, method: str, causal_lm: bool) -> bool:
    """Whether a table's learned settings are today's defaults for ``method``. ``objective="auto"`` is compared
    as what it resolves to (diagonal for causal LMs, output otherwise), and per-layer rows ignore
    ``residual_trials`` (with per-layer sites there is no global residual group to refine)."""
    if defaults is None:
        return False
    resolved = "diagonal" if causal_lm else "output"

    def norm(d: dict) -> dict:
        d = dict(d)
        if d.get("objective") == "auto":
            d["objective"] = resolved
        if method.endswith("/per-layer"):
            d.pop("residual_trials", None)
        return d

    have, want = norm(learn), norm(defaults)
    return all(have.get(k) == v for k, v in want.items())


def _recorded_at(path: Path) -> float:
    """When a result was committed (git author time); a file git does not know yet is the newest of all. The
    code changes between sessions, so of two tables with the same settings the newer shows today's code."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return path.stat().st_mtime
    if out.returncode != 0:
        return path.stat().st_mtime
    return float(out.stdout.strip()) if out.stdout.strip() else time.time()


def _mean(rows: list[dict], method: str, key: str) -> float | None:
    vals = [r[key] for r in rows if r.get("method") == method and r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def _read_table(path: Path, defaults: dict | None) -> dict | None:
    """The overview's view of one quality table: its primary R per method (per seed) and its baselines."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = data.get("rows") or []
    if not _has_rename(data, path.parent):
        rows = [dict(r, method=OLD_NAMES.get(r.get("method"), r.get("method"))) for r in rows]
    found = next((p for p in PRIMARY_R if any(p[0] in r for r in rows)), None)
    if found is None:
        return None
    r_key, metric_key, label = found
    learn = data.get("search") or data.get("learn") or {}  # "learn": tables written before the key's rename
    per_method = {}
    for method in OVERVIEW_METHODS:
        if _learn_dependent(method) and not _runs_today_defaults(learn, defaults, method, r_key == "R"):
            continue
        vals = [r[r_key] for r in rows if r.get("method") == method and r.get(r_key) is not None]
        if vals:
            per_method[method] = vals
    if not per_method:
        return None
    return {"stem": path.stem, "label": label, "R": per_method, "when": _recorded_at(path),
            "none": _mean(rows, "none", metric_key), "unstructured": _mean(rows, "unstructured", metric_key)}


def overview(results: Path = RESULTS) -> str:
    """One table of R per model × N:M × criterion, computed from the per-seed rows of results/quality_*.json.

    Each cell is mean ± sample sd over calibration seeds (n) of the table's primary R. Learned and free cells come
    only from tables run with today's SearchConfig defaults (``_runs_today_defaults``) and take the newest such
    table (``_recorded_at``: the learned pass changed between sessions); the other cells take the table with the
    most seeds for that method. Ties go to the table covering most of the row (so a row's cells share seeds
    where they can), then to the newer one.
    """
    defaults = _current_learn_defaults()
    tables: dict[tuple, list[dict]] = {}
    for path in sorted(results.glob("quality_*.json")):
        m = STEM.match(path.stem)
        if m is None or path.stem.endswith(("_smoke", "_probe")):
            continue
        table = _read_table(path, defaults)
        if table is not None:
            tables.setdefault((m["model"], f"{m['n']}:{m['m']}", m["criterion"]), []).append(table)
    if not tables:
        return ""
    used = [m for m in OVERVIEW_METHODS if any(m in t["R"] for ts in tables.values() for t in ts)]
    lines = [f"### {OVERVIEW_TITLE}",
             "", "| model (metric) | N:M | criterion | none → unstructured | " + " | ".join(used) + " | from |",
             "|---|---|---|---|" + "---|" * len(used) + "---|"]
    for (model, nm, crit), ts in sorted(tables.items()):
        row, sources = [], []
        for method in used:
            cands = [t for t in ts if method in t["R"]]
            if not cands:
                row.append("—")
                continue
            if _newest_first(method):  # the searches changed most between sessions: newest first
                t = max(cands, key=lambda t: (t["when"], len(t["R"][method]), len(t["R"]), t["stem"]))
            else:
                t = max(cands, key=lambda t: (len(t["R"][method]), len(t["R"]), t["when"], t["stem"]))
            vals = t["R"][method]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.append(f"{statistics.mean(vals):.3f} ± {sd:.3f} ({len(vals)})")
            if t not in sources:
                sources.append(t)
        main = max(sources, key=lambda t: (len(t["R"]), t["stem"]))
        sources.sort(key=lambda t: t is not main)  # the table the span comes from is named first
        fmt = ".1f" if (main["none"] or 0) > 10 else ".4f"  # perplexity vs cosine / top-1
        base = (f"{main['none']:{fmt}} → {main['unstructured']:{fmt}}"
                if main["none"] is not None and main["unstructured"] is not None else "—")
        lines.append(f"| {model} ({main['label']}) | {nm} | {crit} | {base} | " + " | ".join(row) + " | "
                     + ", ".join(t["stem"].removeprefix("quality_") for t in sources) + " |")
    lines += ["", "Computed by `make_results.py` from the per-seed rows of the tables in `benchmarks/results/` (each "
              "row names its tables in the last column; `none → unstructured` is the metric's mean in the first of "
              "them, the span R measures); nothing here is typed in. R: 0 = N:M without permutation, 1 = "
              "unstructured at the same density. Today's names: `search` is the exchange search and `learned` the "
              f"end-to-end method; rows of tables written before commit {RENAME_COMMIT} (which called them `learned` "
              "and `e2e`) are relabelled. `search` and `free` cells come only from tables run with today's "
              "SearchConfig defaults (— where none was), the newest such table; `learned` cells from the newest "
              "table (both searches changed between sessions); other cells come from the table with the most seeds. "
              "`/per-layer` rows need glue ops at "
              "run time (a gather per per-layer residual reading site) and `free` is an oracle with one gather per "
              "linear: neither is zero-overhead. Cells of one row can come from different tables (different seeds),"
              " and seed-to-seed spread is often as large as the gap between methods: read the sd and n, and the "
              "span (ViT-digits' top-1 span is a handful of test images).", ""]
    return "\n".join(lines)


# The questions the tables answer, in the order a reader asks them: (question, stem pattern, sub-question of the
# one above). A table may answer several; one no pattern matches is listed under the last entry. Superseded
# tables live in results/archive/ (a newer table repeats their settings) and appear nowhere here.
QUESTIONS = (
    ("How much quality does N:M sparsity cost, and how much do permutations win back? The overview, then by model:",
     None, False),
    ("SmolLM2-135M (perplexity, KL to dense)", r"quality_smollm2_.*", True),
    ("MiniLM-L6 (sentence-embedding cosine to dense)", r"quality_minilm_.*", True),
    ("DINOv2-S (CLS and patch feature cosine to dense)", r"quality_dinov2-s_.*", True),
    ("ViT classifier on digits (top-1)", r"quality_vit-digits_.*", True),
    ("Which learned-strategy settings work (objective, warm start, exchanges, sequential, task loss)?",
     r"quality_.*_(diagonal|relative|warmgreedy|exchanges|sequential|taskloss|residual)(_.*)?", False),
    ("One residual permutation for the model, or one per reading site (glue ops)?",
     r"quality_.*_(perlayer|residual_modes)", False),
    ("How does the exchange search converge with its budget?", r"search_convergence_.*", False),
    ("How do we compare with llm-compressor's SparseGPT?", r"peer_.*", False),
    ("How fast is 2:4 on a GPU (sparse kernels vs dense)?", r"sparse_speed.*", False),
    ("What does a compile cost (time per stage, peak memory)?", r"(pipeline_cost|memory_scaling).*", False),
    ("Is the DINOv2 model converted from ONNX the same model?", r"dinov2_conversion", False),
    ("Why do Gram-based objectives over-weight the first token?", r"gram_token_share_.*", False),
)
OVERVIEW_TITLE = "Overview: gap recovered R per model, pattern and criterion (mean ± sd over calibration seeds, n)"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def index_by_question(stems: list[str]) -> str:
    """The opening index of RESULTS.md: each question and links to the sections that answer it."""
    lines = ["## Index by question", ""]
    placed: set[str] = set()
    for question, pattern, sub in QUESTIONS:
        found = [s for s in stems if pattern is not None and re.fullmatch(pattern, s)]
        placed.update(found)
        links = [f"[{s.removeprefix('quality_')}](#{_anchor(s)})" for s in found]
        if pattern is None:
            links = [f"[overview](#{_anchor(OVERVIEW_TITLE)})"]
        if links:
            lines.append(f"{'  ' if sub else ''}- **{question}** " + ", ".join(links))
    rest = [s for s in stems if s not in placed]
    if rest:
        lines.append("- **Other tables** " + ", ".join(f"[{s.removeprefix('quality_')}](#{_anchor(s)})" for s in rest))
    lines.append("")
    return "\n".join(lines)


FINDINGS = HERE.parent / "docs" / "FINDINGS.md"
BEGIN, END = "<!-- overview: written by benchmarks/make_results.py -->", "<!-- end of overview -->"


def update_findings(table: str, findings: Path = FINDINGS) -> bool:
    """Put the overview table between the markers in docs/FINDINGS.md (so its copy never goes stale); False if
    the file or its markers are missing."""
    if not findings.is_file():
        return False
    text = findings.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    findings.write_text(text[:start + len(BEGIN)] + "\n" + table.strip() + "\n" + text[end:])
    return True


def _section_files(results: Path = RESULTS) -> list[Path]:
    """The tables RESULTS.md shows: results/*.md but smoke runs and probes (results/archive/ is not read)."""
    return [md for md in sorted(results.glob("*.md")) if not md.stem.endswith(("_smoke", "_probe"))]


def main() -> None:
    files = _section_files()
    title, _, intro = INTRO.partition("\n\n")
    parts = [title + "\n", index_by_question([md.stem for md in files]), "## About these tables\n\n" + intro]
    table = overview()
    if table:
        parts.append(table)
        if update_findings(table):
            print(f"updated the overview in {FINDINGS}")
    sections = 0
    for md in files:
        parts.append(f"## {md.stem}\n")
        sections += 1
        parts.append(md.read_text().strip() + "\n")
        png = md.with_suffix(".png")
        if png.exists():
            parts.append(f"![{md.stem}](results/{png.name})\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} ({sections} sections)")


if __name__ == "__main__":
    main()
