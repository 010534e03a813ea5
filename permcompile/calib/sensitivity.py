"""How much each output channel of each linear layer matters to the model's end result (``--search task_loss=true``).

Why: the search strategy minimises the output error of each pruned layer, ``||δy||²``, which counts an
error in every output channel alike. The end metric does not: to second order the task loss grows by
``½ Σ_r F_r E[δy_r²]`` where ``F_r = E[(∂L/∂y_r)²]`` is the diagonal (empirical) Fisher information of
output channel ``r``. Weighting each output row of the layer-error objective by ``F_r`` turns it into that
end-to-end estimate (the mask choice is per row, so it is unchanged by the weights).

The task loss ``L``: next-token cross-entropy on the calibration text for causal LMs; for encoders and
vision backbones, whose task is unknown, the distillation loss of the final hidden states, whose
Gauss-Newton diagonal is estimated with random output directions (``L = vᵀ y``, ``v ~ N(0, I)``, so
``E[(∂L/∂y_r)²]`` is the squared norm of row ``r`` of the output Jacobian).

One forward and backward pass per calibration batch; parameters get no gradients, only ``[out]`` vectors
are kept per layer.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import nn

from ..modelio import main_output


def output_sensitivity(model: nn.Module, batches: Iterable[dict], modules: list[str], family: str, *,
                       forward_kwargs: dict | None = None, seed: int = 0,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the task loss w.r.t. each output channel of each module in ``modules``.

    Returns ``{module: float32 [out]}`` (mean over non-padded tokens).
    """
    batches = list(batches)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_ref: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def fn(_mod, _args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:
                out = out.detach().requires_grad_()  # a leaf: gradients stop here, not in the weights

            def on_grad(g):
                g = g.detach().float()
                mask = mask_ref["mask"]
                if mask is not None and g.dim() == 3 and g.shape[:2] == mask.shape:
                    g = g[mask.bool()]
                g = g.reshape(-1, g.shape[-1])
                sq = g.square().sum(0).double()
                sums[name] = sums[name] + sq if name in sums else sq
                counts[name] = counts.get(name, 0) + g.shape[0]

            out.register_hook(on_grad)
            return out
        return fn

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="sensitivity", unit="batch", file=sys.stderr, leave=False)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for b in batches:
            mask_ref["mask"] = b.get("attention_mask")
            with torch.enable_grad():
                out = model(**b, **(forward_kwargs or {}))
                loss = _task_loss(out, b, family, gen)
                if loss.requires_grad:
                    loss.backward()
            if bar:
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if bar:
            bar.close()
    return {name: (sums[name] / max(1, counts[name])).float() for name in sums}


def _task_loss(out, batch: dict, family: str, gen: torch.Generator) -> torch.Tensor:
    y = main_output(out)
    mask = batch.get("attention_mask")
    if family == "causal-lm" and "input_ids" in batch and y.dim() == 3:
        labels = batch["input_ids"][:, 1:]
        logits = y[:, :-1].float()
        keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)
        return nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    v = torch.randn(tuple(y.shape), generator=gen).to(y.device, y.dtype)
    if mask is not None and y.dim() == 3 and y.shape[:2] == mask.shape:
        v = v * mask[..., None].to(v.dtype)
    return (y * v).sum()
