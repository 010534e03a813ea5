"""Quality across kinds of text: calibrate on one set, measure perplexity on several held-out domains.

Why: calibrated and evaluated on the same author, reconstruction looks great; a user's traffic is other text. This
script puts in-domain and out-of-domain side by side, for each calibration set (``--calib NAME=SOURCE``; SOURCE
``default`` is the embedded mixed set, ``default:prose+docs`` some of its kinds in equal shares, else a file or
folder as ``--calib`` takes it) and each calibration seed,
on the same calibration tokens for every row:

- ``dense``; ``unstructured`` (50 % by the criterion per row: the ceiling); ``masks`` (our permutation, N:M masks
  only, no weight update: the row reconstruction must never lose to);
- ours: one row per ``--methods`` entry ``NAME=STRATEGY[+obs][:KEY=VALUE,...]``, the KEY=VALUE pairs being
  ``ReconstructConfig`` fields (e.g. ``shrink=0.3``); ``random+obs`` is the random-permutation control;
- theirs: llm-compressor's ``SparseGPTModifier`` 2:4 on the same tokens, run from ``--peer-python`` (a venv with
  ``llmcompressor``; skipped with one line when absent) through ``peer_llmcompressor.py``'s worker.

Held-out domains (``--eval NAME=PATH``, a file or a folder whose files are read in sorted order) must not overlap
the calibration text; the first ``--eval-tokens`` tokens of each are scored (context ``--context``). Example
(what docs/FINDINGS.md reports; OMP_WAIT_POLICY=PASSIVE on a busy machine)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/quality_domains.py --calib narrow=../shared/data/austen/emma.txt \\
        --calib default=default --seeds 0 1 --peer-python /work/venv-llmc/bin/python

Writes ``benchmarks/results/domains_<model>_<N>of<M>[_tag].json`` and ``.md`` with the git commit and command.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
DEFAULT_EVAL = {
    "austen": SHARED / "austen" / "persuasion.txt",  # literary prose (the default set holds another Austen novel)
    "py-docs": SHARED / "python_docs" / "tutorial.txt",  # technical English (the default set: library reference)
    "py-code": Path(sysconfig.get_paths()["purelib"]) / "numpy" / "lib",  # another project's Python than the stdlib
    "c-code": Path(sysconfig.get_paths()["include"]) / "cpython",  # no C in any calibration set
    "legal": Path("/usr/share/common-licenses/GPL-3"),  # no legal text in any calibration set
}
DEFAULT_METHODS = ("masks=hungarian", "default=hungarian+obs", "control=random+obs")


def read_domain(path: Path, max_chars: int) -> str:
    """The text of a file, or of a folder's files in sorted order, up to ``max_chars`` characters."""
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")[:max_chars]
    parts, total = [], 0
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".h", ".c", ".txt", ".rst")):
        if "test" in f.parts or f.name.startswith("test"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        sys.exit(f"no text files under {path}")
    return "\n\n".join(parts)[:max_chars]


def calib_shape(spec: str, samples: int, seq_len: int) -> tuple[str, int, int]:
    """``SOURCE[@SAMPLESxSEQ_LEN]`` → (source, samples, sequence length); the defaults where not given."""
    source, _, shape = spec.partition("@")
    if shape:
        a, _, b = shape.partition("x")
        samples, seq_len = int(a), int(b)
    return source, samples, seq_len


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``NAME=STRATEGY[+obs][:KEY=VALUE,...]`` → (name, strategy+suffix, ReconstructConfig overrides)."""
    name, _, rest = spec.partition("=")
    head, _, knobs = rest.partition(":")
    overrides = {}
    for pair in filter(None, knobs.split(",")):
        key, _, value = pair.partition("=")
        overrides[key] = value
    return name, head or name, overrides


def typed_overrides(overrides: dict) -> dict:
    from permcompile.config import ReconstructConfig

    types = {f.name: f.type for f in dataclasses.fields(ReconstructConfig)}
    out = {}
    for key, value in overrides.items():
        kind = types.get(key)
        if kind is None:
            sys.exit(f"unknown ReconstructConfig field {key!r} (fields: {', '.join(types)})")
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}.get(
            kind if isinstance(kind, str) else kind.__name__, str)(value)
    return out


def method_config(base, head: str, overrides: dict):
    from permcompile.config import ReconstructConfig

    strategy, _, suffix = head.partition("+")
    recon = dataclasses.replace(ReconstructConfig(), **typed_overrides(overrides))
    return dataclasses.replace(base, permutation=strategy, update="obs" if suffix == "obs" else "none",
                               reconstruct=recon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", action="append", default=None,
                    help="NAME=SOURCE[@SAMPLESxSEQ_LEN] (default: narrow=<shared>/austen/emma.txt and "
                    "default=default@32x128, the embedded set at optimize's defaults)")
    ap.add_argument("--eval", action="append", default=None, help="NAME=PATH (default: five domains, see the source)")
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-unstructured", action="store_true")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--criterion", default="wanda")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"))
    ap.add_argument("--peer-fit-tokens", action="store_true",
                    help="a single-text calibration: give the peer the tokens our reconstruction fits on (the text "
                    "plus the embedded mixed set's share, ReconstructConfig.reference_share), not the text alone")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="write one table from the rows of earlier runs' JSON files (e.g. one run per seed, run side "
                    "by side; where two runs have a row of the same calibration set, seed and method, the first file's "
                    "is kept); --tag names the result; every other option is ignored")
    args = ap.parse_args()
    if args.combine:
        combine(args)
        return

    from permcompile.calib.data import embedded_calibration, load_calibration, narrow_calibration
    from permcompile.config import OptimizeConfig, Sparsity
    from permcompile.evaluate import perplexity
    from permcompile.models import load_model
    from permcompile.pipeline import compress_

    calibs = dict(c.split("=", 1) for c in (args.calib or [f"narrow={SHARED / 'austen' / 'emma.txt'}",
                                                           "default=default@32x128"]))
    evals = ({k: Path(v) for k, v in (e.split("=", 1) for e in args.eval)} if args.eval else dict(DEFAULT_EVAL))
    methods = [parse_method(s) for s in args.methods]
    for _name, _head, overrides in methods:
        typed_overrides(overrides)  # fail before any work
    n, m = (int(x) for x in args.sparsity.split(":"))
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    texts = {name: read_domain(path, args.eval_tokens * 8) for name, path in evals.items()}
    eval_ids = {name: tok(t, add_special_tokens=False)["input_ids"][:args.eval_tokens] for name, t in texts.items()}
    short = {k: len(v) for k, v in eval_ids.items() if len(v) < args.eval_tokens}
    if short:
        print(f"note: fewer than {args.eval_tokens} tokens in {short}", file=sys.stderr)
    dense_state = copy.deepcopy(loaded.model.state_dict())

    def score(net) -> dict:
        from permcompile.evaluate import perplexity_ids

        with torch.no_grad():
            return {k: float(perplexity_ids(net, torch.tensor(v), context=args.context)["ppl"])
                    for k, v in eval_ids.items()}

    rows: list[dict] = []
    meta = {"git": git_state(), "command": command_line("quality_domains.py"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "model": args.model, "samples": args.samples,
            "seq_len": args.seq_len, "eval_tokens": {k: len(v) for k, v in eval_ids.items()}, "context": args.context,
            "criterion": args.criterion, "calib": calibs, "eval": {k: str(v) for k, v in evals.items()}}
    if not args.no_dense:
        rows.append({"calib": "-", "seed": None, "method": "dense", "ppl": score(loaded.model), "seconds": 0.0})
        print(f"dense {rows[-1]['ppl']}", file=sys.stderr, flush=True)
    del perplexity  # the ids-based scorer above is what every row uses
    work = Path(tempfile.mkdtemp(prefix="pc-domains-"))
    from peer_llmcompressor import _peer_available

    skip = _peer_available(args.peer_python)
    if skip:
        print(f"llm-compressor rows skipped: {skip}", file=sys.stderr)
    # seeds outermost: an interrupted run still has every calibration set of its first seeds
    for seed, (calib_name, spec) in ((s, c) for s in args.seeds for c in calibs.items()):
        source, samples, seq_len = calib_shape(spec, args.samples, args.seq_len)
        # "default:prose+docs": some kinds of the embedded set, in equal shares (what each kind adds)
        embedded, _, kinds = source.partition(":")
        base = OptimizeConfig(sparsity=Sparsity(n, m), criterion=args.criterion, seed=seed,
                              calib=None if embedded == "default" else source, calib_samples=samples,
                              calib_seq_len=seq_len)
        loaded.model.load_state_dict(dense_state)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single-text warning: this table measures exactly that
            batches = (embedded_calibration(loaded, samples, seq_len, seed, kinds=kinds.split("+"))
                       if embedded == "default" and kinds else
                       load_calibration(base.calib, loaded, samples, seq_len, seed))  # as optimize batches them
        # the dense model's input statistics depend on the batches only: one forward for every row of the seed
        from permcompile.calib.stats import collect_input_stats

        stats = collect_input_stats(loaded.model, batches, progress=False, forward_kwargs=loaded.forward_kwargs())
        plan = [(name, head, ov) for name, head, ov in methods]
        if not args.no_unstructured:
            plan.insert(0, ("unstructured", "unstructured", {}))
        for name, head, overrides in plan:
            loaded.model.load_state_dict(dense_state)
            start = time.perf_counter()
            if head == "unstructured":
                _unstructured_(loaded, stats, base, n, m)
                timings = {}
            else:
                cfg = method_config(base, head, overrides)
                c = compress_(loaded, cfg, quiet=True, batches=batches, stats=stats)
                timings = c.timings
            seconds = time.perf_counter() - start
            ppl = score(loaded.model)
            rows.append({"calib": calib_name, "seed": seed, "method": name, "spec": f"{head}:{overrides}",
                         "ppl": ppl, "seconds": round(seconds, 1), "timings": timings})
            print(f"[{calib_name} seed {seed}] {name}: " + "  ".join(f"{k} {v:.1f}" for k, v in ppl.items())
                  + f"  ({seconds:.0f} s)", file=sys.stderr, flush=True)
            _write(args, meta, rows, quiet=True)
        if not skip:
            fit, peer_name = batches, "llm-compressor SparseGPT"
            if args.peer_fit_tokens and narrow_calibration(batches):
                from permcompile.config import ReconstructConfig

                # what optimize's reconstruction fits on for a single text (pipeline._mask), at the same length
                fit = list(batches) + list(load_calibration(None, loaded, ReconstructConfig().reference_samples(
                    samples), seq_len, seed))
                peer_name += " (ours' fit tokens)"
            ids = torch.cat([b["input_ids"] for b in fit])
            calib_file = work / f"calib_{calib_name}_{seed}.pt"
            torch.save(ids, calib_file)
            out = work / f"sparsegpt_{calib_name}_{seed}"
            model_dir = _model_dir(loaded)
            start = time.perf_counter()
            res = subprocess.run([args.peer_python, str(HERE / "peer_llmcompressor.py"), "--worker", "llmc",
                                  "--method", "sparsegpt", "--sparsity", args.sparsity, "--calib", str(calib_file),
                                  "--seed", str(seed), "--model-dir", model_dir, "--out", str(out)],
                                 capture_output=True, text=True, check=False)
            if res.returncode:
                print(f"  sparsegpt failed: {res.stdout[-800:]}{res.stderr[-800:]}", file=sys.stderr)
                continue
            from transformers import AutoModelForCausalLM

            net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            rows.append({"calib": calib_name, "seed": seed, "method": peer_name,
                         "ppl": score(net), "seconds": round(time.perf_counter() - start, 1)})
            del net
            print(f"[{calib_name} seed {seed}] sparsegpt: {rows[-1]['ppl']}", file=sys.stderr, flush=True)
            _write(args, meta, rows, quiet=True)
    _write(args, meta, rows)


def combine(args) -> None:
    """One table from several runs: their rows (the dense row once), their commits and commands kept."""
    runs = [json.loads(Path(f).read_text()) for f in args.combine]
    first = runs[0]
    calib = dict(first["calib"])
    for run in runs[1:]:
        if run["eval_tokens"] != first["eval_tokens"] or any(calib.get(k, v) != v for k, v in run["calib"].items()):
            sys.exit(f"{args.combine}: the runs measured different held-out tokens or calibration sets of one name")
        calib.update(run["calib"])
    rows, seen = [], set()
    for run in runs:
        for r in run["rows"]:
            key = (r["calib"], r["seed"], r["method"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    rows.sort(key=lambda r: (r["method"] != "dense", r["seed"] if r["seed"] is not None else -1))
    meta = {**{k: v for k, v in first.items() if k != "rows"}, "calib": calib, "git": git_state(),
            "command": command_line("quality_domains.py"),
            "runs": [{"file": str(f), "git": r.get("git"), "command": r.get("command")}
                     for f, r in zip(args.combine, runs)]}
    args.samples, args.seq_len, args.context = first["samples"], first["seq_len"], first["context"]
    args.model = first["model"]
    _write(args, meta, rows)


def _unstructured_(loaded, stats, base, n: int, m: int) -> None:
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears, unstructured_masks_

    net = loaded.model
    captured = capture(net, loaded.example_inputs(), loaded.forward_kwargs())
    linears = select_linears(net, captured, analyze(captured), m)
    unstructured_masks_(net, linears, stats, base.criterion, 1 - n / m)


def _model_dir(loaded) -> str:
    source = str(loaded.source)
    return source.split("fp32 cache ")[-1] if "fp32 cache" in source else source


def _write(args, meta: dict, rows: list[dict], quiet: bool = False) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, m = args.sparsity.split(":")
    stem = f"domains_{args.model}_{n}of{m}" + (f"_{args.tag}" if args.tag else "")
    write_result(out / f"{stem}.json", {**meta, "rows": rows})
    domains = list(meta["eval_tokens"])
    calib_list = ", ".join(f"{k} = `{v}`" for k, v in meta["calib"].items())
    eval_list = ", ".join(f"{k} `{v}` ({meta['eval_tokens'][k]} tokens)" for k, v in meta["eval"].items())
    lines = [f"# {args.model} {args.sparsity}: held-out perplexity by kind of text", "",
             *provenance_lines(meta), f"OMP_WAIT_POLICY={meta['omp_wait_policy']}",
             *(f"Rows from `{r['file']}`: {' '.join(provenance_lines(r))}" for r in meta.get("runs", [])), "",
             f"Calibration sets (SOURCE@SAMPLESxTOKENS; {args.samples} × {args.seq_len} where not given): "
             f"{calib_list}; the same tokens for every row of a seed. Held-out: the first tokens "
             f"of {eval_list}; "
             f"context {args.context}. Cells: mean ± sd over seeds (per-seed values in the JSON); ratio rows divide "
             "by the masks-only row of the same calibration set and seed.", "",
             "| calibration | method | " + " | ".join(domains) + " | seconds |",
             "|---|---|" + "---|" * len(domains) + "---|"]
    keys = []
    for r in rows:
        if (r["calib"], r["method"]) not in keys:
            keys.append((r["calib"], r["method"]))
    for calib, method in keys:
        rs = [r for r in rows if r["calib"] == calib and r["method"] == method]
        cells = []
        for d in domains:
            vals = [r["ppl"][d] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f}" + (f" ± {sd:.1f}" if len(vals) > 1 else ""))
        lines.append(f"| {calib} | {method} | " + " | ".join(cells) +
                     f" | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "Ratio to masks only (same calibration and seed; mean over seeds):", "",
              "| calibration | method | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for calib, method in keys:
        if calib == "-" or method == "masks":
            continue
        ratios = {d: [] for d in domains}
        for r in rows:
            if r["calib"] != calib or r["method"] != method:
                continue
            base = next((b for b in rows if b["calib"] == calib and b["seed"] == r["seed"] and b["method"] == "masks"),
                        None)
            for d in domains:
                if base is not None:
                    ratios[d].append(r["ppl"][d] / base["ppl"][d])
        if any(ratios.values()):
            lines.append(f"| {calib} | {method} | " + " | ".join(
                f"{statistics.mean(v):.2f}" if v else "" for v in ratios.values()) + " |")
    write_result(out / f"{stem}.md", "\n".join(lines) + "\n", meta)
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
