"""Ours vs llm-compressor on one causal LM, same calibration tokens, one run, one table.

Rows (each per calibration seed; seed s takes the s-th disjoint block of ``samples × seq_len`` tokens of the
calibration file, so seed 0 is its first tokens):

- ``dense``; ``unstructured`` (50 % Wanda per row, the ceiling a 2:4 mask approaches);
- ours, one row per ``--methods`` entry ``STRATEGY[/per-layer][+obs...]``: ``none``/``random`` (the control)/
  ``hungarian``/``search`` (exchange search)/``learned`` (end to end) permutations, mask only,
  or with ``+obs`` mask + SparseGPT-style reconstruction
  (``+search``: the permutation search scores OBS costs; see ``quality_encoder.method_config``);
- theirs: llm-compressor ``SparseGPTModifier`` and ``WandaPruningModifier`` with ``mask_structure="N:M"``,
  run from a separate Python (``--peer-python``, a venv with ``pip install torch==2.13.0 && pip install
  llmcompressor``); skipped with one line when that Python has no ``llmcompressor``.

Every compression runs in its own subprocess (wall time and peak RSS are that process's); the folders it
writes are all evaluated here, by the same code, on the same held-out tokens. Example::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/peer_llmcompressor.py --data-dir ../shared/data/austen \
        --peer-python /work/venv-llmc/bin/python --seeds 0 1 2

Writes ``benchmarks/results/peer_<model>_<N>of<M>[_tag].json`` and ``.md`` (with the git commit and command).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- workers (one compression per process) ---------------------------------------------------------------

def _batches(ids, batch: int = 4) -> list[dict]:
    import torch

    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch])}
            for i in range(0, ids.shape[0], batch)]


def worker_ours(args) -> dict:
    import torch

    from permcompile.config import OptimizeConfig, Sparsity
    from permcompile.models import load_model
    from permcompile.pipeline import compress_

    ids = torch.load(args.calib, weights_only=True)
    loaded = load_model(args.model)
    start = time.perf_counter()
    n, m = (int(x) for x in args.sparsity.split(":"))
    sys.path.insert(0, str(HERE))
    from quality_encoder import method_config

    method = args.method
    if args.update == "obs" and "+obs" not in method:
        method += "+obs"
    base = OptimizeConfig(sparsity=Sparsity(n, m), criterion=args.criterion, seed=args.seed,
                          calib_seq_len=ids.shape[1], calib_samples=ids.shape[0])
    config = method_config(base, "none" if method == "unstructured" else method)
    if args.method == "unstructured":
        from permcompile.calib.stats import collect_input_stats
        from permcompile.capture import capture
        from permcompile.passes.coupling import analyze
        from permcompile.passes.sparsify import select_linears, unstructured_masks_

        net = loaded.model
        captured = capture(net, loaded.example_inputs(), loaded.forward_kwargs())
        linears = select_linears(net, captured, analyze(captured), m)
        stats = collect_input_stats(loaded, _batches(ids), progress=False)
        unstructured_masks_(net, linears, stats, args.criterion, 1 - n / m)
    else:
        extra, kwargs = {}, {}
        if config.permutation == "learned":  # the end-to-end method
            import dataclasses

            from permcompile.passes.learned import STATE_FILE

            knobs = dict(kv.split("=", 1) for kv in args.learned.split(",") if kv)
            fields = {f.name: f.type for f in dataclasses.fields(config.learned)}
            cast = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}
            typed = {k: cast.get(fields[k], str)(v) for k, v in knobs.items()}
            config = dataclasses.replace(config, learned=dataclasses.replace(config.learned, **typed))
            if args.learned_share:  # the rows of one seed share the loop: a finished checkpoint is its result
                kwargs = {"checkpoint_dir": args.learned_share,
                          "resume": Path(args.learned_share, "learned", STATE_FILE).is_file()}
        c = compress_(loaded, config, quiet=True, batches=_batches(ids), **kwargs)
        extra = {"permute_s": c.timings.get("permute"), "resumed_learned": kwargs.get("resume", False),
                 "notes": sorted({r.note for r in c.group_results if r.strategy == "learned"})}
    seconds = time.perf_counter() - start
    loaded.model.save_pretrained(args.out, safe_serialization=True)
    return {"seconds": seconds, "peak_mb": _peak_mb(), **(extra if args.method != "unstructured" else {})}


def static_8bit_scheme(kind: str) -> dict:
    """A compressed-tensors scheme matching ``--quantize fp8|int8`` (``kind`` "float" / "int"): weights symmetric
    per output channel, inputs symmetric per tensor with a static scale from the calibration max (observer
    ``static_minmax``). llm-compressor's presets differ: ``FP8`` has per-tensor weights, ``W8A8`` dynamic per-token
    inputs, and a static input's default observer (``minmax``) is a moving average of the batches' ranges."""
    common = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False}
    return {"targets": ["Linear"], "weights": {**common, "strategy": "channel"},
            "input_activations": {**common, "strategy": "tensor", "observer": "static_minmax"}}


# llm-compressor one-shot recipes: pruning, then (``+fp8``/``+w8a8``) quantization of the same linears
LLMC_METHODS = ("sparsegpt", "wanda", "sparsegpt+fp8", "sparsegpt+w8a8")


def llmc_recipe(method: str, n: int, m: int) -> list:
    """``method`` (one of ``LLMC_METHODS``) as a list of llm-compressor modifiers, applied in order.

    ``+fp8``: SparseGPT N:M, then ``QuantizationModifier`` (round to nearest: the 2:4 zeros stay code 0).
    ``+w8a8``: SparseGPT N:M, ``SmoothQuantModifier(smoothing_strength=0.8)``, then ``GPTQModifier`` (its
    documented W8A8 recipe, with the static scheme above). llm-compressor 0.14's GPTQ has no sparsity mask: its
    error updates can fill the pruned weights, which is why the benchmark measures the N:M share of the result."""
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    prune, _, quant = method.partition("+")
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[prune]
    recipe = [cls(sparsity=1 - n / m, mask_structure=f"{n}:{m}", targets=[r"re:model.layers.\d*$"],
                  ignore=["lm_head"])]
    if quant == "fp8":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe.append(QuantizationModifier(config_groups={"group_0": static_8bit_scheme("float")},
                                           ignore=["lm_head"]))
    elif quant == "w8a8":
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe += [SmoothQuantModifier(smoothing_strength=0.8),
                   GPTQModifier(config_groups={"group_0": static_8bit_scheme("int")}, ignore=["lm_head"])]
    elif quant:
        raise ValueError(f"unknown llm-compressor method {method!r} (choose from {', '.join(LLMC_METHODS)})")
    return recipe


def _processor(model_dir: str):
    """The folder's tokenizer, or a one-token placeholder for a folder without one (the test zoo's tiny models).

    ``oneshot`` refuses a dataset without a processor, even one already made of token ids like ours (the
    placeholder never encodes anything: the ids come from the driver)."""
    if any(Path(model_dir, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None  # oneshot loads it from the model's folder
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                   pad_token="<pad>", unk_token="<pad>")


def worker_llmc(args) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.calib, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    n, m = (int(x) for x in args.sparsity.split(":"))
    recipe = llmc_recipe(args.method, n, m)
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), processor=_processor(args.model_dir))
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, safe_serialization=True)
    return {"seconds": seconds, "peak_mb": _peak_mb()}


# --- driver ---------------------------------------------------------------------------------------------

def _run_worker(python: str, argv: list[str], log: Path) -> dict | None:
    with open(log, "w") as fh:
        proc = subprocess.run([python, str(Path(__file__).resolve()), *argv], stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    text = log.read_text(errors="replace")
    marker = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not marker:
        print(f"  failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(text.splitlines()[-8:]),
              file=sys.stderr)
        return None
    return json.loads(marker[-1][len("RESULT "):])


def _peer_available(python: str | None) -> str | None:
    if not python:
        return "no --peer-python given"
    if not Path(python).exists():
        return f"{python} does not exist"
    ok = subprocess.run([python, "-c", "import llmcompressor"], capture_output=True, check=False)
    return None if ok.returncode == 0 else f"{python} cannot import llmcompressor"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", help="folder of .txt files (calibration and evaluation)")
    ap.add_argument("--calib-file", default="emma.txt")
    ap.add_argument("--eval-file", default="persuasion.txt")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--criterion", default="wanda")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+",
                    default=["none", "hungarian", "none+obs", "random+obs", "hungarian+obs", "search+obs"],
                    help="our rows: STRATEGY[/per-layer][+obs[+search|+refit|+critmask]] (see quality_encoder.py)")
    ap.add_argument("--peer-methods", nargs="*", default=["sparsegpt", "wanda"], choices=LLMC_METHODS,
                    help="none: our rows only (+fp8/+w8a8: see llmc_recipe)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"))
    ap.add_argument("--no-unstructured", action="store_true")
    ap.add_argument("--learned", default="", help="LearnedConfig knobs for learned rows, e.g. steps=40,"
                    "micro_batch=1,lr=0.1; a learned row's finished loop is reused by the next learned row of the same "
                    "seed (its seconds then exclude the loop; permute_s in the JSON)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    # worker mode (internal)
    ap.add_argument("--worker", choices=["ours", "llmc"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--update", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--learned-share", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_llmc)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if not args.data_dir:
        ap.error("--data-dir is required (a folder holding --calib-file and --eval-file)")
    sys.path.insert(0, str(HERE))
    from quality_encoder import check_methods

    try:
        check_methods(args.methods)
    except Exception as exc:  # permcompile's UsageError: one line, exit 2
        sys.exit(f"error: {exc}")
    import torch

    from permcompile.evaluate import perplexity
    from permcompile.models import load_model

    data = Path(args.data_dir)
    loaded = load_model(args.model)
    model_dir = str(loaded.source).split("fp32 cache ")[-1] if "fp32 cache" in str(loaded.source) else str(
        loaded.source)
    tok = loaded.tokenizer
    calib_ids = tok(data.joinpath(args.calib_file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    eval_text = data.joinpath(args.eval_file).read_text(encoding="utf-8")
    block = args.samples * args.seq_len
    work = Path(tempfile.mkdtemp(prefix="pc-peer-"))
    skip = _peer_available(args.peer_python)
    if skip:
        print(f"llm-compressor rows skipped: {skip}", file=sys.stderr)

    def ppl_of(folder_or_loaded) -> float:
        if isinstance(folder_or_loaded, (str, Path)):
            from transformers import AutoModelForCausalLM

            net = AutoModelForCausalLM.from_pretrained(folder_or_loaded, dtype=torch.float32).eval()
        else:
            net = folder_or_loaded
        with torch.no_grad():
            return float(perplexity(net, tok, eval_text, context=args.context, max_tokens=args.eval_tokens)["ppl"])

    dense_ppl = ppl_of(loaded.model)
    print(f"dense ppl {dense_ppl:.2f}", file=sys.stderr)
    del loaded
    rows: list[dict] = []
    jobs: list[tuple[str, str, list[str], str]] = []
    for seed in args.seeds:
        ids = torch.tensor(calib_ids[seed * block:(seed + 1) * block], dtype=torch.long)
        if ids.numel() < block:
            sys.exit(f"{args.calib_file} has too few tokens for seed {seed} ({len(calib_ids)} tokens)")
        calib = work / f"calib_{seed}.pt"
        torch.save(ids.view(args.samples, args.seq_len), calib)
        common = ["--sparsity", args.sparsity, "--calib", str(calib), "--seed", str(seed)]
        if not args.no_unstructured:
            jobs.append(("ours", "unstructured", common + ["--worker", "ours", "--method", "unstructured",
                                                            "--model", args.model, "--criterion", args.criterion],
                         sys.executable))
        for method in args.methods:
            end_to_end = method.startswith("learned")
            share = ["--learned", args.learned, "--learned-share", str(work / f"learned_{seed}")] if end_to_end else []
            jobs.append(("ours", method, common + ["--worker", "ours", "--method", method, "--model", args.model,
                                                   "--criterion", args.criterion] + share, sys.executable))
        if not skip:
            for method in args.peer_methods:
                jobs.append(("llm-compressor", method, common + ["--worker", "llmc", "--method", method,
                                                                  "--model-dir", model_dir], args.peer_python))
    for tool, name, argv, python in jobs:
        seed = int(argv[argv.index("--seed") + 1])
        out = work / f"{tool}_{name.replace('/', '_').replace('+', '_')}_{seed}"
        print(f"[{tool}] {name} seed {seed} ...", file=sys.stderr, flush=True)
        res = _run_worker(python, argv + ["--out", str(out)], work / f"{out.name}.log")
        if res is None:
            rows.append({"tool": tool, "method": name, "seed": seed, "failed": True})
            continue
        ppl = ppl_of(out)
        shutil.rmtree(out, ignore_errors=True)
        row = {"tool": tool, "method": name, "seed": seed, "ppl": ppl, **res}
        print(f"  ppl {ppl:.2f}  {res['seconds']:.0f} s  peak {res['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
        rows.append(row)
        _write(args, rows, dense_ppl, quiet=True)  # partial results survive an interrupted run
    _write(args, rows, dense_ppl)
    shutil.rmtree(work, ignore_errors=True)


def _write(args, rows: list[dict], dense_ppl: float, quiet: bool = False) -> None:
    import statistics

    n, m = args.sparsity.split(":")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"peer_{args.model}_{n}of{m}" + (f"_{args.tag}" if args.tag else "")
    command = "python benchmarks/peer_llmcompressor.py " + " ".join(sys.argv[1:])
    meta = {"commit": _git_commit(), "command": command, "dense_ppl": dense_ppl,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "calib_file": args.calib_file,
            "eval_file": args.eval_file, "samples": args.samples, "seq_len": args.seq_len,
            "eval_tokens": args.eval_tokens, "context": args.context, "criterion": args.criterion}
    sys.path.insert(0, str(HERE))
    from provenance import write_result

    write_result(out / f"{stem}.json", {**meta, "rows": rows})
    keys = []
    for r in rows:
        k = (r["tool"], r["method"])
        if k not in keys:
            keys.append(k)
    lines = [f"# {args.model} {args.sparsity}: ours vs llm-compressor, same calibration tokens", "",
             f"commit `{meta['commit']}`; command `{command}`; OMP_WAIT_POLICY={meta['omp_wait_policy']}", "",
             f"Calibration: seed s = tokens [s·{args.samples * args.seq_len}, (s+1)·{args.samples * args.seq_len}) of "
             f"`{args.calib_file}` as {args.samples} × {args.seq_len}; held-out perplexity on the first "
             f"{args.eval_tokens} tokens of `{args.eval_file}` (context {args.context}). Dense: {dense_ppl:.2f}. "
             "Wall time and peak RSS are the compressing process's own (model load excluded from the time).", "",
             "| tool | method | ppl per seed | mean ± sd | seconds (mean) | peak MB (max) |",
             "|---|---|---|---|---|---|"]
    for tool, method in keys:
        rs = [r for r in rows if r["tool"] == tool and r["method"] == method and not r.get("failed")]
        if not rs:
            lines.append(f"| {tool} | {method} | failed | | | |")
            continue
        ppl = [r["ppl"] for r in rs]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        lines.append(f"| {tool} | {method} | {' / '.join(f'{p:.1f}' for p in ppl)} | "
                     f"{statistics.mean(ppl):.1f} ± {sd:.1f} | {statistics.mean(r['seconds'] for r in rs):.0f} | "
                     f"{max(r['peak_mb'] for r in rs):.0f} |")
    write_result(out / f"{stem}.md", "\n".join(lines) + "\n", meta)
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
