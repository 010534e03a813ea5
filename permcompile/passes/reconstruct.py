"""Mask + reconstruct: N:M masks chosen and kept weights updated block by block (SparseGPT-style), in place.

Why: a mask alone throws the pruned weights' contribution away; updating the kept weights of the same row to
absorb it (optimal brain surgeon with the layer-input Hessian ``H = XᵀX``) recovers most of the loss, and
the update happens in *stored* order after the permutations were folded, so every fold and N:M
post-condition still holds and the deployed graph gains no op.

How: the calibration batches are embedded once (the model runs up to its first Transformer block and is cut
there); then one block at a time: its pruned linears' Hessians are accumulated on the block's inputs, each
linear is pruned and updated (``math.obs``), its Hessian is dropped, and the block runs again on the same
inputs to produce the next block's inputs — from the pruned, reconstructed blocks before it, as SparseGPT
does. Only one block's inputs, outputs and Hessians are alive at a time; the block alone is moved to
``device`` (the model stays where it is). Pruned linears outside the repeated blocks (a pooler, say) are
handled last with one pass over the whole, already pruned, model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calib.stats import StopForward
from ..config import ReconstructConfig
from ..math.nm import criterion_scores, is_nm
from ..math.obs import HessianAccumulator, output_error, refit_masked_, sparsegpt_nm_
from .sparsify import LinearInfo, MaskResult, check_nm, weight_kout


@dataclass
class _BlockInputs:
    """Everything a block is called with, per calibration batch: the hidden states and the other arguments."""

    hidden: list = field(default_factory=list)  # tensors, one per batch
    args: list = field(default_factory=list)  # positional arguments after the hidden states
    kwargs: list = field(default_factory=list)
    positional: bool = True  # hidden states passed as args[0] (else as kwargs["hidden_states"])
    masks: list = field(default_factory=list)  # token masks [B, S] (None: every token counts)


def find_blocks(model: nn.Module, modules: set[str]) -> list[str]:
    """FQNs of the repeated Transformer blocks: the ``nn.ModuleList`` whose children hold most of ``modules``."""
    best, covered = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name:
            n = sum(1 for x in modules if x.startswith(name + "."))
            if n > covered:
                best, covered = name, n
    if best is None:
        return []
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2 and not bool(mask.bool().all()):
        return mask.bool()
    return None


@torch.no_grad()
def _embed(model: nn.Module, first_block: str, batches: list[dict], forward_kwargs: dict) -> _BlockInputs:
    """Run the model up to ``first_block`` on every batch and keep what the block is called with."""
    store = _BlockInputs()

    def grab(_mod, args, kwargs):
        if args:
            store.hidden.append(args[0])
            store.args.append(tuple(args[1:]))
            store.positional = True
        else:
            kwargs = dict(kwargs)
            store.hidden.append(kwargs.pop("hidden_states"))
            store.args.append(())
            store.positional = False
        store.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = model.get_submodule(first_block).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            store.masks.append(_token_mask(batch))
            try:
                model(**batch, **forward_kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(store.hidden) != len(batches):
        raise RuntimeError(f"the model never reached {first_block} on the calibration batches")
    return store


def _call_block(block: nn.Module, inputs: _BlockInputs, i: int, device) -> torch.Tensor:
    hidden = inputs.hidden[i].to(device)
    args, kwargs = _to(inputs.args[i], device), _to(inputs.kwargs[i], device)
    out = block(hidden, *args, **kwargs) if inputs.positional else block(*args, hidden_states=hidden, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not torch.is_tensor(out) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


class _HessianHooks:
    """Forward pre-hooks accumulating ``XᵀX`` of the named linears' inputs (padded tokens left out).

    Registered after any glue gather, so each Hessian is in the linear's stored column order."""

    def __init__(self, model: nn.Module, modules: list[str], device):
        self.acc: dict[str, HessianAccumulator] = {}
        self.mask: torch.Tensor | None = None
        self.handles = []
        for name in modules:
            mod = model.get_submodule(name)
            k = mod.in_features if isinstance(mod, nn.Linear) else int(mod.weight.shape[0])
            self.acc[name] = HessianAccumulator(k, device)
            self.handles.append(mod.register_forward_pre_hook(self._hook(name, k)))

    def _hook(self, name: str, k: int):
        def fn(_mod, args):
            x = args[0]
            if not torch.is_tensor(x) or x.shape[-1] != k:
                return
            mask = self.mask
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            self.acc[name].add(x.detach())
            return

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _act_norm_from(h: torch.Tensor, count: int) -> torch.Tensor:
    """``||X_j||₂`` of each input channel, from ``XᵀX / tokens`` (the Wanda/RIA activation term)."""
    return (torch.diagonal(h).clamp_min(0) * count).sqrt()


