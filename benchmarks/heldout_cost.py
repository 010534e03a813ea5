"""What the reconstruction's held-out check costs: ``compress_`` with ``ReconstructConfig(heldout="none")`` and
with the default ``"auto"``, alternated in one process on the same calibration batches (so both see the same
machine load), per step. Example::

    OMP_NUM_THREADS=1 python benchmarks/heldout_cost.py --model minilm --repeats 2

Writes ``benchmarks/results/heldout_cost_<model>.json`` and ``.md`` with the git commit and command.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    from permcompile.calib.data import load_calibration
    from permcompile.config import OptimizeConfig, ReconstructConfig
    from permcompile.models import load_model
    from permcompile.pipeline import compress_

    loaded = load_model(args.model)
    dense = copy.deepcopy(loaded.model.state_dict())
    base = OptimizeConfig()
    batches = load_calibration(None, loaded, base.calib_samples, base.calib_seq_len, base.seed)
    rows = []
    for _ in range(args.repeats):
        for mode in ("none", "auto"):
            loaded.model.load_state_dict(dense)
            start = time.perf_counter()
            c = compress_(loaded, dataclasses.replace(base, reconstruct=ReconstructConfig(heldout=mode)), quiet=True,
                          batches=batches)
            rows.append({"heldout": mode, "seconds": time.perf_counter() - start, "timings": c.timings})
            print(f"heldout={mode}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    out = {"git": git_state(), "command": command_line("heldout_cost.py"), "model": args.model,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg(), "rows": rows}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out_dir) / f"heldout_cost_{args.model}"
    write_result(f"{stem}.json", out)
    mean = {m: statistics.mean(r["seconds"] for r in rows if r["heldout"] == m) for m in ("none", "auto")}
    rec = {m: statistics.mean(r["timings"]["mask + reconstruct"] for r in rows if r["heldout"] == m)
           for m in ("none", "auto")}
    lines = [f"# {args.model}: cost of the reconstruction's held-out check (compress_, defaults otherwise)", "",
             *provenance_lines(out), f"OMP_NUM_THREADS={out['omp_num_threads']}; load average at the end "
             f"{out['load_average'][0]:.1f}", "", "| heldout | compress_ s (mean) | mask + reconstruct s (mean) |",
             "|---|---|---|", *(f"| {m} | {mean[m]:.1f} | {rec[m]:.1f} |" for m in ("none", "auto")), "",
             f"Ratio auto / none: compress_ {mean['auto'] / mean['none']:.2f}×, "
             f"reconstruct {rec['auto'] / rec['none']:.2f}×"]
    write_result(f"{stem}.md", "\n".join(lines) + "\n", out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
