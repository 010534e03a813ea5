"""Speed of 2:4 semi-structured sparse linears vs dense on an NVIDIA GPU (sparse tensor cores via torch).

Part 1, per linear shape: dense ``F.linear(x, W)`` against ``F.linear(x, to_sparse_semi_structured(W))`` for every
linear shape of SmolLM2-135M (q/o 576→576, k/v 576→192, gate/up 576→1536, down 1536→576), of Llama-3.2-1B
(2048×2048, 512×2048, 8192×2048, 2048×8192) and of a 7B-class Llama (4096×4096, 11008×4096, 4096×11008 as
[out, in]; ``--models`` picks some), at several token counts, in fp16 and bf16. ``W`` is a
random weight pruned 2:4 along its input (K) axis by magnitude; the dense baseline multiplies by the same pruned
weight stored densely. Each figure is the median over ``--repeats`` samples timed with CUDA events after a
warm-up; every sample replays a CUDA graph holding ``inner`` back-to-back calls (inputs, weights and outputs
allocated before the timed region; Python dispatch overhead excluded), and, for reference, the same calls issued
eagerly (what an un-compiled PyTorch program pays: the semi-structured tensor subclass dispatches in Python).
The physical limit of the speed-up is 2× (half the multiply-adds); NVIDIA reports 1.1×–1.6× in practice, and
none for small layers.

Part 2 (``--hf FOLDER``, the ``hf/`` folder written by ``permcompile optimize ... --out X``): the whole model in
fp16, dense, then with every linear whose weight is 2:4 along K swapped to a semi-structured tensor (others stay
dense); tokens/s of a forward pass of ``batch × seq`` tokens, and the largest logit difference.

Without a CUDA device the script prints ``skipped: no CUDA device``, writes ``{"skipped": true, ...}`` and exits 0.
``--dry-run`` runs the same code on the CPU with tiny shapes and a dense matmul standing in for the sparse
kernel: it checks shapes and logic only; its numbers are NOT speed figures. Examples::

    python benchmarks/sparse_speed.py                                   # on an H100 / A100
    python benchmarks/sparse_speed.py --hf out/smollm2/hf               # plus the whole-model figure
    python benchmarks/sparse_speed.py --dry-run                         # CPU: logic check only

Writes ``benchmarks/results/sparse_speed<tag>.json`` (``sparse_speed_dryrun<tag>.json`` for a dry run) and a
markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (model, layers, [out, in])
SHAPES = [
    ("smollm2-135m", "q_proj, o_proj", (576, 576)),
    ("smollm2-135m", "k_proj, v_proj", (192, 576)),
    ("smollm2-135m", "gate_proj, up_proj", (1536, 576)),
    ("smollm2-135m", "down_proj", (576, 1536)),
    ("llama-3.2-1b", "q_proj, o_proj", (2048, 2048)),
    ("llama-3.2-1b", "k_proj, v_proj", (512, 2048)),
    ("llama-3.2-1b", "gate_proj, up_proj", (8192, 2048)),
    ("llama-3.2-1b", "down_proj", (2048, 8192)),
    ("7b-class", "q/k/v/o_proj", (4096, 4096)),
    ("7b-class", "gate_proj, up_proj", (11008, 4096)),
    ("7b-class", "down_proj", (4096, 11008)),
]
TOKENS = [128, 512, 2048, 8192, 16384]
# --dry-run: same roles, tiny sizes (multiples of 64 so they would also satisfy the CUDA layout constraints)
DRY_SHAPES = [("dry-tiny", "attn", (64, 64)), ("dry-tiny", "kv", (32, 64)), ("dry-tiny", "mlp-up", (128, 64)),
              ("dry-tiny", "mlp-down", (64, 128))]
DRY_TOKENS = [8, 32]


# ------------------------------------------------------------------------------------------------ 2:4 helpers
def prune_2of4(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive ones along the last (K) axis."""
    out_f, in_f = w.shape
    if in_f % m:
        raise ValueError(f"K={in_f} is not a multiple of {m}")
    groups = w.reshape(out_f, in_f // m, m)
    keep = groups.abs().float().topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out_f, in_f)


def is_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive weights along K holds at most ``n`` non-zeros (and some zero)."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    return bool((nz <= n).all()) and bool((w == 0).any())


