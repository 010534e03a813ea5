"""Peak memory and wall time of ``permcompile optimize`` against model depth, at Llama-3.2-1B's block shape.

For each ``--layers`` value a random ``LlamaForCausalLM`` with the 1B block shape (hidden 2048, intermediate
8192, 32 heads / 8 kv heads, vocab 128256, tied embeddings) is written to disk in bf16 (safetensors, no
tokenizer: calibration uses byte-level ids), then ``python -m permcompile optimize FOLDER --out OUT
--permutation hungarian ...`` runs in a subprocess. The parent records its wall time, exit code, the
verification checks from ``report.json``, and its peak RSS two ways: polled with psutil every 0.2 s over
the process *and its children* (summed: the ONNX trace prefetch is a forked child), and the kernel's
``ru_maxrss`` of the largest single child (``getrusage(RUSAGE_CHILDREN)``, read from a fresh runner per
model). "fp32 weights" is 4 bytes × parameters, the yardstick of issue 18 (peak ≤ 1.5 × it).

What "flat per block" would look like: peak RSS grows by about one block's weights per layer, not by a
multiple of the whole model. The machine may be shared and slow: the script records the CPU, the thread
settings and the load average. On a 2-core machine set ``OMP_WAIT_POLICY=PASSIVE`` (an OpenMP pool that
spin-waits starves the other processes); the script passes the environment through and records it.

Example::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_scaling.py --layers 2 4
    python benchmarks/memory_scaling.py --layers 4 --device cuda --tag _gpu        # on a GPU machine

Writes ``benchmarks/results/memory_scaling<tag>.json`` and ``.md`` (with the commit and the command), or
under ``--out-dir``. Models and outputs go to a temporary folder that is deleted afterwards (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SHAPE_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 500000.0,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
# --tiny: the same code path on a toy shape (a logic check in seconds; its figures mean nothing)
SHAPE_TINY = dict(SHAPE_1B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, head_dim=16)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                     "MALLOC_MMAP_THRESHOLD_")}}
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def build_model(folder: Path, layers: int, dtype: str = "bfloat16", seed: int = 0, shape: dict = SHAPE_1B) -> int:
    """A random Llama with the 1B block shape and ``layers`` blocks, saved in ``dtype``; returns #params.

    Built directly in ``dtype`` (never a full fp32 copy), initialised N(0, 0.02) like HF's Llama init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **shape)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: around 1, not exactly 1 (a permutation mistake must show)
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_measured(cmd: list[str], log: Path, timeout: float | None) -> dict:
    """Run ``cmd``; wall time, exit code, peak RSS (psutil poll over the tree, and the kernel's ru_maxrss)."""
    import psutil

    runner = [sys.executable, "-c",
              "import resource, subprocess, sys, json\n"
              "rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT)\n"
              "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))",
              str(log)] + cmd
    start = time.perf_counter()
    proc = subprocess.Popen(runner, stdout=subprocess.PIPE, text=True)
    peak = 0
    timed_out = False
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps] + ps.children(recursive=True)
            rss = 0
            for p in tree[1:]:  # the runner itself is a small Python: count what it runs
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if timeout is not None and time.perf_counter() - start > timeout:
            for p in ps.children(recursive=True):
                try:
                    p.kill()
                except psutil.Error:
                    pass
            timed_out = True
        time.sleep(0.2)
    wall = time.perf_counter() - start
    out = proc.stdout.read().strip().splitlines()
    info = json.loads(out[-1]) if out else {"rc": proc.returncode, "maxrss_kb": None}
    return {"rc": info["rc"], "timed_out": timed_out, "wall_s": round(wall, 1),
            "peak_rss_bytes": peak, "peak_rss_gb_polled": round(peak / 2**30, 2),
            "peak_rss_gb_maxrss": round(info["maxrss_kb"] / 2**20, 2) if info.get("maxrss_kb") else None}


