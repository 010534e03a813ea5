"""Assemble benchmarks/RESULTS.md from the markdown tables the benchmark scripts wrote in results/.

Every table in results/*.md was written by the script named in its "Command:" line, in the run that
measured it; this script only concatenates them (nothing is typed in by hand).
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

INTRO = """# Benchmark results

Produced on the project's CPU machine (2 cores, shared with other jobs while these ran, so wall times are
upper bounds) unless a table names a GPU. Each section is a table written by a benchmark script; the command
that produced it is under the table. Regenerate this file with `python benchmarks/make_results.py`.

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
"""


def main() -> None:
    parts = [INTRO]
    sections = 0
    for md in sorted(RESULTS.glob("*.md")):
        if md.stem.endswith("_smoke") or md.stem.endswith("_probe"):
            continue
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