def backend_info(dry_run: bool) -> dict:
    cuda = torch.cuda.is_available()
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda_available": cuda,
            "cuda_version": torch.version.cuda, "device": None, "capability": None,
            "cusparselt_available": False, "cusparselt_version": None, "backend": None}
    try:
        import torch.backends.cusparselt as csl

        info["cusparselt_available"] = bool(csl.is_available())
        info["cusparselt_version"] = csl.version() if info["cusparselt_available"] else None
    except Exception as exc:  # very old torch
        info["cusparselt_error"] = str(exc)
    if cuda and not dry_run:
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    if dry_run:
        info["backend"] = "dense-emulation (dry run: NOT a sparse kernel)"
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def choose_backend(pref: str) -> str:
    """'cusparselt' or 'cutlass' (torch's two semi-structured backends)."""
    from torch.sparse import SparseSemiStructuredTensor

    avail = torch.backends.cusparselt.is_available()
    name = {"auto": "cusparselt" if avail else "cutlass"}.get(pref, pref)
    if name == "cusparselt" and not avail:
        raise SystemExit("--backend cusparselt: torch reports no cuSPARSELt in this build")
    SparseSemiStructuredTensor._FORCE_CUTLASS = name == "cutlass"
    return name


def layout_check(dtypes: list[str]) -> list[dict]:
    """Static check (no device needed): does each real [out, in] shape meet each backend's layout constraints?"""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    rows = []
    for model, layers, (out_f, in_f) in SHAPES:
        for name in dtypes:
            dt = DTYPES[name]
            row = {"model": model, "layers": layers, "out": out_f, "in": in_f, "dtype": name}
            for backend, cls in (("cusparselt", SparseSemiStructuredTensorCUSPARSELT),
                                 ("cutlass", SparseSemiStructuredTensorCUTLASS)):
                c = cls._DTYPE_SHAPE_CONSTRAINTS.get(dt)
                row[backend] = bool(c) and out_f >= c.sparse_min_rows and out_f % c.sparse_min_rows == 0 \
                    and in_f >= c.sparse_min_cols and in_f % c.sparse_min_cols == 0
            rows.append(row)
    return rows


def make_sparse(w: torch.Tensor, dry_run: bool):
    """A 2:4-pruned 2-D weight → the operand used in place of the dense weight."""
    if dry_run:
        # stand-in: same values stored densely (exercises shapes and swapping, not the kernel)
        if not is_nm(w):
            raise ValueError("weight is not 2:4 along K")
        return w.clone()
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w.contiguous())


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(fn, device, warmup: int, repeats: int, inner: int) -> list[float]:
    """Per-call milliseconds of ``fn`` issued eagerly, ``inner`` calls per sample, one sample per event pair."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            for _ in range(inner):
                fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / inner for s, e in zip(starts, ends)]
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t) * 1e3 / inner)
    return out


def time_graph(fn, device, warmup: int, repeats: int, inner: int) -> list[float]:
    """Per-call milliseconds from a CUDA graph of ``inner`` calls (outputs live in the graph's pool)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
        for _ in range(max(3, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) / inner for s, e in zip(starts, ends)]
    del graph
    return times


def pick_inner(fn, device, target_ms: float, max_inner: int) -> int:
    """Calls per sample so that one sample lasts about ``target_ms`` (amortises event/launch granularity)."""
    est = statistics.median(time_eager(fn, device, warmup=2, repeats=5, inner=1))
    return int(max(1, min(max_inner, math.ceil(target_ms / max(est, 1e-4)))))


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "p90_ms": sorted(times)[min(len(times) - 1, int(0.9 * len(times)))], "n": len(times)}


