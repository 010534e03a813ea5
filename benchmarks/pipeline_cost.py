"""Cost of the compiler itself: per-stage wall time and peak memory of ``permcompile.pipeline.optimize``.

One row per model (a short name such as ``minilm``/``smollm2`` or a local Hugging Face folder). Each model runs
in a fresh child process so that its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own, and
writes its artifacts to a temporary folder that is deleted afterwards. Stage names are the keys of
``result.report["timings"]``: capture, analyze, calibrate, permute, fold (including the check that folding
preserved the outputs), mask, export (hf/ + ONNX + Triton repository), verify (artifact checks + ONNX Runtime
vs torch). "total" is their sum without ``load``; "wall" is the whole ``optimize()`` call without ``load``
(it also counts small untimed steps: the dense reference forward before folding, the report).

The ONNX graph of a large model is traced in a forked process while the weights are compressed
(``GraphPrefetch``; ``--prefetch auto|on|off``). Its CPU seconds are reported separately ("trace child CPU s"),
and the export column then only holds the time spent waiting for it plus binding the weights and writing.

The machine may be shared: the script records ``os.cpu_count()``, ``torch.get_num_threads()`` and the load
average before and after each model so that readers can judge the figures. Example::

    python benchmarks/pipeline_cost.py --models minilm smollm2 --permutation hungarian

Writes ``benchmarks/results/pipeline_cost_<permutation>_<criterion><tag>.json`` and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import git_state, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (report key, column title)
STAGES = [("capture", "capture"), ("analyze", "analysis"), ("calibrate", "calibration"),
          ("permute", "permutation"), ("fold", "folding"), ("mask", "masking"), ("export", "export"),
          ("verify", "verification")]
TARGET = {"model": "smollm2", "permutation": "hungarian", "criterion": "wanda", "seconds": 60.0}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_one(model: str, args) -> dict:
    """Runs in the child process: one ``optimize()`` call, timings and peak RSS."""
    import torch

    from permcompile import timing
    from permcompile.config import OptimizeConfig, Sparsity
    from permcompile.pipeline import optimize

    # Process CPU seconds per stage next to the wall seconds the pipeline reports: on a shared machine wall time
    # includes waiting for a core, CPU time does not (it adds up all threads). Wraps the timer at run time only.
    cpu: dict[str, float] = {}
    orig_step = timing.StepTimer.step

    def step(self, name):
        ctx = orig_step(self, name)
        enter, exit_ = type(ctx).__enter__, type(ctx).__exit__

        class _Cpu(type(ctx)):
            def __enter__(self):
                self.cpu0 = time.process_time()
                return enter(self)

            def __exit__(self, *exc):
                cpu[name] = round(time.process_time() - self.cpu0, 3)
                return exit_(self, *exc)

        ctx.__class__ = _Cpu
        return ctx

    timing.StepTimer.step = step

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = OptimizeConfig(sparsity=Sparsity.parse(args.sparsity), permutation=args.permutation,
                         criterion=args.criterion, precision=args.precision, calib=args.calib,
                         calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="pc-cost-"))
    try:
        t0 = time.perf_counter()
        prefetch = {"auto": None, "on": True, "off": False}[args.prefetch]
        result = optimize(model, tmp / "out", cfg, quiet=True, prefetch_export=prefetch)
        wall = time.perf_counter() - t0
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        timings = dict(result.report["timings"])
        checks = result.report.get("checks", [])
        row = {
            "model": model, "name": result.report.get("model"), "family": result.report.get("family"),
            "timings": timings, "cpu_seconds": cpu,
            "cpu_excl_load": round(sum(v for k, v in cpu.items() if k != "load"), 3),
            "total_excl_load": round(sum(v for k, v in timings.items() if k != "load"), 3),
            "wall_excl_load": round(wall - timings.get("load", 0.0), 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "checks_passed": all(c.get("passed") for c in checks), "n_checks": len(checks),
            "pruned_layers": len(result.report.get("pruned_layers", [])),
            "groups": len(result.report.get("groups", [])),
            "torch_threads": torch.get_num_threads(),
            "prefetched": bool(result.report.get("onnx", {}).get("prefetched")),
            "trace_child_cpu": round(child.ru_utime + child.ru_stime, 3),
            "export_stages": result.report.get("onnx", {}).get("stages", {}),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"],
                    help="short names or local Hugging Face folders")
    ap.add_argument("--permutation", default="hungarian")
    ap.add_argument("--criterion", default="wanda")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--calib", default=None, help="calibration path (default: the embedded sample)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the child (0: default)")
    ap.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                    help="trace the ONNX graph in a forked process during compression (auto: large models)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON/markdown results go")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one model, print JSON
    args = ap.parse_args()

    if args.child is not None:
        print("@@ROW " + json.dumps(run_one(args.child, args)), flush=True)
        return

    import torch

    env = {"cpu_count": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
           "threads_requested": args.threads or None, "cpu": _cpu_name(), "torch": torch.__version__,
           "python": platform.python_version(), "loadavg_start": _loadavg(), "git": git_state()}
    print(f"cpu_count={env['cpu_count']} torch_threads={env['torch_threads_default']} "
          f"loadavg(1,5,15 min) at start={env['loadavg_start']}", flush=True)

    rows = []
    for model in args.models:
        before = _loadavg()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model,
               "--permutation", args.permutation, "--criterion", args.criterion, "--sparsity", args.sparsity,
               "--precision", args.precision, "--calib-samples", str(args.calib_samples),
               "--calib-seq-len", str(args.calib_seq_len), "--seed", str(args.seed), "--threads", str(args.threads),
               "--prefetch", args.prefetch]
        if args.calib:
            cmd += ["--calib", args.calib]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("@@ROW ")]
        if proc.returncode != 0 or not lines:
            row = {"model": model, "error": (proc.stderr or proc.stdout).strip().splitlines()[-5:],
                   "returncode": proc.returncode}
        else:
            row = json.loads(lines[-1][len("@@ROW "):])
        row["process_seconds"] = round(time.perf_counter() - t0, 1)
        row["loadavg_before"], row["loadavg_after"] = before, _loadavg()
        print(json.dumps(row), flush=True)
        rows.append(row)

    # the target: SmolLM2, hungarian + Wanda, under 60 s excluding loading
    target = None
    for r in rows:
        if (r.get("name") == TARGET["model"] or r["model"] == TARGET["model"]) and "timings" in r \
                and args.permutation == TARGET["permutation"] and args.criterion == TARGET["criterion"]:
            stages = {k: r["timings"].get(k, 0.0) for k, _ in STAGES}
            dom = max(stages, key=stages.get)
            target = {"target_seconds": TARGET["seconds"], "total_excl_load": r["total_excl_load"],
                      "cpu_excl_load": r.get("cpu_excl_load"),
                      "wall_excl_load": r["wall_excl_load"], "met": r["wall_excl_load"] < TARGET["seconds"],
                      "dominant_stage": dom, "dominant_seconds": stages[dom],
                      "dominant_share": round(stages[dom] / max(r["total_excl_load"], 1e-9), 3)}

    out = {"permutation": args.permutation, "criterion": args.criterion, "sparsity": args.sparsity,
           "precision": args.precision, "calib": args.calib or "embedded default", "calib_samples": args.calib_samples,
           "calib_seq_len": args.calib_seq_len, "prefetch": args.prefetch, "env": env, "rows": rows, "target": target,
           "command": " ".join(["python", "benchmarks/pipeline_cost.py"] + sys.argv[1:]), "git": env["git"]}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline_cost_{args.permutation}_{args.criterion}{args.tag}"
    write_result(out_dir / f"{stem}.json", out)

    head = ["model"] + [t for _, t in STAGES] + ["total excl. load", "wall excl. load", "CPU s excl. load",
                                                  "trace child CPU s", "load", "peak RSS (MB)", "checks"]
    lines = [f"### optimize() cost per stage (seconds), {args.sparsity}, permutation {args.permutation}, "
             f"criterion {args.criterion}, precision {args.precision}, calibration {args.calib_samples}×"
             f"{args.calib_seq_len} tokens",
             "", f"Machine: {env['cpu']}, os.cpu_count()={env['cpu_count']}, torch threads "
             f"{args.threads or env['torch_threads_default']}, torch {env['torch']}; load average (1/5/15 min) at "
             f"start {env['loadavg_start']} (the machine is shared: figures include contention). Code: commit "
             f"{(env['git']['commit'] or '?')[:10]}"
             + (f" plus uncommitted changes to {', '.join(env['git']['modified'])}" if env['git']['modified'] else "")
             + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "timings" not in r:
            lines.append(f"| {r['model']} | failed: {' '.join(r['error'])[-200:]} |")
            continue
        t = r["timings"]
        cells = [r["model"]] + [_fmt(t.get(k)) for k, _ in STAGES] + [
            _fmt(r["total_excl_load"]), _fmt(r["wall_excl_load"]), _fmt(r.get("cpu_excl_load")),
            _fmt(r.get("trace_child_cpu")) if r.get("prefetched") else "— (traced in export)", _fmt(t.get("load")),
            f"{r['peak_rss_mb']:.0f}",
            f"{'pass' if r['checks_passed'] else 'FAIL'} ({r['n_checks']})"]
        lines.append("| " + " | ".join(cells) + " |")
    if any("cpu_seconds" in r for r in rows):
        lines += ["", "Process CPU seconds per stage (all threads; not inflated by waiting for a core):", "",
                  "| model | " + " | ".join(t for _, t in STAGES) + " |", "|" + "---|" * (len(STAGES) + 1)]
        for r in rows:
            if "cpu_seconds" in r:
                lines.append(f"| {r['model']} | " + " | ".join(_fmt(r["cpu_seconds"].get(k)) for k, _ in STAGES) + " |")
    if any(r.get("export_stages") for r in rows):
        keys = ["save_hf", "prefetch_wait", "prefetch_bind", "trace", "optimize", "serialize", "postprocess", "save",
                "triton"]
        lines += ["", "Inside the export column (seconds): hf/ checkpoint, waiting for the traced graph, binding the "
                  "weights (or tracing in-process), ONNX clean-up passes, serialisation, naming, writing, Triton:", "",
                  "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for r in rows:
            st = r.get("export_stages") or {}
            lines.append(f"| {r['model']} | " + " | ".join(_fmt(st.get(k)) for k in keys) + " |")
    lines.append("")
    lines.append("Load average before/after each model: " + "; ".join(
        f"{r['model']}: {r['loadavg_before']} → {r['loadavg_after']}" for r in rows))
    if target:
        lines += ["", f"Target (SmolLM2, hungarian + Wanda, < {target['target_seconds']:.0f} s excluding load): "
                  f"**{'met' if target['met'] else 'not met'}** — {target['wall_excl_load']:.1f} s wall "
                  f"({target['total_excl_load']:.1f} s in timed stages, {_fmt(target['cpu_excl_load'])} CPU s); "
                  f"dominant stage: {target['dominant_stage']} "
                  f"({target['dominant_seconds']:.1f} s, {100 * target['dominant_share']:.0f}% of the timed total)."]
    lines += ["", f"Command: `{out['command']}`"]
    write_result(out_dir / f"{stem}.md", "\n".join(lines) + "\n", out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