def _reconstruct_linear(model: nn.Module, info: LinearInfo, acc: HessianAccumulator, criterion: str, n: int,
                        m: int, cfg: ReconstructConfig, device) -> dict:
    """Prune one linear to N:M with OBS updates (in place); returns its record (errors before/after)."""
    view = weight_kout(model, info)
    w_ref = view.detach().to(device, torch.float32)
    h = acc.hessian().to(device)
    if not bool(torch.isfinite(h).all()):
        from ..errors import UsageError

        raise UsageError(f"the calibration inputs of {info.module} are not finite (NaN/Inf activations)")
    act = _act_norm_from(h, acc.count)
    crit = criterion_scores(criterion, w_ref, act if criterion != "magnitude" else None)
    from ..math.nm import nm_mask

    masked = w_ref * nm_mask(crit, n, m)
    total = output_error(w_ref, torch.zeros_like(w_ref), h)
    err_mask = output_error(w_ref, masked, h)
    w = w_ref.clone()
    keep = sparsegpt_nm_(w, h, n, m, damp=cfg.damp, block=cfg.block,
                         scores=crit if cfg.mask == "criterion" else None)
    if cfg.refit_iters:
        refit_masked_(w, w_ref, keep, h, iters=cfg.refit_iters, damp=cfg.damp)
    err_after = output_error(w_ref, w, h)
    if not bool(torch.isfinite(w).all()):
        raise RuntimeError(f"reconstruction of {info.module} produced non-finite weights")
    view.copy_(w.to(view.device, view.dtype))
    crit_total = float(crit.sum())
    return {"module": info.module, "tokens": acc.count,
            "kept_importance": float((crit * keep).sum()) / crit_total if crit_total else 1.0,
            "rel_error_mask_only": err_mask / total if total > 0 else 0.0,
            "rel_error_reconstructed": err_after / total if total > 0 else 0.0}


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="reconstruct", unit="block", file=sys.stderr, leave=False)


@torch.no_grad()
def reconstruct_(model: nn.Module, linears: list[LinearInfo], batches: list[dict], criterion: str,
                 n: int, m: int, *, forward_kwargs: dict | None = None, config: ReconstructConfig | None = None,
                 device: str = "cpu", quiet: bool = True) -> MaskResult:
    """Prune every ``info.prune`` linear of ``model`` to N:M along K with OBS reconstruction, in place.

    ``batches`` are the calibration batches (masks by ``criterion`` use each block's own inputs).
    Post-conditions: every pruned weight is N:M along K in stored order and finite;
    layers left dense are untouched. Returns the same record as :func:`passes.sparsify.apply_masks_`, each
    pruned layer with its relative output error with the mask alone and after reconstruction.
    """
    forward_kwargs = forward_kwargs or {}
    config = config or ReconstructConfig()
    device = torch.device(device)
    result = MaskResult()
    by_module = {i.module: i for i in linears if i.prune}
    for info in linears:
        if not info.prune:
            result.dense.append({"module": info.module, "param": info.param, "reason": info.reason})
    records: dict[str, dict] = {}
    blocks = find_blocks(model, set(by_module))
    in_blocks = {b: [x for x in by_module if x.startswith(b + ".")] for b in blocks}
    done: set[str] = set()
    was_training = model.training
    model.eval()
    if blocks:
        inputs = _embed(model, blocks[0], batches, forward_kwargs)
        bar = _progress(len(blocks), quiet)
        for b in blocks:
            block = model.get_submodule(b)
            home = next(block.parameters()).device
            block.to(device)
            names = in_blocks[b]
            hooks = _HessianHooks(model, names, device)
            try:
                for i in range(len(inputs.hidden)):
                    hooks.mask = inputs.masks[i]
                    _call_block(block, inputs, i, device)
            finally:
                hooks.close()
            for name in names:
                records[name] = _reconstruct_linear(model, by_module[name], hooks.acc.pop(name), criterion, n, m,
                                                    config, device)
                done.add(name)
            del hooks
            # the next block's inputs come from this block pruned and reconstructed
            inputs.hidden = [_call_block(block, inputs, i, device).to(inputs.hidden[i].device)
                             for i in range(len(inputs.hidden))]
            block.to(home)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(b)
        if bar is not None:
            bar.close()
        del inputs
    rest = [x for x in by_module if x not in done]
    if rest:
        home = next(model.parameters()).device
        hooks = _HessianHooks(model, rest, home)
        try:
            for batch in batches:
                hooks.mask = _token_mask(batch)
                model(**batch, **forward_kwargs)
        finally:
            hooks.close()
        for name in rest:
            if name not in hooks.acc or hooks.acc[name].count == 0:
                raise RuntimeError(f"{name} never ran on the calibration batches: cannot reconstruct it")
            records[name] = _reconstruct_linear(model, by_module[name], hooks.acc.pop(name), criterion, n, m,
                                                config, home)
    model.train(was_training)
    for info in linears:
        if not info.prune:
            continue
        w = weight_kout(model, info)
        if not is_nm(w, n, m):
            raise AssertionError(f"{info.module}: weight not {n}:{m} along K after reconstruction")
        rec = records[info.module]
        result.layers.append({"module": info.module, "param": info.param, "shape": list(info.shape), "k": info.k,
                              "sparsity": float((w == 0).float().mean()), "kept_importance": rec["kept_importance"],
                              "reconstruction": {k: rec[k] for k in ("tokens", "rel_error_mask_only",
                                                                     "rel_error_reconstructed")}})
    check_nm(model, linears, n, m)
    return result


__all__ = ["find_blocks", "reconstruct_"]
