"""Speed of FP8 and INT8 2:4 linears against dense on an NVIDIA GPU, on real model shapes (issue 25, item 7).

Per linear shape of SmolLM2-135M and Llama-3.2-1B (``sparse_speed.SHAPES``) and token count (1, 16, 2048), the
median time of ``y = x Wᵀ`` as
  * ``fp16 dense``: ``F.linear`` in fp16 (the unquantized deployment);
  * ``fp8 dense``: ``torch._scaled_mm`` on E4M3 operands, per-tensor scales, fp16 out (Ada/Hopper);
  * ``fp8 2:4``: cuSPARSELt, ``torch._cslt_sparse_mm`` on the compressed E4M3 weight, scale folded into alpha;
  * ``int8 dense``: ``torch._int_mm`` (int32 out);
  * ``int8 2:4``: cuSPARSELt on the compressed INT8 weight (int32 out where the build allows, else fp16);
with the weight pruned 2:4 along K and quantized per output channel as ``permcompile optimize --quantize`` does.
Token counts below a kernel's minimum (``_scaled_mm`` 16, ``_int_mm`` 17) are padded and say so. Timing: CUDA
graphs of back-to-back calls and CUDA events (``sparse_speed.time_graph``). A case this GPU or torch build cannot
run is recorded with its error instead of a time. The device is named in the result.

Without CUDA it prints ``skipped: no CUDA device``, writes ``{"skipped": true}`` and exits 0. ``--dry-run`` runs
the same cases on the CPU with tiny shapes and dense fp32 stand-ins for every kernel (the quantized codes are
built and checked): a logic check only, NOT speed figures.

    python benchmarks/quant_speed.py                    # on an H100 / H200
    python benchmarks/quant_speed.py --dry-run          # CPU: logic check only

Writes ``benchmarks/results/quant_speed<tag>.json`` (``quant_speed_dryrun<tag>.json`` for a dry run) and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402
from sparse_speed import DRY_SHAPES, SHAPES, _summary, backend_info, is_nm, pick_inner, prune_2of4  # noqa: E402
from sparse_speed import time_eager, time_graph  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = [1, 16, 2048]
CASES = ["fp16 dense", "fp8 dense", "fp8 2:4", "int8 dense", "int8 2:4"]


def _quantize(w: torch.Tensor, kind: str):
    """Per-row symmetric codes and scales of a 2:4 weight, as permcompile's quantize pass makes them."""
    from permcompile.math.quant import get_format, to_codes, weight_scales

    fmt = get_format(kind)
    scale = weight_scales(w.float(), fmt)
    codes = to_codes(w.float(), scale.reshape(-1, 1), fmt)
    if not is_nm(codes.float()):
        raise AssertionError("the codes lost the 2:4 pattern")
    return codes, scale


