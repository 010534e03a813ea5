"""Quality of quantized 2:4 (``--quantize fp8|int8``) against our unquantized 2:4 default, through ONNX Runtime.

Each row is a full ``permcompile optimize`` run (defaults: hungarian + OBS reconstruction; the quantized rows add
``--quantize``), evaluated with ``permcompile.evaluate`` on the output folder's ``model.onnx`` (``backend="onnx"``):
the Q/DQ graph itself, not a torch emulation. Rows: ``2:4`` (unquantized default), ``2:4+int8``, ``2:4+fp8`` and
``2:4+int8 random`` (a random-permutation control), each over calibration seeds. Metrics: held-out perplexity on
each ``--data`` text (causal LMs; first ``--max-tokens`` tokens) or embedding cosine / Spearman against the dense
model (encoders), and the ratio of each quantized row to the unquantized default of the same seed.

Peer rows (causal LMs; ``--peer-python``, default ``$PEER_PYTHON``: a venv with ``llmcompressor``, skipped with one
line when that Python cannot import it): llm-compressor's one-shot recipes run by ``peer_llmcompressor.py``'s worker
on exactly the calibration tokens of our rows (the embedded mixed set as ``optimize`` loads it for the seed), with
scales like ours (weights per output channel, inputs per tensor, static, calibration max):
``llmc sparsegpt+fp8`` (SparseGPT 2:4, then FP8 round to nearest) and ``llmc sparsegpt+w8a8`` (SparseGPT 2:4,
SmoothQuant 0.8, GPTQ INT8). Their compressed-tensors folders are evaluated in torch (this environment's
transformers + compressed-tensors, which fake-quantize every quantized linear's input with its static scale) on the
same held-out tokens (same tokenizer, text, ``--max-tokens`` and 512-token windows as ``evaluate``); each row also
records how much the input quantization changes the logits (0 would mean it is not applied) and the share of the
decoder linears' groups of 4 that are still 2:4 (llm-compressor 0.14's GPTQ does not keep a sparsity mask). Our
quantized rows get their ratio to the peer row of the same precision and seed.

    python benchmarks/quality_quant.py --model minilm --seeds 0 1 --data ../shared/data/austen/persuasion.txt
    python benchmarks/quality_quant.py --model smollm2 --seeds 0 1 --rows 2:4 2:4+fp8 \\
        --data ../shared/data/austen/persuasion.txt ../shared/data/python_docs/tutorial.txt --max-tokens 8192 \\
        --peer-python /work/venv-llmc/bin/python

Writes ``benchmarks/results/quality_quant_<model>[_tag].json`` and ``.md`` (with the commit and command).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"2:4": {}, "2:4+int8": {"quantize": "int8"}, "2:4+fp8": {"quantize": "fp8"},
        "2:4+int8 random": {"quantize": "int8", "permutation": "random"},
        "2:4+fp8 random": {"quantize": "fp8", "permutation": "random"},
        "2:4+int8 smooth": {"quantize": "int8:smooth_alpha=0.5"},
        "2:4+int8 no-smooth": {"quantize": "int8:smooth_alpha=none"}}


def row_config(name: str, **base):
    """The OptimizeConfig of row ``name`` (``quantize`` "MODE[:smooth_alpha=A|none]"; INT8 is smoothed by default)."""
    from permcompile.config import OptimizeConfig, QuantizeConfig

    row = dict(ROWS[name])
    mode, _, knob = row.pop("quantize", "none").partition(":")
    alpha = knob.partition("=")[2]
    quant = QuantizeConfig(mode=mode, **({"smooth_alpha": None if alpha == "none" else float(alpha)} if knob else {}))
    return OptimizeConfig(quantize=quant, **row, **base)
# peer row -> (peer_llmcompressor worker method, our rows of that precision)
PEER_ROWS = {"llmc sparsegpt+fp8": ("sparsegpt+fp8", ("2:4+fp8", "2:4+fp8 random")),
             "llmc sparsegpt+w8a8": ("sparsegpt+w8a8", ("2:4+int8", "2:4+int8 random"))}
CONTEXT = 512  # evaluate()'s default window, used by our rows and the peer rows alike


def _metric_keys(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "seconds"
            and (k == "ppl" or any(t in k for t in ("perplexity", "cosine", "spearman")))}


def nm_share(model, n: int = 2, m: int = 4) -> float:
    """Share of the decoder layers' linear weights' groups of ``m`` (along the input) with at most ``n`` nonzeros."""
    import torch

    ok = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name and mod.weight.shape[1] % m == 0:
            groups = mod.weight.detach().reshape(-1, m)
            ok += int(((groups != 0).sum(-1) <= n).sum())
            total += groups.shape[0]
    return ok / total if total else float("nan")


def input_quant_effect(model, batch) -> tuple[int, float]:
    """(linears with a static input scale, relative change of the logits when their quantization is switched off).

    The weights stay the decompressed codes × scales either way, so a nonzero change is the inputs' rounding: the
    check that the loaded checkpoint really quantizes activations (0 or no scales would mean a weight-only model)."""
    import torch

    quantized = [mod for mod in model.modules() if hasattr(mod, "input_scale")]
    with torch.no_grad():
        on = model(**batch).logits
        for mod in quantized:
            mod.quantization_enabled = False
        off = model(**batch).logits
        for mod in quantized:
            mod.quantization_enabled = True
    return len(quantized), float((on - off).norm() / off.norm())


def peer_rows(args, names: list[str], seed: int, work: Path) -> list[dict]:
    """llm-compressor's recipes ``names`` on the calibration tokens of our rows for ``seed``, scored in torch."""
    import torch
    from transformers import AutoModelForCausalLM

    from peer_llmcompressor import _run_worker
    from permcompile.calib.data import load_calibration
    from permcompile.config import OptimizeConfig
    from permcompile.evaluate import perplexity, read_text
    from permcompile.models import load_model

    cfg = OptimizeConfig(seed=seed, calib_samples=args.calib_samples)
    loaded = load_model(args.model)
    if loaded.family != "causal-lm":
        print(f"llm-compressor rows skipped: {args.model} is not a causal LM", file=sys.stderr)
        return []
    batches = load_calibration(cfg.calib, loaded, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)  # as optimize
    ids = torch.cat([b["input_ids"] for b in batches])
    calib = work / f"calib_{seed}.pt"
    torch.save(ids, calib)
    source = str(loaded.source)
    model_dir = source.split("fp32 cache ")[-1] if "fp32 cache" in source else source
    texts = {Path(d).stem: read_text(Path(d)) for d in args.data}
    rows = []
    for name in names:
        out = work / f"peer_{name.split()[-1].replace('+', '_')}_{seed}"
        start = time.perf_counter()
        argv = ["--worker", "llmc", "--method", PEER_ROWS[name][0], "--sparsity", f"{cfg.sparsity.n}:{cfg.sparsity.m}",
                "--calib", str(calib), "--seed", str(seed), "--model-dir", model_dir, "--out", str(out)]
        res = _run_worker(args.peer_python, argv, work / f"{out.name}.log")
        row = {"row": name, "seed": seed, "backend": "torch (compressed-tensors)",
               "calib_tokens": list(ids.shape)}
        if res is None:
            rows.append({**row, "failed": True})
            continue
        net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        n_scales, effect = input_quant_effect(net, {"input_ids": ids[:4]})
        row.update({"optimize_s": round(res["seconds"], 1), "wall_s": round(time.perf_counter() - start, 1),
                    "peak_memory_gib": round(res["peak_mb"] / 1024, 2), "static_input_scales": n_scales,
                    "input_quant_logit_change": effect, "nm_share": nm_share(net, cfg.sparsity.n, cfg.sparsity.m)})
        for stem, text in texts.items():
            with torch.no_grad():
                ppl = perplexity(net, loaded.tokenizer, text, context=CONTEXT, max_tokens=args.max_tokens)
            row[f"{stem}:ppl"] = ppl["ppl"]
            row[f"{stem}:tokens"] = ppl["tokens"]
        del net
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    from permcompile.evaluate import evaluate
    from permcompile.pipeline import optimize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", nargs="*", default=["2:4", "2:4+int8", "2:4+fp8", "2:4+int8 random"],
                    choices=list(ROWS))
    ap.add_argument("--data", nargs="+", required=True, help="held-out text files (never the calibration text)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="causal LMs: tokens of each text evaluated")
    ap.add_argument("--max-sentences", type=int, default=500, help="encoders: sentences of each text")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"),
                    help="a Python with llmcompressor (default $PEER_PYTHON): adds the peer rows")
    ap.add_argument("--peer-rows", nargs="*", default=list(PEER_ROWS), choices=list(PEER_ROWS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from peer_llmcompressor import _peer_available

    skip = _peer_available(args.peer_python) if args.peer_rows else "no --peer-rows"
    if skip:
        print(f"llm-compressor rows skipped: {skip}", file=sys.stderr)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quality_quant-"))
    try:
        for seed in args.seeds:
            if not skip:  # first: the shorter runs, and an interrupted run still has them
                rows += peer_rows(args, args.peer_rows, seed, work)
            for name in args.rows:
                cfg = row_config(name, seed=seed, calib_samples=args.calib_samples)
                out = work / f"{name.replace(':', '').replace('+', '_').replace(' ', '_')}_{seed}"
                start = time.perf_counter()
                result = optimize(args.model, out, cfg, quiet=True)
                wall = time.perf_counter() - start
                row = {"row": name, "seed": seed, "backend": "onnxruntime (model.onnx)", "optimize_s": round(wall, 1),
                       "checks_passed": all(c["passed"] for c in result.report["checks"]),
                       "peak_memory_gib": max(result.report.get("peak_memory_gib", {}).values(), default=None)}
                for data in args.data:
                    ev = evaluate(str(out), data, backend="onnx", max_tokens=args.max_tokens,
                                  max_sentences=args.max_sentences)
                    for k, v in _metric_keys(ev).items():
                        row[f"{Path(data).stem}:{k}"] = v
                    if "tokens" in ev:
                        row[f"{Path(data).stem}:tokens"] = ev["tokens"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = sorted({k for r in rows for k in r if ":" in k and not k.endswith(":tokens")})
    peer_of = {ours: peer for peer, (_, rows_of) in PEER_ROWS.items() for ours in rows_of}
    for r in rows:  # ratio to the unquantized default of the same seed, and to the peer of the same precision
        base = next((b for b in rows if b["row"] == "2:4" and b["seed"] == r["seed"]), None)
        peer = next((b for b in rows if b["row"] == peer_of.get(r["row"]) and b["seed"] == r["seed"]), None)
        for ref, suffix in ((base, "2:4"), (peer, "llmc")):
            if ref is not None:
                for k in metrics:
                    if k in r and k in ref and ref[k]:
                        r[f"{k} / {suffix}"] = r[k] / ref[k]
    out = {"model": args.model, "rows": rows, "command": command_line("quality_quant.py"), "git": git_state()}
    stem = f"quality_quant_{Path(args.model).name}" + (f"_{args.tag}" if args.tag else "")  # a folder: its name
    RESULTS.mkdir(exist_ok=True)
    write_result(RESULTS / f"{stem}.json", out)
    tokens = {k: sorted({r[k] for r in rows if k in r}) for k in sorted({k for r in rows for k in r
                                                                        if k.endswith(":tokens")})}
    lines = [f"# Quantized 2:4 on {args.model}: our rows through ONNX Runtime on the exported graph", "",
             "mean ± sd over calibration seeds " + ", ".join(map(str, args.seeds)) + "; ratio = row / unquantized "
             "2:4 default of the same seed; / llmc = our row / the llm-compressor row of the same precision and seed "
             "(metrics in column order). backend: `ort` = ONNX Runtime on the output's Q/DQ `model.onnx`; `torch` = "
             "the peer's compressed-tensors folder loaded by transformers (fake-quantized inputs and weights). "
             "checks: our rows, every `optimize` check passed; peer rows, `2:4 share` of the decoder linears' "
             "groups of 4 and the logits' relative change when input quantization is switched off."
             + (f" Tokens scored: {tokens}." if tokens else ""), "",
             "| row | backend | " + " | ".join(metrics) + " | ratio | / llmc | checks |",
             "|---" * (len(metrics) + 5) + "|"]
    for name in list(args.rows) + ([n for n in args.peer_rows if any(r["row"] == n for r in rows)]):
        sel = [r for r in rows if r["row"] == name and not r.get("failed")]
        if not sel:
            lines.append(f"| {name} | | " + " | ".join("" for _ in metrics) + " | | | failed |")
            continue
        cells = []
        for k in metrics:
            vals = [r[k] for r in sel if k in r]
            cells.append(f"{statistics.mean(vals):.4g} ± {statistics.pstdev(vals):.2g}" if vals else "")
        ratio = ("1" if name == "2:4" else
                 "; ".join(f"{r[f'{k} / 2:4']:.4f}" for r in sel for k in metrics if f"{k} / 2:4" in r))
        vs_peer = "; ".join(f"{r[f'{k} / llmc']:.4f}" for r in sel for k in metrics if f"{k} / llmc" in r)
        if name in PEER_ROWS:
            checks = "; ".join(f"2:4 share {r['nm_share']:.4f}, input quant {r['input_quant_logit_change']:.2g} "
                               f"({r['static_input_scales']} scales)" for r in sel)
        else:
            checks = str(all(r["checks_passed"] for r in sel))
        backend = "torch" if name in PEER_ROWS else "ort"
        lines.append(f"| {name} | {backend} | " + " | ".join(cells) + f" | {ratio} | {vs_peer} | {checks} |")
    lines += [""] + provenance_lines(out)
    write_result(RESULTS / f"{stem}.md", "\n".join(lines) + "\n", provenance=out)
    print("\n".join(lines))


if __name__ == "__main__":
    from quality_encoder import run_main  # noqa: E402

    run_main(main)
