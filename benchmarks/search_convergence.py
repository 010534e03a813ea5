"""Is the permutation search converged? Dropped energy of single matrices under ever longer searches.

For chosen linears of a model (default: SmolLM2-135M, blocks 5 and 20, up_proj / q_proj / o_proj), each given
its own *free* input permutation (no coupling constraint: the most any permutation can do for that matrix),
this measures the share of the diagonal energy ``W² E[x²]`` that the criterion's N:M mask drops:

- in the original channel order (``original``) and unstructured per row (``unstructured``: the floor);
- after ``hungarian`` (the warm start), + 1 000 checked exchanges (the learned default's budget), + 30 000 more,
  and ``hungarian`` with 64 sweeps and both initialisations on the scores and on the energy itself.

Each cell is ``dropped share (gap closed, seconds)`` with gap closed = (original − x) / (original − unstructured).
If 30x the search closes almost nothing more, the permutation search is converged and what is left between N:M
and unstructured is structural: one column order is shared by every row of the matrix, while the unstructured
mask picks each row's best half on its own.

    python benchmarks/search_convergence.py --data-dir ../shared/data/austen

Writes ``benchmarks/results/search_convergence_<model>_<sparsity>_<criterion>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

import torch

from permcompile.config import OptimizeConfig, Sparsity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_encoder import run_main, text_calibration, text_model_args, write_results  # noqa: E402
from quality_lm import _calib_folder  # noqa: E402

SEARCHES = ("hungarian", "+1k exchanges", "+30k exchanges", "hungarian 64 sweeps", "hungarian 64 sweeps (energy)")


def search_table(w: torch.Tensor, scores: torch.Tensor, energy: torch.Tensor, n: int, m: int, seed: int = 0,
                 trials: tuple[int, int] = (1000, 30000)) -> dict:
    """Dropped energy share of one ``[out, K]`` matrix for the original order, unstructured, and each search."""
    from permcompile.math.search import diagonal_exchanges
    from permcompile.math.nm import nm_mask, unstructured_mask
    from permcompile.math.strategies import hungarian

    k = w.shape[1]
    labels, fixed = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.bool)
    total = float(energy.sum())

    def dropped(perm: torch.Tensor) -> float:
        mask = torch.empty_like(scores, dtype=torch.bool)
        mask[:, perm] = nm_mask(scores[:, perm], n, m)
        return float(energy[~mask].sum()) / total

    out = {"original": dropped(torch.arange(k)),
           "unstructured": float(energy[~unstructured_mask(scores, 1 - n / m)].sum()) / total, "searches": {}}
    gen = torch.Generator().manual_seed(seed)
    e_t, s_t = energy.T.contiguous(), scores.T.contiguous()
    t = time.perf_counter()
    p0 = hungarian(scores, n, m, labels, fixed, generator=gen)
    runs = [("hungarian", p0, time.perf_counter() - t)]
    t = time.perf_counter()
    p1, *_ = diagonal_exchanges(e_t, s_t, p0, n, m, labels, fixed, trials=trials[0], generator=gen)
    runs.append(("+1k exchanges", p1, time.perf_counter() - t + runs[0][2]))
    t = time.perf_counter()
    p2, *_ = diagonal_exchanges(e_t, s_t, p1, n, m, labels, fixed, trials=trials[1], generator=gen)
    runs.append(("+30k exchanges", p2, time.perf_counter() - t + runs[1][2]))
    for name, target in (("hungarian 64 sweeps", scores), ("hungarian 64 sweeps (energy)", energy)):
        t = time.perf_counter()
        p = hungarian(target, n, m, labels, fixed, generator=gen, max_sweeps=64, tol=0.0, init="best")
        runs.append((name, p, time.perf_counter() - t))
    gap = out["original"] - out["unstructured"]
    for name, perm, secs in runs:
        d = dropped(perm)
        out["searches"][name] = {"dropped": d, "closed": (out["original"] - d) / gap if gap > 0 else None,
                                 "seconds": secs}
    return out


def main() -> None:
    from permcompile.passes.sparsify import LinearInfo, consumer_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    text_model_args(ap, "smollm2")
    ap.add_argument("--linears", nargs="+", default=[f"model.layers.{i}.{k}" for i in (5, 20)
                                                     for k in ("mlp.up_proj", "self_attn.q_proj", "self_attn.o_proj")],
                    help="module names of the linears to search")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--trials", nargs=2, type=int, default=[1000, 30000], help="the two exchange budgets")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    sparsity = Sparsity.parse(args.sparsity)
    base = OptimizeConfig(sparsity=sparsity, criterion=args.criterion, calib=str(_calib_folder(Path(args.data_dir))),
                          calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.calib_seed)
    loaded, _, stats, _ = text_calibration(args.model, base)
    results = {}
    for name in args.linears:
        try:
            module = loaded.model.get_submodule(name)
        except AttributeError:
            raise SystemExit(f"error: {args.model} has no module {name!r}") from None
        if not isinstance(module, torch.nn.Linear) or name not in stats:
            raise SystemExit(f"error: {name} is not a linear layer with calibration statistics")
        w = module.weight.detach().float()
        info = LinearInfo(name, f"{name}.weight", 1, tuple(w.shape))
        scores = consumer_scores(loaded.model, info, stats, args.criterion)
        st = stats[name]
        energy = w.square() * st.mean_sq
        results[name] = search_table(w, scores, energy, sparsity.n, sparsity.m, args.calib_seed,
                                     tuple(args.trials))
        r = results[name]
        print(name, f"original {r['original']:.4f} unstructured {r['unstructured']:.4f}",
              " ".join(f"{k}={v['dropped']:.4f}({v['closed']:.2f})" for k, v in r["searches"].items()), flush=True)

    lines = [f"### {args.model}, {sparsity}, {args.criterion}: dropped share of W²·E[x²] under a free permutation of "
             f"one matrix (calibration seed {args.calib_seed}, torch threads {torch.get_num_threads()})", "",
             "| linear | original | unstructured | " + " | ".join(SEARCHES) + " |",
             "|---|---|---|" + "---|" * len(SEARCHES)]
    for name, r in results.items():
        cells = [f"{r['searches'][s]['dropped']:.4f} ({r['searches'][s]['closed']:.2f}, "
                 f"{r['searches'][s]['seconds']:.1f} s)" for s in SEARCHES]
        lines.append(f"| {name} | {r['original']:.4f} | {r['unstructured']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Cell: dropped share (gap closed = (original − x) / (original − unstructured), search seconds, "
              "cumulative for the exchange rows). The exchanges are `math.search.diagonal_exchanges`, the learned "
              f"default's search; budgets {args.trials[0]} and {args.trials[1]} trials."]
    out = {"model": args.model, "sparsity": str(sparsity), "criterion": args.criterion, "calib_seed": args.calib_seed,
           "results": results, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "command": " ".join(["python", "benchmarks/search_convergence.py"] + sys.argv[1:])}
    model_tag = Path(args.model).name if os.sep in args.model else args.model  # an HF folder: its name
    stem = f"search_convergence_{model_tag}_{str(sparsity).replace(':', 'of')}_{args.criterion}{args.tag}"
    write_results(stem, out, lines, args.out_dir)


if __name__ == "__main__":
    run_main(main)
