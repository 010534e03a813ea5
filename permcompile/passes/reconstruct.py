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

import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..calib.blocks import model_hessians, stream_hessians
from ..calib.distributed import same_on_every_rank
from ..config import ReconstructConfig
from ..math.nm import criterion_scores, is_nm
from ..math.obs import (HessianAccumulator, all_finite, choose_update, dampened_inverse_cholesky, output_error,
                        refit_masked_, shrink_, sparsegpt_nm_)
from .checkpoint import Checkpoints, PassCheckpoint
from .sparsify import LinearInfo, MaskResult, check_nm, weight_kout


def _act_norm_from(h: torch.Tensor, count: int) -> torch.Tensor:
    """``||X_j||₂`` of each input channel, from ``XᵀX / tokens`` (the Wanda/RIA activation term)."""
    return (torch.diagonal(h).clamp_min(0) * count).sqrt()


def _reconstruct_linear(model: nn.Module, info: LinearInfo, acc: HessianAccumulator, criterion: str, n: int,
                        m: int, cfg: ReconstructConfig, device, factors: list | None = None,
                        share_next: bool = True, quant=None, separate: bool = False) -> dict:
    """Prune one linear to N:M with OBS updates (in place); returns its record (errors before/after).

    ``acc`` is spent (its buffer becomes the Hessian). With a held-out part (``acc.heldout``) the update is first
    fitted without it and scored on it (:func:`math.obs.choose_update`): the least shrinkage that beats the mask
    alone there is used, or the mask alone when none does (``separate``: the held-out part is reference data
    outside ``acc``'s Hessian, not a part of it). ``factors`` caches ``(H, Cholesky factor of H⁻¹)``
    pairs: siblings reading one input (q/k/v) share one; ``share_next=False`` (the next layer reads another
    input) drops it before the refit."""
    from ..math.nm import nm_mask

    view = weight_kout(model, info)
    w_ref = view.detach().to(device, torch.float32)
    h = acc.hessian(release=True).to(device)
    if not all_finite(h):
        from ..errors import UsageError

        raise UsageError(f"the calibration inputs of {info.module} are not finite (NaN/Inf activations)")
    act = _act_norm_from(h, acc.count)
    crit = criterion_scores(criterion, w_ref, act if criterion != "magnitude" else None)
    total = output_error(w_ref, torch.zeros_like(w_ref), h)
    masked = w_ref * nm_mask(crit, n, m)
    err_mask = output_error(w_ref, masked, h)
    shrink, heldout = cfg.shrink, None
    held = acc.heldout
    if cfg.heldout != "none" and held is not None and held.count > 0 and (separate or held.count < acc.count):
        h_val = held.moment(release=True).to(device)  # rows where fewer than K tokens were held out
        if separate:  # reference batches, never part of H: the whole H is what the update is fitted on
            shrink, errors = choose_update(w_ref, h, h_val, crit, n, m, cfg.shrink_steps(), damp=cfg.damp,
                                           refit_iters=cfg.refit_iters)
        else:
            fit = acc.count - held.count
            h_val.add_to_(h.mul_(acc.count), -held.count).div_(fit)  # the fitted part, in H's own buffer
            shrink, errors = choose_update(w_ref, h, h_val, crit, n, m, cfg.shrink_steps(), damp=cfg.damp,
                                           refit_iters=cfg.refit_iters)
            h_val.add_to_(h.mul_(fit), held.count).div_(acc.count)  # back to the whole
        del h_val
        chosen = "mask" if shrink is None else f"shrink={shrink:g}"
        heldout = {"tokens": held.count, "choice": chosen, "rel_error_mask_only": errors["mask"],
                   "rel_error_reconstructed": errors[chosen], "tried": errors}
    if shrink is None:  # no update carried over to the held-out inputs: the mask alone
        w, keep = masked, nm_mask(crit, n, m)
        if quant is not None:  # on the grid the dense row fixes, as the update would have been
            quant.start(info.module, w_ref)
            quant.finish_(info.module, w)
        err_after = output_error(w_ref, w, h)
    else:
        del masked
        shrink_(h, shrink)
        u = None
        if factors is not None:  # siblings (q/k/v) come one after another: only the last factor is kept
            u = next((f for hh, f in factors if hh.shape == h.shape and torch.equal(hh, h)), None)
            if u is None:
                factors.clear()  # before the next K×K factor is built
                u = dampened_inverse_cholesky(h, cfg.damp)
                factors.append((h, u))
        w = w_ref.clone()
        # --quantize (passes.quantize.JointQuant): each kept column rounded to its grid before its error spreads
        keep = sparsegpt_nm_(w, h, n, m, damp=cfg.damp, block=cfg.block,
                             scores=crit if cfg.mask == "criterion" else None, hinv_chol=u,
                             quantize=quant.start(info.module, w_ref) if quant is not None else None)
        if not share_next and factors is not None:
            factors.clear()
            u = None
        if cfg.refit_iters and (quant is None or quant.refit == "requantize"):
            refit_masked_(w, w_ref, keep, h, iters=cfg.refit_iters, damp=cfg.damp)
        if quant is not None:  # the refit moved weights off the grid
            quant.finish_(info.module, w)
        # the error on the calibration inputs as they are: H = (H_ρ − ρ·diag H) / (1 − ρ), so no K×K copy is made
        # and H_ρ stays as the sibling cache holds it
        err_after = output_error(w_ref, w, h)
        if shrink:
            d = w_ref - w
            err_after = (err_after - shrink * float((d * d * torch.diagonal(h).unsqueeze(0)).sum())) / (1 - shrink)
    if not all_finite(w):
        raise RuntimeError(f"reconstruction of {info.module} produced non-finite weights")
    view.copy_(w.to(view.device, view.dtype))
    crit_total = float(crit.sum())
    record = {"module": info.module, "tokens": acc.count,
              "kept_importance": float((crit * keep).sum()) / crit_total if crit_total else 1.0,
              "rel_error_mask_only": err_mask / total if total > 0 else 0.0,
              "rel_error_reconstructed": err_after / total if total > 0 else 0.0,
              "shrink": shrink}
    if heldout is not None:
        record["heldout"] = heldout
    return record