def one(layers: int, args, work: Path) -> dict:
    model_dir = work / f"llama1b_{layers}l"
    out_dir = work / f"out_{layers}l"
    t0 = time.perf_counter()
    params = build_model(model_dir, layers, args.dtype, shape=SHAPE_TINY if args.tiny else SHAPE_1B)
    build_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "permcompile", "optimize", str(model_dir), "--out", str(out_dir),
           "--permutation", args.permutation, "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", str(args.calib_seq_len), "--device", args.device, "--force"] + args.extra
    log = work / f"log_{layers}l.txt"
    row = {"layers": layers, "params_b": round(params / 1e9, 3), "fp32_weights_gb": round(4 * params / 2**30, 2),
           "disk_dtype": args.dtype, "build_s": round(build_s, 1),
           "command": " ".join(["python", "-m", "permcompile"] + cmd[3:])}
    try:
        row["load_before"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    row.update(run_measured(cmd, log, args.timeout))
    row["peak_over_fp32"] = round(row["peak_rss_bytes"] / (4 * params), 2)
    report = out_dir / "report.json"
    failed = out_dir.with_name(out_dir.name + ".failed") / "report.json"
    src = report if report.is_file() else failed if failed.is_file() else None
    if src is not None:
        rep = json.loads(src.read_text())
        checks = rep.get("checks", [])
        row["checks"] = f"{sum(c['passed'] for c in checks)}/{len(checks)}"
        row["failed_checks"] = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
        row["timings"] = rep.get("timings")
        row["step_peak_gib"] = rep.get("peak_memory_gib")
        row["precision"] = rep.get("precision")
        row["external_data"] = (rep.get("onnx") or {}).get("external_data")
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
    if row["rc"] != 0:
        row["log_tail"] = tail
    print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        for d in (out_dir, out_dir.with_name(out_dir.name + ".failed")):
            shutil.rmtree(d, ignore_errors=True)
    return row


def markdown(result: dict) -> str:
    what = "TOY SHAPE (--tiny): not a measurement" if result.get("tiny") else "Llama-3.2-1B block shape"
    lines = [f"# Peak memory vs depth, {what} ({result['machine']['cpu']}, "
             f"{result['machine']['cpu_count']} CPUs" + (f", GPU {result['machine']['gpu']}" if
                                                         result['machine'].get('gpu') else "") + ")", "",
             "| layers | params | fp32 weights | exit | checks | wall | peak RSS (tree, polled) | "
             "peak RSS (largest process) | peak / fp32 weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['layers']} | {r['params_b']:.3f} B | {r['fp32_weights_gb']:.2f} GiB | {r['rc']}"
                     f"{' (timeout)' if r.get('timed_out') else ''} | {r.get('checks', '-')} | {r['wall_s']:.0f} s | "
                     f"{r['peak_rss_gb_polled']:.2f} GiB | {r['peak_rss_gb_maxrss'] or '-'} GiB | "
                     f"{r['peak_over_fp32']:.2f} |")
    g = result["git"]
    lines += ["", f"Commit `{g['commit']}`" + (f" (modified: {', '.join(g['modified'])})" if g.get("modified") else ""),
              f"Command: `{result['command']}`",
              f"Environment: {json.dumps(result['machine']['env'])}; torch {result['machine'].get('torch')}",
              "Each row's optimize command: `" + (result["rows"][0]["command"] if result["rows"] else "") + "`"]
    for r in result["rows"]:
        if r.get("step_peak_gib"):
            top = max(r["step_peak_gib"], key=r["step_peak_gib"].get)
            lines.append(f"- {r['layers']} layers, peak RSS of the main process per step (GiB, sampled every 50 ms; "
                         f"highest in {top}): " + ", ".join(f"{k} {v:.2f}" for k, v in r["step_peak_gib"].items()))
    for r in result["rows"]:
        if r.get("failed_checks") or r.get("log_tail"):
            lines.append(f"- {r['layers']} layers: " + "; ".join(r.get("failed_checks") or r.get("log_tail") or []))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Peak RSS and fp32 weight bytes against depth (PNG); False when matplotlib is missing or no row ran."""
    rows = [r for r in result["rows"] if r.get("peak_rss_gb_polled")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    xs = [r["layers"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r["peak_rss_gb_polled"] for r in rows], "o-", label="peak RSS (process tree)")
    ax.plot(xs, [r["fp32_weights_gb"] for r in rows], "s--", label="fp32 weights")
    ax.plot(xs, [1.5 * r["fp32_weights_gb"] for r in rows], ":", label="1.5 x fp32 weights (issue 18 target)")
    ax.set_xlabel("decoder layers (Llama-3.2-1B block shape)")
    ax.set_ylabel("GiB")
    ax.set_xticks(xs)
    ax.legend(fontsize=7)
    ax.set_title(f"permcompile optimize, {result['git']['commit'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--permutation", default="hungarian")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per model (killed after)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more optimize options (last)")
    ap.add_argument("--work-dir", default=None, help="where models/outputs go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy shape: checks the script, not a measurement")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    command = " ".join(["python", "benchmarks/memory_scaling.py"] + (sys.argv[1:] if argv is None else argv))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="permcompile-memscale-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "git": git_state(), "machine": machine(),
              "shape": SHAPE_TINY if args.tiny else SHAPE_1B, "tiny": args.tiny, "rows": []}
    stem = f"memory_scaling{args.tag}"
    try:
        for layers in args.layers:
            result["rows"].append(one(layers, args, work))
            write_result(out_dir / f"{stem}.json", result)  # partial results survive
            write_result(out_dir / f"{stem}.md", markdown(result), result)
            plot(result, out_dir / f"{stem}.png")
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0 if all(r["rc"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