def _pad(t: int, minimum: int, multiple: int) -> int:
    t = max(t, minimum)
    return -(-t // multiple) * multiple


def make_case(case: str, w16: torch.Tensor, tokens: int, device, dry_run: bool):
    """``(fn, padded_tokens)``: a zero-argument callable computing the case's product on preallocated inputs."""
    out_f, k = w16.shape
    gen = torch.Generator(device=device).manual_seed(1)
    if case == "fp16 dense":
        x = torch.randn(tokens, k, device=device, generator=gen).to(w16.dtype)
        return (lambda: F.linear(x, w16)), tokens
    kind = case.split()[0]
    codes, scale = _quantize(w16, kind)
    codes, scale = codes.to(device), scale.to(device)
    sparse = case.endswith("2:4")
    if kind == "fp8":
        t = _pad(tokens, 16, 16)  # cuSPARSELt and _scaled_mm want multiples of 16
        x = torch.randn(t, k, device=device, generator=gen).clamp(-448, 448).to(torch.float8_e4m3fn)
        sa = torch.tensor(1.0, device=device)
        if dry_run:
            wd = codes.float() * scale.reshape(-1, 1)
            return (lambda: F.linear(x.float(), wd)), t
        if sparse:
            comp = torch._cslt_compress(codes)
            alpha = scale.float()  # per-row alpha where the build takes a vector; a scalar otherwise
            try:
                torch._cslt_sparse_mm(comp, x.t().contiguous(), alpha=alpha, out_dtype=torch.float16)
            except (RuntimeError, TypeError):
                alpha = scale.max().float()
            xt = x.t().contiguous()
            return (lambda: torch._cslt_sparse_mm(comp, xt, alpha=alpha, out_dtype=torch.float16)), t
        wt = codes.t()  # column-major second operand, as _scaled_mm wants
        sb = scale.reshape(1, -1).float()
        try:
            torch._scaled_mm(x, wt, scale_a=sa.reshape(1, 1).expand(t, 1).contiguous(), scale_b=sb,
                             out_dtype=torch.float16)
            sa_row = sa.reshape(1, 1).expand(t, 1).contiguous()
            return (lambda: torch._scaled_mm(x, wt, scale_a=sa_row, scale_b=sb, out_dtype=torch.float16)), t
        except RuntimeError:  # builds without row-wise scaling: per-tensor scales
            sbt = scale.max().float()
            return (lambda: torch._scaled_mm(x, wt, scale_a=sa, scale_b=sbt, out_dtype=torch.float16)), t
    # int8
    t = _pad(tokens, 16, 16) if sparse else _pad(tokens, 17, 8)
    x = torch.randint(-127, 128, (t, k), device=device, generator=gen, dtype=torch.int8)
    if dry_run:
        wd = codes.float()
        return (lambda: F.linear(x.float(), wd)), t
    if sparse:
        comp = torch._cslt_compress(codes)
        xt = x.t().contiguous()
        for out_dtype in (torch.int32, torch.float16, torch.int8):
            try:
                torch._cslt_sparse_mm(comp, xt, out_dtype=out_dtype)
                return (lambda: torch._cslt_sparse_mm(comp, xt, out_dtype=out_dtype)), t
            except (RuntimeError, TypeError):
                continue
        raise RuntimeError("cuSPARSELt took no output type for INT8 here")
    wt = codes.t()
    return (lambda: torch._int_mm(x, wt)), t


def bench(args, device, dry_run: bool) -> list[dict]:
    shapes = DRY_SHAPES if dry_run else [s for s in SHAPES if s[0] in args.models]
    rows = []
    for model, layers, (out_f, in_f) in shapes:
        w16 = prune_2of4(torch.randn(out_f, in_f, device=device) * 0.02).to(torch.float16 if not dry_run
                                                                                else torch.float32)
        for tokens in args.tokens:
            row = {"model": model, "layers": layers, "out": out_f, "in": in_f, "tokens": tokens}
            for case in CASES:
                try:
                    fn, t = make_case(case, w16, tokens, device, dry_run)
                    fn()
                    inner = pick_inner(fn, device, args.target_ms, args.max_inner)
                    timer = time_graph if device.type == "cuda" else time_eager
                    s = _summary(timer(fn, device, args.warmup, args.repeats, inner))
                    row[case] = {"median_ms": s["median_ms"], "padded_tokens": t if t != tokens else None}
                except Exception as exc:  # noqa: BLE001 - a case this GPU/torch cannot run is a result too
                    row[case] = {"error": " ".join(str(exc).split())[:200]}
            for num, den in (("fp8 dense", "fp8 2:4"), ("fp16 dense", "fp8 2:4"), ("int8 dense", "int8 2:4"),
                             ("fp16 dense", "int8 2:4")):
                a, b = row[num].get("median_ms"), row[den].get("median_ms")
                row[f"speedup {den} vs {num}"] = a / b if a and b else None
            rows.append(row)
            print(f"{model} {layers} {out_f}x{in_f} t={tokens}: " + ", ".join(
                f"{c} {row[c]['median_ms']:.4f} ms" if "median_ms" in row[c] else f"{c} n/a" for c in CASES),
                flush=True)
    return rows


def markdown(out: dict) -> str:
    dry = out["dry_run"]
    env = out["env"]
    lines = [f"# FP8 / INT8 2:4 vs dense linears on {env.get('device')}" + (" (DRY RUN: NOT speed figures)" if dry
                                                                            else ""), "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda_version')}, cuSPARSELt "
             f"{env.get('cusparselt_version')}; median ms per call (CUDA graphs); speed-up = dense / 2:4", "",
             "| model | layers | out×in | tokens | " + " | ".join(CASES)
             + " | fp8 2:4 vs fp8 dense | fp8 2:4 vs fp16 | int8 2:4 vs int8 dense |",
             "|---" * (len(CASES) + 7) + "|"]
    for r in out["rows"]:
        cells = [f"{r[c]['median_ms']:.4f}" + ("*" if r[c].get("padded_tokens") else "") if "median_ms" in r[c]
                 else "n/a" for c in CASES]
        sp = [r.get(k) for k in ("speedup fp8 2:4 vs fp8 dense", "speedup fp8 2:4 vs fp16 dense",
                                 "speedup int8 2:4 vs int8 dense")]
        lines.append(f"| {r['model']} | {r['layers']} | {r['out']}×{r['in']} | {r['tokens']} | " + " | ".join(cells)
                     + " | " + " | ".join(f"{x:.2f}x" if x else "-" for x in sp) + " |")
    errors = sorted({f"{c}: {r[c]['error']}" for r in out["rows"] for c in CASES if "error" in r[c]})
    lines += ["", "\\* tokens padded to the kernel's minimum."] + [f"- n/a {e}" for e in errors[:10]]
    return "\n".join(lines + [""] + provenance_lines(out)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, dense stand-ins: logic check only")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-3.2-1b"],
                    choices=sorted({s[0] for s in SHAPES}))
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--target-ms", type=float, default=1.0)
    ap.add_argument("--max-inner", type=int, default=50)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quant_speed{'_dryrun' if args.dry_run else ''}{args.tag}"
    out = {"dry_run": args.dry_run, "env": backend_info(args.dry_run), "command": command_line("quant_speed.py", argv),
           "git": git_state(), "skipped": False, "rows": []}
    if not args.dry_run and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        out["skipped"] = True
        write_result(out_dir / f"{stem}.json", out)
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        args.repeats, args.warmup, args.max_inner = min(args.repeats, 3), 1, 2
        args.tokens = [t for t in args.tokens if t <= 64] or [1, 16]
    out["rows"] = bench(args, device, args.dry_run)
    write_result(out_dir / f"{stem}.json", out)
    write_result(out_dir / f"{stem}.md", markdown(out), provenance=out)
    ok = [r for r in out["rows"] if all("median_ms" in r[c] for c in CASES)]
    print(f"wrote {out_dir / stem}.json ({len(ok)}/{len(out['rows'])} rows with every case)")
    # a dry run must exercise every case; on a GPU a case the build cannot run is a recorded result
    return 0 if out["rows"] and (not args.dry_run or len(ok) == len(out["rows"])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
