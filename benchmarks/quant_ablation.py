"""Where quantized 2:4 loses quality: one quantizer kind at a time, in torch fake-quant, on one 2:4 build per seed.

Each seed builds our unquantized 2:4 default in memory (``compress_``: hungarian + OBS reconstruction; with
``--control`` also a random-permutation build), then scores held-out perplexity (first ``--max-tokens`` tokens of
each ``--data`` text, 512-token windows) with static per-tensor input quantization switched on for one kind of
linear at a time, without rebuilding:

* ``fp8 inputs: KIND`` / ``int8 inputs: KIND``: the inputs of every pruned linear of that kind (``qkv``, ``o``,
  ``gateup``, ``down``, or ``all``) fake-quantized with scale = calibration max |x| / qmax; weights unquantized.
* ``int8 down, alpha A``: the ``down_proj`` inputs INT8 after a SmoothQuant diagonal of strength A (``none``: no
  diagonal), folded post hoc into ``up_proj``'s rows and ``down_proj``'s columns (a column scaling keeps the 2:4
  zeros), ``down_proj``'s weights rounded to INT8 per output channel. This is how ``smooth_alpha`` was chosen
  without a pipeline run per value; the pipeline folds the diagonal before pruning and rounds during the OBS pass.

A row's ratio is its perplexity over the same build's unquantized 2:4 perplexity. Llama-style causal LMs only
(``q/k/v/o_proj``, ``gate/up/down_proj``).

``--dense`` asks what 8-bit costs the unpruned model, the floor under any quantized 2:4 build: no 2:4 build, the
base row is the dense model, and for each format the rows are ``inputs: all`` (as above), ``weights`` (every
``*_proj`` weight rounded to nearest on its per-output-channel grid, the scale ``max|w_i| / qmax``) and
``weights + inputs: all`` (both: the W8A8 function a plain round-to-nearest quantizer exports). Seeds change only
the calibration batches, hence the input scales.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/quant_ablation.py --model smollm2 --seeds 0 1 --control \\
        --data ../shared/data/austen/persuasion.txt ../shared/data/python_docs/tutorial.txt
    OMP_WAIT_POLICY=PASSIVE python benchmarks/quant_ablation.py --model smollm2 --seeds 0 1 --dense --tag dense \\
        --formats fp8 int8 --kinds all --alphas \\
        --data ../shared/data/austen/persuasion.txt ../shared/data/python_docs/tutorial.txt

Writes ``benchmarks/results/quant_ablation_<model>[_tag].json`` and ``.md`` (with the commit and command).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = {"qkv": r"\.(q|k|v)_proj$", "o": r"\.o_proj$", "gateup": r"\.(gate|up)_proj$", "down": r"\.down_proj$",
         "all": r"_proj$"}


@contextlib.contextmanager
def input_quant(net, scales: dict, fmt):
    """Fake-quantize each named module's input with its static scale while inside."""
    from permcompile.math.quant import fake_quant

    handles = [net.get_submodule(name).register_forward_pre_hook(
        lambda m, args, s=s: (fake_quant(args[0], s, fmt).to(args[0].dtype),) + tuple(args[1:]))
        for name, s in scales.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def smoothed_down(net, downs: list[str], channel_amax: dict, alpha: float | None):
    """``down_proj`` inputs divided by ``s = amax_x^α / amax_w^(1-α)`` (folded into ``up_proj`` rows), its columns
    multiplied by ``s`` and rounded to INT8 per output channel; yields the INT8 input scales. Restored on exit."""
    import torch

    from permcompile.math.quant import INT8, snap_rows, weight_scales

    saved = {}
    scales = {}
    try:
        with torch.no_grad():
            for name in downs:
                down = net.get_submodule(name)
                up = net.get_submodule(name.replace("down_proj", "up_proj"))
                saved[name] = (down.weight.detach().clone(), up.weight.detach().clone())
                w = down.weight.float()
                amax = channel_amax[name]
                s = (torch.ones_like(amax) if alpha is None else
                     amax.clamp_min(1e-8).pow(alpha) / w.abs().amax(0).clamp_min(1e-8).pow(1 - alpha))
                ws = w * s.unsqueeze(0)
                down.weight.copy_(snap_rows(ws, weight_scales(ws, INT8), INT8).to(down.weight.dtype))
                up.weight.div_(s.unsqueeze(1).to(up.weight.dtype))
                scales[name] = float((amax / s).max()) / INT8.qmax
        yield scales
    finally:
        with torch.no_grad():
            for name, (w_down, w_up) in saved.items():
                net.get_submodule(name).weight.copy_(w_down)
                net.get_submodule(name.replace("down_proj", "up_proj")).weight.copy_(w_up)


@contextlib.contextmanager
def rounded_weights(net, names: list[str], fmt):
    """Each named linear's weight rounded to nearest on its per-output-channel grid while inside."""
    import torch

    from permcompile.math.quant import snap_rows, weight_scales

    saved = {}
    try:
        with torch.no_grad():
            for name in names:
                w = net.get_submodule(name).weight
                saved[name] = w.detach().clone()
                w.copy_(snap_rows(w.float(), weight_scales(w.float(), fmt), fmt).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                net.get_submodule(name).weight.copy_(w)


def measure(args, seed: int, permutation: str, texts: dict) -> list[dict]:
    from permcompile.config import OptimizeConfig
    from permcompile.evaluate import perplexity
    import torch

    from permcompile.calib.data import load_calibration
    from permcompile.math.quant import INT8, get_format, tensor_scale
    from permcompile.models import load_model
    from permcompile.passes.quantize import input_ranges
    from permcompile.passes.smooth import channel_ranges
    from permcompile.pipeline import compress_

    loaded = load_model(args.model)
    config = OptimizeConfig(seed=seed, permutation="none" if permutation == "dense" else permutation,
                            calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    net = loaded.model.eval()
    if permutation == "dense":
        batches = list(load_calibration(config.calib, loaded, config.calib_samples, config.calib_seq_len, seed))
        pruned = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and re.search(KINDS["all"], n)]
    else:
        c = compress_(loaded, config, quiet=False)
        batches = list(c.batches)
        pruned = [i.module for i in c.linears if i.prune]
    amax = input_ranges(net, batches, pruned, loaded.forward_kwargs())
    downs = [n for n in pruned if n.endswith("down_proj")]
    channel_amax = channel_ranges(net, batches, downs, loaded.forward_kwargs())

    def score(label: str) -> dict:
        row = {"seed": seed, "permutation": permutation, "row": label}
        for name, text in texts.items():
            row[name] = perplexity(loaded, None, text, context=args.context, max_tokens=args.max_tokens)["ppl"]
        print(row, flush=True)
        return row

    base = "dense" if permutation == "dense" else "2:4"
    rows = [score(base)]
    for mode in args.formats:
        fmt = get_format(mode)
        for kind in args.kinds:
            chosen = {n: tensor_scale(a, fmt) for n, a in amax.items() if re.search(KINDS[kind], n)}
            with input_quant(net, chosen, fmt):
                rows.append(score(f"{mode} inputs: {kind}"))
        if permutation == "dense":
            with rounded_weights(net, pruned, fmt):
                rows.append(score(f"{mode} weights"))
                with input_quant(net, {n: tensor_scale(a, fmt) for n, a in amax.items()}, fmt):
                    rows.append(score(f"{mode} weights + inputs: all"))
    if downs and args.alphas:
        for alpha in args.alphas:
            a = None if alpha == "none" else float(alpha)
            with smoothed_down(net, downs, channel_amax, a) as scales, input_quant(net, scales, INT8):
                rows.append(score(f"int8 down, alpha {alpha}"))
    for r in rows[1:]:
        for name in texts:
            r[f"{name} / {base}"] = r[name] / rows[0][name]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--data", nargs="+", required=True, help="held-out text files (never the calibration text)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512, help="perplexity window (evaluate's default)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--formats", nargs="*", default=["fp8", "int8"], choices=["fp8", "int8"])
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--alphas", nargs="*", default=["none", "0.5", "0.7", "0.85"])
    ap.add_argument("--control", action="store_true", help="also a random-permutation build per seed")
    ap.add_argument("--dense", action="store_true", help="the unpruned model instead of 2:4 builds (8-bit's floor)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch

    from permcompile.evaluate import read_text

    texts = {Path(p).stem: read_text(p) for p in args.data}
    rows = []
    for seed in args.seeds:
        builds = ["dense"] if args.dense else ["hungarian"] + (["random"] if args.control else [])
        for permutation in builds:
            with torch.no_grad():  # a context, not set_grad_enabled: tests call main() in their own process
                rows += measure(args, seed, permutation, texts)
    out = {"model": args.model, "rows": rows, "command": command_line("quant_ablation.py", argv), "git": git_state()}
    stem = f"quant_ablation_{Path(args.model).name}" + (f"_{args.tag}" if args.tag else "")
    folder = Path(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_result(folder / f"{stem}.json", out)
    names = list(texts)
    lines = [f"# Where quantized 2:4 loses quality on {args.model} (torch fake-quant, one quantizer kind at a time)",
             "", f"Held-out perplexity, first {args.max_tokens} tokens of each text; mean ± sd over calibration seeds "
             f"{', '.join(map(str, args.seeds))}; ratio = row / the same build's unquantized base row (per seed: "
             "2:4, or the dense model for permutation `dense`). "
             "`KIND inputs`: static per-tensor input quantization of that kind of linear only, weights unquantized; "
             "`int8 down, alpha A`: down_proj inputs INT8 after a SmoothQuant diagonal folded post hoc, down_proj "
             "weights INT8 per channel; `FMT weights`: every pruned-kind weight rounded to nearest per output channel. "
             "permutation `random` = the random-permutation control, `dense` = the unpruned model.", "",
             "| permutation | row | " + " | ".join(names) + " | " + " | ".join(f"{n} ratio" for n in names) + " |",
             "|---" * (2 + 2 * len(names)) + "|"]
    order = list(dict.fromkeys((r["permutation"], r["row"]) for r in rows))
    for perm, label in order:
        sel = [r for r in rows if r["permutation"] == perm and r["row"] == label]

        def cell(key: str, digits: str) -> str:
            vals = [r[key] for r in sel if key in r]
            return f"{statistics.mean(vals):{digits}} ± {statistics.pstdev(vals):.2g}" if vals else ""

        lines.append(f"| {perm} | {label} | " + " | ".join(cell(n, ".4g") for n in names) + " | "
                     + " | ".join(cell(f"{n} / {'dense' if perm == 'dense' else '2:4'}", ".3f") for n in names) + " |")
    lines += [""] + provenance_lines(out)
    write_result(folder / f"{stem}.md", "\n".join(lines) + "\n", provenance=out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
