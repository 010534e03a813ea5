"""Diagnostic: how much of each attention-output / MLP-down input Gram matrix the first token of a window owns.

A decoder's first token (the attention sink) can carry activations orders of magnitude larger than the others;
where it does, the plain layer-output objective (``--objective output``) scores masks almost only on that token,
and its low-rank factor (99.9 % of the trace) can keep a single direction. ``--objective relative`` scales every
token to unit norm before the Gram. Columns: share of the Gram trace from position 0; mean squared norm of
position 0 over the others'; share of the trace in the top eigenvalue, with and without position 0. Example::

    python benchmarks/gram_token_share.py --data-dir ../shared/data/austen

Writes ``benchmarks/results/gram_token_share_<model>.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

import torch

from permcompile.calib.data import load_calibration
from permcompile.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_NOVELS = ("northanger_abbey.txt", "mansfield_park.txt", "sense_and_sensibility.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    loaded = load_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="pc-gram-"))
    for name in CALIB_NOVELS:
        if (Path(args.data_dir) / name).is_file():
            shutil.copy(Path(args.data_dir) / name, tmp / name)
    batches = load_calibration(str(tmp), loaded, args.samples, args.seq_len, args.seed)
    net = loaded.model
    acc: dict[str, list] = {}

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0].detach().double()  # [B, T, K]
            n2 = x.square().sum(-1)
            a = acc.setdefault(name, [0, 0, 0.0])
            a[0] = a[0] + torch.einsum("btk,btl->kl", x, x)
            a[1] = a[1] + torch.einsum("bk,bl->kl", x[:, 0], x[:, 0])
            a[2] = max(a[2], float(n2[:, 0].mean() / n2[:, 1:].mean()))
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in net.named_modules()
               if name.endswith(("o_proj", "down_proj", "out_proj", "fc2", "c_proj"))]
    with torch.no_grad():
        for b in batches:
            net(**b, **loaded.forward_kwargs())
    for h in handles:
        h.remove()
    lines = [f"### {args.model}: share of each layer's input Gram owned by the first token "
             f"({args.samples} windows x {args.seq_len} tokens, seed {args.seed})", "",
             "| module | trace share of position 0 | pos-0 / other mean sq. norm | top eigenvalue share | "
             "top eigenvalue share without pos 0 |", "|---|---|---|---|---|"]
    for name, (g, g0, ratio) in acc.items():
        ev, ev1 = torch.linalg.eigvalsh(g), torch.linalg.eigvalsh(g - g0)
        lines.append(f"| {name} | {float(torch.trace(g0) / torch.trace(g)):.3f} | {ratio:.1f} | "
                     f"{float(ev[-1] / ev.sum()):.3f} | {float(ev1[-1] / ev1.sum()):.3f} |")
    provenance = {"command": command_line("gram_token_share.py"), "git": git_state()}
    lines += [""] + provenance_lines(provenance)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    write_result(RESULTS / f"gram_token_share_{Path(args.model).name}.md", text, provenance)


if __name__ == "__main__":
    main()