# ------------------------------------------------------------------------------------------------ part 1
def bench_shapes(args, device, dry_run: bool) -> list[dict]:
    shapes = DRY_SHAPES if dry_run else [s for s in SHAPES if not args.models or s[0] in args.models]
    tokens_list = args.tokens or (DRY_TOKENS if dry_run else TOKENS)
    modes = ["eager"] if device.type != "cuda" else (["graph", "eager"] if not args.no_graph else ["eager"])
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)  # inputs made on the device (fast), before any timing
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for model, layers, (out_f, in_f) in shapes:
            w = prune_2of4(torch.randn(out_f, in_f, generator=gen, device=device) / math.sqrt(in_f)).to(dtype)
            try:
                ws = make_sparse(w, dry_run)
            except Exception as exc:
                for tokens in tokens_list:
                    rows.append({"model": model, "layers": layers, "out": out_f, "in": in_f, "tokens": tokens,
                                 "dtype": dtype_name, "error": f"to_sparse_semi_structured: {exc}"})
                print(f"  {model} {layers} [{out_f}x{in_f}] {dtype_name}: cannot convert ({exc})", flush=True)
                continue
            for tokens in tokens_list:
                row = {"model": model, "layers": layers, "out": out_f, "in": in_f, "tokens": tokens,
                       "dtype": dtype_name, "flops": 2 * tokens * out_f * in_f}
                x = torch.randn(tokens, in_f, generator=gen, device=device).to(dtype)
                try:
                    with torch.inference_mode():
                        y_dense = F.linear(x, w)
                        y_sparse = F.linear(x, ws)
                        if tuple(y_sparse.shape) != (tokens, out_f):
                            raise RuntimeError(f"sparse output shape {tuple(y_sparse.shape)} != {(tokens, out_f)}")
                        row["max_rel_err"] = float((y_sparse.float() - y_dense.float()).abs().max()
                                                   / y_dense.float().abs().max().clamp_min(1e-12))
                        del y_dense, y_sparse

                        def dense_fn(x=x, w=w):  # bound now: the names are deleted after the loop body
                            return F.linear(x, w)

                        def sparse_fn(x=x, ws=ws):
                            return F.linear(x, ws)

                        inner = pick_inner(dense_fn, device, args.target_ms, args.max_inner)
                        row["inner"] = inner
                        for mode in modes:
                            timer = time_graph if mode == "graph" else time_eager
                            try:
                                d = _summary(timer(dense_fn, device, args.warmup, args.repeats, inner))
                                s = _summary(timer(sparse_fn, device, args.warmup, args.repeats, inner))
                            except Exception as exc:  # e.g. a kernel that cannot be captured in a graph
                                row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"
                                continue
                            row[mode] = {"dense": d, "sparse": s, "speedup": d["median_ms"] / s["median_ms"],
                                         # dense-equivalent TFLOP/s: a sanity check against the GPU's peak
                                         "dense_tflops": row["flops"] / d["median_ms"] / 1e9,
                                         "sparse_tflops_dense_equiv": row["flops"] / s["median_ms"] / 1e9}
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    del x
                rows.append(row)
                print(json.dumps(row), flush=True)
            del w, ws
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ part 2
def _tiny_pruned_llama():
    """Dry run without --hf: a tiny random Llama with its decoder linears pruned 2:4 (as permcompile would)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(prune_2of4(mod.weight))
    return model, {"input_ids"}, {"use_cache": False}, "tiny random Llama (dry run)"


def _load_hf(folder: str):
    from permcompile.models import load_model

    loaded = load_model(folder)
    names = set(loaded.example_inputs(batch=1, seq=4))
    return loaded.model, names, loaded.forward_kwargs(), f"{loaded.name} ({loaded.family}) from {folder}"


def swap_to_sparse(model: torch.nn.Module, dry_run: bool) -> tuple[list[str], list[dict]]:
    """Replace the weight of every nn.Linear that is 2:4 along K by a semi-structured tensor (in place)."""
    shared = set()
    for mod in model.modules():  # weights also used elsewhere (tied embeddings) must stay dense
        if not isinstance(mod, torch.nn.Linear):
            shared.update(id(p) for p in mod.parameters(recurse=False))
    swapped, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight
        if id(w) in shared:
            skipped.append({"module": name, "reason": "weight shared with a non-linear module (tied)"})
            continue
        if not is_nm(w.data):
            skipped.append({"module": name, "reason": "not 2:4 along K (dense layer)"})
            continue
        try:
            mod.weight = torch.nn.Parameter(make_sparse(w.data, dry_run), requires_grad=False)
            swapped.append(name)
        except Exception as exc:
            skipped.append({"module": name, "reason": f"conversion failed: {type(exc).__name__}: {exc}"})
    return swapped, skipped


def bench_model(args, device, dry_run: bool) -> dict | None:
    if args.hf is None and not dry_run:
        return None
    model, input_names, fwd_kwargs, what = _load_hf(args.hf) if args.hf else _tiny_pruned_llama()
    dtype = DTYPES[args.model_dtype if not dry_run else "fp32"]
    model = model.to(device=device, dtype=dtype).eval()
    vocab = int(getattr(model.config, "vocab_size", 2))
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.model_shapes if not dry_run else ["2x16"])]
    from permcompile.modelio import main_output as out_of
    from permcompile.modelio import random_inputs

    gen = torch.Generator(device="cpu").manual_seed(0)
    names = ["input_ids"] + [n for n in ("attention_mask", "token_type_ids") if n in input_names]
    batches = [{k: v.to(device) for k, v in random_inputs(names, model.config, b, s, gen, vocab_size=vocab).items()}
               for b, s in shapes]

    result = {"model": what, "dtype": str(dtype).replace("torch.", ""), "points": []}
    with torch.inference_mode():
        refs, dense_t = [], []
        for inputs in batches:
            refs.append(out_of(model(**inputs, **fwd_kwargs)))  # kept in the model dtype: 32×512 fp16 logits = 1.6 GB
            fn = lambda inputs=inputs, model=model: model(**inputs, **fwd_kwargs)  # noqa: E731
            dense_t.append(_summary(time_eager(fn, device, args.warmup, args.model_repeats, 1)))
    with torch.no_grad():  # ordinary (not inference-mode) parameters
        swapped, skipped = swap_to_sparse(model, dry_run)
    result["swapped"], result["kept_dense"] = swapped, skipped
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    print(f"  swapped {len(swapped)}/{n_linear} linears to semi-structured"
          + (" (dry run: dense stand-in)" if dry_run else ""), flush=True)
    with torch.inference_mode():
        for (b, s), inputs, ref, d in zip(shapes, batches, refs, dense_t):
            y = out_of(model(**inputs, **fwd_kwargs))
            diff = max(float((y[i].float() - ref[i].float()).abs().max()) for i in range(y.shape[0]))
            err = diff / max(max(float(ref[i].float().abs().max()) for i in range(ref.shape[0])), 1e-12)
            del y
            fn = lambda inputs=inputs, model=model: model(**inputs, **fwd_kwargs)  # noqa: E731
            sp = _summary(time_eager(fn, device, args.warmup, args.model_repeats, 1))
            toks = b * s
            point = {"batch": b, "seq": s, "tokens": toks, "dense": d, "sparse": sp,
                     "dense_tokens_per_s": toks / (d["median_ms"] / 1e3),
                     "sparse_tokens_per_s": toks / (sp["median_ms"] / 1e3),
                     "speedup": d["median_ms"] / sp["median_ms"], "max_rel_logit_diff": err}
            result["points"].append(point)
            print(json.dumps(point), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ report
def markdown(out: dict) -> str:
    dry = out["dry_run"]
    env = out["env"]
    title = "2:4 semi-structured vs dense linear" + (" — DRY RUN on CPU (dense stand-in; NOT speed figures)"
                                                     if dry else "")
    lines = [f"### {title}", "",
             f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda_version']}, cuSPARSELt "
             + (f"available (version {env['cusparselt_version']})" if env['cusparselt_available'] else "not available")
             + f"; backend: {env['backend']}. Median of {out['repeats']} samples after {out['warmup']} warm-up calls.",
             ""]
    if out.get("skipped"):
        return "\n".join(lines + [f"skipped: {out['reason']}", ""] + provenance_lines(out)) + "\n"
    lines += ["| model | layers | [out, in] | tokens | dtype | dense ms | sparse ms | speed-up (graph) | "
              "speed-up (eager) | max rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["shapes"]:
        head = f"| {r['model']} | {r['layers']} | {r['out']}×{r['in']} | {r['tokens']} | {r['dtype']} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'][:120]} | | | | |")
            continue
        main = r.get("graph") or r.get("eager")
        g = f"{r['graph']['speedup']:.2f}×" if "graph" in r else "—"
        e = f"{r['eager']['speedup']:.2f}×" if "eager" in r else "—"
        lines.append(head + f" {main['dense']['median_ms']:.4f} | {main['sparse']['median_ms']:.4f} | {g} | {e} | "
                     f"{r.get('max_rel_err', float('nan')):.1e} |")
    m = out.get("model_forward")
    if out.get("model_forward_error"):
        lines += ["", f"Whole-model forward failed: {out['model_forward_error'][:300]}"]
    if m:
        lines += ["", f"Whole-model forward: {m['model']}, {m['dtype']}; {len(m['swapped'])} linears semi-structured, "
                  f"{len(m['kept_dense'])} dense.", "",
                  "| batch × seq | dense tokens/s | sparse tokens/s | speed-up | max rel logit diff |",
                  "|---|---|---|---|---|"]
        for p in m["points"]:
            lines.append(f"| {p['batch']}×{p['seq']} | {p['dense_tokens_per_s']:.0f} | "
                         f"{p['sparse_tokens_per_s']:.0f} | {p['speedup']:.2f}× | {p['max_rel_logit_diff']:.1e} |")
    if dry:
        lines += ["", "Dry run: the 'sparse' operand is the pruned weight stored densely; figures only prove the code "
                  "path runs."]
    lines += [""] + provenance_lines(out)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, dense stand-in: logic check only")
    ap.add_argument("--hf", default=None, help="hf/ folder written by `permcompile optimize ... --out X`")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--models", nargs="+", default=None, choices=sorted({s[0] for s in SHAPES}),
                    help="only these models' linear shapes (default: all)")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help=f"token counts (default {TOKENS})")
    ap.add_argument("--backend", default="auto", choices=["auto", "cusparselt", "cutlass"])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50, help="timed samples per figure (median reported)")
    ap.add_argument("--target-ms", type=float, default=1.0, help="aim for samples at least this long")
    ap.add_argument("--max-inner", type=int, default=50, help="most calls per timed sample")
    ap.add_argument("--no-graph", action="store_true", help="eager timing only (no CUDA graphs)")
    ap.add_argument("--model-shapes", nargs="+", default=["1x128", "8x512", "32x512"], help="BATCHxSEQ")
    ap.add_argument("--model-dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--model-repeats", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.repeats < 20 or args.model_repeats < 20:
        if not args.dry_run:
            ap.error("--repeats and --model-repeats must be >= 20")
    command = command_line("sparse_speed.py", argv)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sparse_speed{'_dryrun' if args.dry_run else ''}{args.tag}"
    env = backend_info(args.dry_run)
    out = {"dry_run": args.dry_run, "env": env, "warmup": args.warmup, "repeats": args.repeats,
           "command": command, "git": git_state(), "skipped": False}

    def write(o):
        write_result(out_dir / f"{stem}.json", o)
        write_result(out_dir / f"{stem}.md", markdown(o), o)

    if not args.dry_run and not torch.cuda.is_available():
        out.update(skipped=True, reason="no CUDA device (torch.cuda.is_available() is False); "
                                        "run with --dry-run for a CPU logic check")
        print("skipped: no CUDA device", flush=True)
        write(out)
        return 0
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny matmuls; avoids thread-pool stalls on a shared machine
        args.dtypes = [d for d in args.dtypes if d != "fp16"] or ["bf16"]  # CPU fp16 matmul is slow/patchy
        args.dtypes = ["fp32"] + args.dtypes
        args.warmup, args.repeats, args.model_repeats, args.max_inner = 1, 3, 3, 2
        out.update(warmup=args.warmup, repeats=args.repeats)
    else:
        device = torch.device("cuda")
        env["backend"] = choose_backend(args.backend)
    print(f"device: {env['device']}; torch {env['torch']}; cuSPARSELt available: {env['cusparselt_available']}; "
          f"backend: {env['backend']}" + ("  [DRY RUN: not speed figures]" if args.dry_run else ""), flush=True)
    try:
        out["layout"] = layout_check([d for d in args.dtypes if d in ("fp16", "bf16")] or ["fp16", "bf16"])
        bad = [r for r in out["layout"] if not (r["cusparselt"] or r["cutlass"])]
        print(f"layout check: {len(out['layout']) - len(bad)}/{len(out['layout'])} real shape×dtype pairs meet "
              "a semi-structured backend's constraints" + (f"; failing: {bad}" if bad else ""), flush=True)
    except Exception as exc:  # private attributes may move between torch versions
        out["layout_error"] = f"{type(exc).__name__}: {exc}"
    out["shapes"] = bench_shapes(args, device, args.dry_run)
    try:
        out["model_forward"] = bench_model(args, device, args.dry_run)
    except Exception as exc:  # keep the per-shape figures even if the whole-model part fails
        out["model_forward"] = None
        out["model_forward_error"] = f"{type(exc).__name__}: {exc}"
        print(f"whole-model forward failed: {out['model_forward_error']}", flush=True)
    write(out)
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