def heldout_batches(batches: list, mode: str):
    """``block index -> batch indices`` that block holds out of the update's fit, or None (no held-out check).

    Batches labelled with several kinds of text (``batches.sources``, calib/data.py) hold out one kind per block,
    in turn: the check then asks whether an update fitted on some kinds carries over to another, which is what a
    user's traffic asks of it. Otherwise a quarter of the batches, in turn (at least two batches needed)."""
    # several processes: each holds a share of the batches; the choice depends on the whole set only, so every
    # process makes the same one (and the held-out sums add up to one process's)
    total = getattr(batches, "total", None) or len(batches)
    positions = getattr(batches, "positions", None) or list(range(len(batches)))
    if mode == "none" or getattr(batches, "reference", None) or total < 2:
        return None
    sources = list(getattr(batches, "sources", None) or [])
    kinds = sorted(set(sources)) if len(sources) == len(batches) else []
    if getattr(batches, "documents", None) != 1 and len(kinds) >= 2:
        return lambda block: {i for i, s in enumerate(sources) if s == kinds[block % len(kinds)]}
    k = min(4, total)
    return lambda block: {i for i, pos in enumerate(positions) if pos % k == block % k}


STATE_FILE = "progress.json"


class _BlockState:
    """Per-block state of a reconstruction in a :class:`PassCheckpoint` folder, so an interrupted run resumes at the
    next block: ``progress.json`` (content digest, blocks done, per-layer records; written last),
    ``block_NNNN.safetensors`` (the reconstructed weights of each finished block) and ``inputs.safetensors`` (the
    next block's inputs, one tensor per batch). Safetensors and JSON only: nothing in the folder is executed or
    unpickled."""

    @staticmethod
    def read(path: Path) -> tuple[dict, str | None]:
        state = json.loads(path.read_text(encoding="utf-8"))
        return {"done": int(state["done"]), "records": dict(state["records"])}, state.get("digest")

    @staticmethod
    def restore(ckpt: PassCheckpoint, model: nn.Module, done: int) -> list:
        """Copy the finished blocks' weights into ``model``; returns the next block's inputs."""
        from safetensors.torch import load_file

        with ckpt.reading():
            params = dict(model.named_parameters())
            for i in range(done):
                for name, t in load_file(str(ckpt.folder / f"block_{i:04d}.safetensors")).items():
                    params[name].data.copy_(t.to(params[name].dtype))
            inputs = load_file(str(ckpt.folder / "inputs.safetensors"))
            return [inputs[f"batch_{i}"] for i in range(len(inputs))]

    @staticmethod
    def write(folder: Path, index: int, weights: dict, records: dict, hidden: list, digest: str) -> None:
        from safetensors.torch import save_file

        from .checkpoint import write_atomic

        write_atomic(folder / f"block_{index:04d}.safetensors", lambda p: save_file(weights, str(p)))
        write_atomic(folder / "inputs.safetensors", lambda p: save_file(
            {f"batch_{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}, str(p)))
        write_atomic(folder / STATE_FILE, lambda p: p.write_text(json.dumps(
            {"digest": digest, "done": index + 1, "records": records})))


def checkpoint_digest(model: nn.Module, linears: list[LinearInfo], batches: list[dict], criterion: str, n: int,
                      m: int, config: ReconstructConfig, quantize=None) -> str:
    """What a reconstruction depends on: the (folded, still dense) weights, the data and every setting."""
    from .checkpoint import content_digest

    settings = {"pass": "reconstruct", "criterion": criterion, "n": n, "m": m, "config": config.__dict__,
                "pruned": [i.param for i in linears if i.prune]}
    if quantize is not None:  # --quantize rounds as it prunes (passes.quantize.JointQuant)
        settings["quantize"] = [quantize.fmt.name, str(quantize.scale_dtype), quantize.refit]
    return content_digest(model, batches, settings)


@torch.no_grad()
def reconstruct_(model: nn.Module, linears: list[LinearInfo], batches: list[dict], criterion: str,
                 n: int, m: int, *, forward_kwargs: dict | None = None, config: ReconstructConfig | None = None,
                 device: str = "cpu", quiet: bool = True, checkpoints: Checkpoints | None = None,
                 quantize=None) -> MaskResult:
    """Prune every ``info.prune`` linear of ``model`` to N:M along K with OBS reconstruction, in place.

    ``batches`` are the calibration batches (masks by ``criterion`` use each block's own inputs). Post-conditions:
    every pruned weight is N:M along K in stored order and finite; layers left dense are untouched. Returns the
    same record as :func:`passes.sparsify.apply_masks_`, each pruned layer with its relative output error with
    the mask alone and after reconstruction.

    ``checkpoints``: where each finished block is saved and (``--resume``) continued from, to the result of an
    uninterrupted run; None: no checkpoint.
    """
    config = config or ReconstructConfig()
    result = MaskResult()
    by_module = {i.module: i for i in linears if i.prune}
    for info in linears:
        if not info.prune:
            result.dense.append({"module": info.module, "param": info.param, "reason": info.reason})
    records: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    ckpt, start, hidden = None, 0, None
    if checkpoints is not None:
        ckpt = checkpoints.open("reconstruct", checkpoint_digest(model, linears, batches, criterion, n, m, config,
                                                                 quantize), STATE_FILE)
        saved = ckpt.load(_BlockState.read)
        if saved is not None:
            start, records = saved["done"], saved["records"]
            if quantize is not None:  # the restored blocks' grids: fixed from the dense weights, as the pass does
                for info in by_module.values():
                    quantize.start(info.module, weight_kout(model, info))
            hidden = _BlockState.restore(ckpt, model, start)
            ckpt.saved = f"{start} reconstructed blocks are"
        if checkpoints.resume:
            # several processes: each restored its own checkpoint (its share of the batches); all must agree
            same_on_every_rank(start, f"--resume: the processes' reconstruction checkpoints hold different "
                                      f"numbers of finished blocks (this one {start}); rerun without --resume")
        if not quiet and start:
            print(f"[permcompile] --resume: the reconstruction continues after {start} finished blocks from "
                  f"{ckpt.folder}", file=sys.stderr)

    def block_done(index: int, block: str, next_inputs: list) -> None:
        if ckpt is not None:
            params = [by_module[x].param for x in by_module if x.startswith(block + ".")]
            named = dict(model.named_parameters())
            ckpt.save(lambda folder: _BlockState.write(
                folder, index, {p: named[p].detach().cpu().contiguous() for p in params}, records, next_inputs,
                ckpt.digest), f"{index + 1} reconstructed blocks are")

    # sequential: each block's inputs come from the blocks before it already pruned and reconstructed
    # reference batches (calib/data.py::with_reference): only ever checked on, never fitted on
    reference = set(getattr(batches, "reference", None) or ())
    try:
        for _block, hessians in stream_hessians(model, batches, list(by_module), forward_kwargs=forward_kwargs,
                                                device=device, rerun=True, desc="reconstruct", quiet=quiet,
                                                start=start, hidden=hidden, on_block_done=block_done,
                                                heldout=heldout_batches(batches, config.heldout),
                                                validation=reference):
            factors: list = []
            names = list(hessians)
            for i, name in enumerate(names):
                # siblings (q/k/v) come one after another and read one input: the next may reuse the factor
                share = i + 1 < len(names) and hessians[names[i + 1]].k == hessians[name].k
                records[name] = _reconstruct_linear(model, by_module[name], hessians.pop(name), criterion, n, m,
                                                    config, device, factors, share_next=share, quant=quantize,
                                                    separate=bool(reference))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the CLI's error line says how to go on
        if ckpt is not None:
            ckpt.hint(exc)
        raise
    rest = [x for x in by_module if x not in records]
    if rest:  # outside the repeated blocks (a pooler, say): one pass over the whole, already pruned, model
        fitted = [b for i, b in enumerate(batches) if i not in reference]
        hessians = model_hessians(model, fitted, rest, forward_kwargs=forward_kwargs)
        home = next(model.parameters()).device
        for name in rest:
            if name not in hessians or hessians[name].count == 0:
                raise RuntimeError(f"{name} never ran on the calibration batches: cannot reconstruct it")
            records[name] = _reconstruct_linear(model, by_module[name], hessians.pop(name), criterion, n, m,
                                                config, home, quant=quantize)
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
                                                                     "rel_error_reconstructed", "shrink", "heldout")
                                                 if k in rec}})
    check_nm(model, linears, n, m)
    if quantize is not None:  # the grids the weights are on (passes.quantize.JointQuant), for the quantize step
        result.weight_scales = quantize.scales
    return result


__all__ = ["reconstruct_"]
