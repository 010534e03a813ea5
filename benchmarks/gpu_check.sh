#!/usr/bin/env bash
# One prepared GPU session (under 10 minutes in all): what issue 18 asks to measure whenever a GPU is lent.
#
#   1. dense vs 2:4 matmul speed (torch.sparse.to_sparse_semi_structured: cuSPARSELt or CUTLASS) on the real
#      linear shapes of SmolLM2-135M and Llama-3.2-1B at 1, 16 and 2048 tokens in fp16 (benchmarks/sparse_speed.py)
#   2. `permcompile optimize smollm2 --device cuda --permutation hungarian`: wall time, peak RSS, checks
#   3. `optimize smollm2 --device cuda --permutation learned --update none`: the end-to-end search's GPU time
#   4. a random model with Llama-3.2-1B's block shape (GPU_CHECK_LAYERS layers, default 4, bf16 on disk) through
#      `optimize --device cuda --permutation hungarian` (benchmarks/memory_scaling.py): wall time, peak RSS, checks
#   5. FP8 and INT8 2:4 vs dense (cuSPARSELt; torch._scaled_mm / _int_mm dense) on the real linear shapes of
#      SmolLM2-135M and Llama-3.2-1B at 1, 16 and 2048 tokens (benchmarks/quant_speed.py, issue 25)
#
# Results (device name, git commit, commands) go to $OUT/gpu_check/ when $OUT is set (the device runner brings
# that folder back), else benchmarks/results/gpu_check/: summary.md, env.json, steps.jsonl, each step's log
# and JSON. Without a CUDA device it prints one line and exits 0. Each step has its own time limit
# (GPU_CHECK_LIMIT_SPEED / _SMOLLM2 / _LEARNED / _1B / _QUANT seconds); a step that fails or runs out of time is
# recorded and the next one still runs. The script's exit status is 0 when every step passed, 1 otherwise.
# The default limits add up to 540 s (565 s with each step's 5 s kill grace): one device call allows 600 s.
#
#   bash benchmarks/gpu_check.sh
#   PERMCOMPILE_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh   # where the copy has no .git
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # CPU, toy sizes: checks this script, measures nothing
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT" || exit 1
PY="${PYTHON:-python}"

DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing measured"
  exit 0
fi

DEST="${OUT:-$HERE/results}/gpu_check"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/permcompile-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"
: > "$DEST/steps.jsonl"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo "${PERMCOMPILE_COMMIT:-unknown}")"
export PERMCOMPILE_COMMIT="$COMMIT"
LAYERS="${GPU_CHECK_LAYERS:-4}"
START_ALL=$(date +%s)
DEVICE=cuda SPEED_DRY=() TINY=() SMOL=smollm2
if [ "$DRY" = 1 ]; then  # the same steps on the CPU at toy sizes
  DEVICE=cpu SPEED_DRY=(--dry-run) TINY=(--tiny --calib-samples 2 --calib-seq-len 16) SMOL="$WORK/tiny_llama"
  "$PY" -c "import sys; from permcompile.testing import save_tiny; save_tiny('llama', sys.argv[1])" "$SMOL"
fi

