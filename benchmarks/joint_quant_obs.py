"""Joint pruning + quantization inside the OBS pass vs rounding after it, per layer (issue 25, item 3).

For the first blocks' pruned linears of a model, on its calibration inputs (H = XᵀX): the relative layer-output
error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of 2:4 with
  * ``after``: OBS + refit (today's default), then each row rounded to its grid (scales from the dense row);
  * ``after_norefit``: OBS without refit, then rounded;
  * ``joint_requant``: OBS that rounds each kept column before spreading its error (GPTQ inside the mask),
    then the refit, then rounded again to the same grid (the refit moves weights off it);
  * ``joint_skip``: the joint OBS pass alone (no refit);
  * ``unquantized``: OBS + refit without quantization (the floor).
Usage: python benchmarks/joint_quant_obs.py [MODEL] [--layers N] [--format int8|fp8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from permcompile.calib.data import load_calibration
    from permcompile.math.obs import output_error, refit_masked_, sparsegpt_nm_
    from permcompile.math.quant import fake_quant, get_format, snap_rows, weight_scales
    from permcompile.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    net = loaded.model.float().eval()
    batches = load_calibration(None, loaded, args.samples, 128, 0)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 4 == 0
             and ("layer" in n) and "classifier" not in n and "lm_head" not in n][: args.layers]
    hs = {n: [torch.zeros(net.get_submodule(n).in_features, net.get_submodule(n).in_features), 0] for n in names}

    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            hs[name][0] += x.T @ x
            hs[name][1] += x.shape[0]
        return f

    handles = [net.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            net(**b, **loaded.forward_kwargs())
    for h in handles:
        h.remove()
    rows = []
    for fmt_name in ("int8", "fp8"):
        fmt = get_format(fmt_name)
        totals: dict[str, float] = {}
        for name in names:
            h = hs[name][0] / hs[name][1]
            w_ref = net.get_submodule(name).weight.detach().float()
            scale = weight_scales(w_ref, fmt)
            total = output_error(w_ref, torch.zeros_like(w_ref), h)

            def quant(col):
                return fake_quant(col, scale, fmt)

            res = {}
            w = w_ref.clone()
            keep = sparsegpt_nm_(w, h, 2, 4)
            refit_masked_(w, w_ref, keep, h, iters=30)
            res["unquantized"] = output_error(w_ref, w, h) / total
            res["after"] = output_error(w_ref, snap_rows(w, scale, fmt), h) / total
            w = w_ref.clone()
            keep = sparsegpt_nm_(w, h, 2, 4)
            res["after_norefit"] = output_error(w_ref, snap_rows(w, scale, fmt), h) / total
            w = w_ref.clone()
            keep = sparsegpt_nm_(w, h, 2, 4, quantize=quant)
            assert torch.equal(snap_rows(w, scale, fmt), w)
            res["joint_skip"] = output_error(w_ref, w, h) / total
            refit_masked_(w, w_ref, keep, h, iters=30)
            res["joint_requant"] = output_error(w_ref, snap_rows(w, scale, fmt), h) / total
            for k, v in res.items():
                totals[k] = totals.get(k, 0.0) + v / len(names)
            rows.append({"format": fmt_name, "layer": name, **res})
        print(fmt_name, "mean relative output error over", len(names), "layers:",
              {k: round(v, 5) for k, v in totals.items()}, flush=True)
        rows.append({"format": fmt_name, "layer": "MEAN", **totals})
    if args.out:
        from provenance import command_line, git_state, write_result  # noqa: PLC0415

        write_result(Path(args.out), {"rows": rows, "command": command_line("joint_quant_obs.py"),
                                      "git": git_state()})


if __name__ == "__main__":
    main()