"$PY" - "$DEST/env.json" "$COMMIT" <<'EOF'
import json, os, platform, subprocess, sys
import torch
cuda = torch.cuda.is_available()
info = {"commit": sys.argv[2], "device": torch.cuda.get_device_name(0) if cuda else "cpu (DRY RUN: not measurements)",
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cusparselt": bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception as exc:  # noqa: BLE001
    info["nvidia_smi"] = f"unavailable: {exc}"
try:
    import permcompile  # noqa: F401
    info["permcompile_import"] = "ok"
except Exception as exc:  # noqa: BLE001
    info["permcompile_import"] = f"{type(exc).__name__}: {exc}"
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(f"gpu_check: {info['device']} (torch {info['torch']}, CUDA {info['cuda']}), commit {info['commit']}")
EOF

FAILED=0
# step NAME LIMIT_SECONDS CMD...: runs CMD with a time limit; records rc, wall time and (with GNU time) peak RSS
step() {
  local name="$1" limit="$2"; shift 2
  local start end rc rss=null
  echo "gpu_check: $name (limit ${limit}s): $*"
  start=$(date +%s.%N)
  if [ -x /usr/bin/time ]; then
    timeout --kill-after=5 "$limit" /usr/bin/time -v -o "$DEST/$name.time" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$DEST/$name.time" 2>/dev/null)
    [ -n "$rss" ] || rss=null
  else
    timeout --kill-after=5 "$limit" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
  fi
  end=$(date +%s.%N)
  [ "$rc" -eq 0 ] || FAILED=1
  "$PY" - "$DEST/steps.jsonl" "$name" "$rc" "$start" "$end" "$rss" "$limit" "$*" <<'EOF'
import json, sys
path, name, rc, start, end, rss, limit, cmd = sys.argv[1:]
row = {"step": name, "rc": int(rc), "timed_out": int(rc) in (124, 137), "wall_s": round(float(end) - float(start), 1),
       "peak_rss_gb": None if rss == "null" else float(rss), "limit_s": int(limit), "command": cmd}
open(path, "a").write(json.dumps(row) + "\n")
print(f"gpu_check:   rc {rc}, {row['wall_s']} s" + (f", peak RSS {rss} GiB" if rss != "null" else ""))
EOF
}

# 1. dense vs 2:4 on the real shapes
step sparse_speed "${GPU_CHECK_LIMIT_SPEED:-100}" "$PY" benchmarks/sparse_speed.py --dtypes fp16 --tokens 1 16 2048 \
  --models smollm2-135m llama-3.2-1b --out-dir "$DEST" --tag _gpu_check "${SPEED_DRY[@]}"

# 2. SmolLM2-135M end to end on --device cuda (artifacts in a temporary folder; report.json kept)
step optimize_smollm2 "${GPU_CHECK_LIMIT_SMOLLM2:-130}" "$PY" -m permcompile optimize "$SMOL" --out "$WORK/smollm2" \
  --device "$DEVICE" --permutation hungarian --force
for d in "$WORK/smollm2" "$WORK/smollm2.failed"; do
  [ -f "$d/report.json" ] && cp "$d/report.json" "$DEST/optimize_smollm2_report.json"
done

# 3. the end-to-end permutation search (`learned`, issue 21) on SmolLM2, masks only (where it pays): its time on a GPU
step learned_smollm2 "${GPU_CHECK_LIMIT_LEARNED:-90}" "$PY" -m permcompile optimize "$SMOL" --out "$WORK/smollm2_learned" \
  --device "$DEVICE" --permutation learned --update none --force
for d in "$WORK/smollm2_learned" "$WORK/smollm2_learned.failed"; do
  [ -f "$d/report.json" ] && cp "$d/report.json" "$DEST/learned_smollm2_report.json"
done

# 4. Llama-3.2-1B block shape, random weights, bf16 on disk, on --device cuda
step "optimize_llama1b_${LAYERS}l" "${GPU_CHECK_LIMIT_1B:-160}" "$PY" benchmarks/memory_scaling.py --layers "$LAYERS" \
  --device "$DEVICE" --work-dir "$WORK/memscale" --out-dir "$DEST" --tag _gpu_check "${TINY[@]}"

# 5. FP8 / INT8 2:4 vs dense on the real shapes (the quantized deployment of --quantize)
step quant_speed "${GPU_CHECK_LIMIT_QUANT:-60}" "$PY" benchmarks/quant_speed.py --out-dir "$DEST" --tag _gpu_check \
  "${SPEED_DRY[@]}"

"$PY" - "$DEST" "$(( $(date +%s) - START_ALL ))" <<'EOF'
import json, sys
from pathlib import Path
dest, total = Path(sys.argv[1]), sys.argv[2]
env = json.loads((dest / "env.json").read_text())
steps = [json.loads(line) for line in (dest / "steps.jsonl").read_text().splitlines() if line.strip()]
lines = [f"# GPU check on {env['device']} ({env['memory_gb']} GiB, capability {env['capability']})", "",
         f"Commit `{env['commit']}`; torch {env['torch']}, CUDA {env['cuda']}; cuSPARSELt {env['cusparselt']}; "
         f"{env['cpu_count']} CPUs; total {total} s. Command: `bash benchmarks/gpu_check.sh`", "",
         "| step | exit | wall | peak RSS | command |", "|---|---|---|---|---|"]
for s in steps:
    rss = f"{s['peak_rss_gb']:.2f} GiB" if s["peak_rss_gb"] is not None else "-"
    lines.append(f"| {s['step']} | {s['rc']}{' (time limit)' if s['timed_out'] else ''} | {s['wall_s']:.0f} s | {rss} "
                 f"| `{s['command']}` |")
for label, name in (("SmolLM2", "optimize_smollm2_report.json"), ("SmolLM2 learned", "learned_smollm2_report.json")):
    rep = dest / name
    if rep.is_file():
        r = json.loads(rep.read_text())
        checks = r.get("checks", [])
        lines += ["", f"{label}: {sum(c['passed'] for c in checks)}/{len(checks)} checks; stage seconds "
                  + json.dumps(r.get("timings", {}))]
for name in ("memory_scaling_gpu_check.md", "sparse_speed_gpu_check.md", "sparse_speed_dryrun_gpu_check.md",
             "quant_speed_gpu_check.md", "quant_speed_dryrun_gpu_check.md"):
    f = dest / name
    if f.is_file():
        lines += [""] + [("#" + ln if ln.startswith("#") else ln) for ln in f.read_text().splitlines()]
(dest / "summary.md").write_text("\n".join(lines) + "\n")
print(f"gpu_check: wrote {dest / 'summary.md'}")
EOF
exit $FAILED
