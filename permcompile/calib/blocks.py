"""Block streaming: run calibration data through a Transformer one block at a time (Wanda/SparseGPT style).

The model runs once up to its first repeated block (the embeddings) and is cut there; from then on each
block is called alone on the stored inputs of the block before it, so only one block's inputs, outputs and
per-layer statistics are alive at a time, and only that block needs to sit on the compute device. Callers
may change a block's weights between seeing its statistics and the next block (sequential pruning: the
next block's inputs then come from the changed block).

Data: :func:`find_blocks` names the blocks; :func:`stream_hessians` yields each block's layer-input
Hessians ``XᵀX`` (padded tokens left out, after any glue gather, so in each linear's stored column order);
:func:`model_hessians` does the same with whole-model forwards for linears outside the blocks.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..math.obs import HessianAccumulator, inverse_diagonal
from .stats import ChannelStats, StopForward

@dataclass
class BlockInputs:
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
def _embed(model: nn.Module, first_block: str, batches: list[dict], forward_kwargs: dict) -> BlockInputs:
    """Run the model up to ``first_block`` on every batch and keep what the block is called with."""
    store = BlockInputs()

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


def _call_block(block: nn.Module, inputs: BlockInputs, i: int, device) -> torch.Tensor:
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

    def __init__(self, model: nn.Module, modules: list[str], device, diagonal: bool = False,
                 heldout: bool = False):
        self.acc: dict[str, HessianAccumulator] = {}
        self.mask: torch.Tensor | None = None
        self.holding_out = False  # the current batch belongs to the held-out part too
        self.validating = False  # the current batch belongs to the held-out part only (never fitted on)
        self._last = None  # (input tensor, its XᵀX, its token count): siblings share one product
        self.handles = []
        for name in modules:
            mod = model.get_submodule(name)
            k = mod.in_features if isinstance(mod, nn.Linear) else int(mod.weight.shape[0])
            # the held-out part is a few batches: kept as rows while they are smaller than a K×K matrix
            held = HessianAccumulator(k, device, diagonal, keep_rows=True) if heldout else None
            self.acc[name] = HessianAccumulator(k, device, diagonal, heldout=held)
            self.handles.append(mod.register_forward_pre_hook(self._hook(name, k)))

    def _hook(self, name: str, k: int):
        def fn(_mod, args):
            x = args[0]
            if not torch.is_tensor(x) or x.shape[-1] != k:
                return
            acc = self.acc[name]
            last = self._last
            if last is not None and last[0] is x:  # a sibling (q/k/v, gate/up) read this very tensor
                product, count, rows = last[1], last[2], last[3]
            else:
                mask = self.mask
                rows = x[mask.to(x.device)] if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape) else x
                held = (self.holding_out or self.validating) and acc.heldout is not None
                # float32 once, so the siblings' held-out accumulators share these rows
                rows = rows.detach().reshape(-1, k).to(acc.device, torch.float32) if held else rows.detach()
                product, count = acc.product(rows)
                self._last = (x, product, count, rows if held else None)
            if not self.validating:
                acc.add_product(product, count)
            if (self.holding_out or self.validating) and acc.heldout is not None:
                acc.heldout.add_product(product, count, rows)

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _reduce_(accs: dict[str, HessianAccumulator]) -> None:
    """Sum the Hessians and token counts over data-parallel ranks (a no-op in one process)."""
    from .distributed import all_reduce_counts, all_reduce_sum_, world

    if world()[1] == 1:
        return

    names = sorted(accs)
    all_reduce_sum_([accs[n].xtx for n in names])
    for n, c in zip(names, all_reduce_counts([accs[n].count for n in names])):
        accs[n].count = c
    held = {n: accs[n].heldout for n in names if accs[n].heldout is not None}
    if held:
        for acc in held.values():  # ranks' rows cannot be summed: their matrices can
            acc.to_matrix_()
        _reduce_(held)


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, leave=False)


@torch.no_grad()
def stream_hessians(model: nn.Module, batches: list[dict], modules: list[str], *, forward_kwargs: dict | None = None,
                    device: str | torch.device = "cpu", rerun: bool = True, desc: str = "blocks",
                    quiet: bool = True, start: int = 0, hidden: list | None = None,
                    on_block_done=None, diagonal: bool = False, heldout=None, validation: set | None = None
                    ) -> Iterator[tuple[str, dict[str, HessianAccumulator]]]:
    """For each block holding some of ``modules``: yield ``(block FQN, {module: HessianAccumulator})``.

    Each block is moved to ``device`` while it is processed and back afterwards. With ``rerun`` (the
    sequential mode) the block is run again after the caller resumes the generator, so the next block sees
    the outputs of this block *as the caller left it*; without, the outputs of the first pass are reused
    (statistics of the unchanged model, one pass per block). Modules outside every block are not visited:
    see :func:`model_hessians`.

    ``diagonal``: keep only ``diag(XᵀX)`` per linear (cheap; what Wanda/RIA scores need).

    Resuming: ``start`` skips the first blocks and ``hidden`` gives the inputs of block ``start`` (one tensor
    per batch, as passed to ``on_block_done(index, block FQN, next inputs)`` after each block).

    ``heldout(block index) -> set of batch indices``: those batches' ``XᵀX`` also go to each accumulator's
    ``heldout`` accumulator (the whole Hessian still counts every batch). ``validation``: batch indices whose
    ``XᵀX`` go to the ``heldout`` accumulator only (data to check an update on, never to fit it on).
    """
    forward_kwargs = forward_kwargs or {}
    device = torch.device(device)
    blocks = find_blocks(model, set(modules))
    if not blocks:
        return
    inputs = _embed(model, blocks[0], batches, forward_kwargs)
    if start:
        if hidden is None or len(hidden) != len(inputs.hidden):
            raise ValueError("resuming needs the inputs of the first block to run, one tensor per batch")
        inputs.hidden = [h.to(x.device, x.dtype) for h, x in zip(hidden, inputs.hidden)]
    bar = _progress(len(blocks), desc, quiet)
    if bar is not None and start:
        bar.update(start)
    try:
        for index, name in enumerate(blocks):
            if index < start:
                continue
            block = model.get_submodule(name)
            home = next(block.parameters()).device
            block.to(device)
            inside = [x for x in modules if x.startswith(name + ".")]
            held = heldout(index) if heldout is not None else set()
            # every process makes the held-out accumulators (summed across processes) even when it holds none out
            hooks = _HessianHooks(model, inside, device, diagonal, heldout=heldout is not None or bool(validation))
            outputs = []
            try:
                for i in range(len(inputs.hidden)):
                    hooks.mask = inputs.masks[i]
                    hooks.holding_out = i in held
                    hooks.validating = bool(validation) and i in validation
                    y = _call_block(block, inputs, i, device)
                    if not rerun:
                        outputs.append(y.to(inputs.hidden[i].device))
            finally:
                hooks.close()
            _reduce_(hooks.acc)
            yield name, hooks.acc
            del hooks
            if rerun:
                outputs = [_call_block(block, inputs, i, device).to(inputs.hidden[i].device)
                           for i in range(len(inputs.hidden))]
            inputs.hidden = outputs
            block.to(home)
            if on_block_done is not None:
                on_block_done(index, name, inputs.hidden)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def model_hessians(model: nn.Module, batches: list[dict], modules: list[str], *,
                   forward_kwargs: dict | None = None, diagonal: bool = False) -> dict[str, HessianAccumulator]:
    """Layer-input Hessians of ``modules`` from whole-model forwards (for linears outside the blocks)."""
    home = next(model.parameters()).device
    hooks = _HessianHooks(model, modules, home, diagonal)
    try:
        for batch in batches:
            hooks.mask = _token_mask(batch)
            model(**batch, **(forward_kwargs or {}))
    finally:
        hooks.close()
    _reduce_(hooks.acc)
    return hooks.acc


def obs_stats(model: nn.Module, batches: list[dict], modules: list[str], *, damp: float = 0.01,
              forward_kwargs: dict | None = None, device: str | torch.device = "cpu",
              quiet: bool = True) -> dict[str, ChannelStats]:
    """Per-channel OBS weights of every module's input: ``ChannelStats`` whose ``norm`` is ``1/√[H⁻¹]ⱼⱼ``.

    Used in place of the activation norms, a Wanda-style score ``|W_ij| · norm_j`` becomes the square root
    of the OBS cost ``W_ij² / [H⁻¹]ⱼⱼ`` of pruning that weight when the rest of its row compensates (the
    error left *after* reconstruction), so a permutation search on these statistics aims at the
    reconstructed model. The dense model's inputs, one block at a time; one K-vector kept per module.
    """
    out: dict[str, ChannelStats] = {}

    def keep(name: str, acc: HessianAccumulator) -> None:
        inv = inverse_diagonal(acc.hessian(), damp).cpu().double()
        out[name] = ChannelStats(sum_sq=1.0 / inv.clamp_min(1e-30), count=1)

    for _block, hessians in stream_hessians(model, batches, modules, forward_kwargs=forward_kwargs, device=device,
                                            rerun=False, desc="OBS statistics", quiet=quiet):
        for name in list(hessians):
            keep(name, hessians.pop(name))
    rest = [x for x in modules if x not in out]
    if rest:
        for name, acc in model_hessians(model, batches, rest, forward_kwargs=forward_kwargs).items():
            if acc.count:
                keep(name, acc)
    return out


def stream_channel_stats(model: nn.Module, batches: list[dict], modules: list[str], *,
                         forward_kwargs: dict | None = None, device: str | torch.device = "cpu",
                         quiet: bool = True) -> dict[str, ChannelStats]:
    """``collect_input_stats`` one block at a time: ``Σx²`` per input channel of each of ``modules`` with only
    the current block on ``device`` (the model stays where it is). Modules outside the blocks, if any, get one
    whole-model pass where the model lives."""
    out: dict[str, ChannelStats] = {}
    for _block, accs in stream_hessians(model, batches, modules, forward_kwargs=forward_kwargs, device=device,
                                        rerun=False, desc="calibration", quiet=quiet, diagonal=True):
        for name, acc in accs.items():
            if acc.count:
                out[name] = ChannelStats(sum_sq=acc.xtx.cpu().double(), count=acc.count)
    rest = [x for x in modules if x not in out and not any(x.startswith(b + ".") for b in
                                                             find_blocks(model, set(modules)))]
    if rest:
        for name, acc in model_hessians(model, batches, rest, forward_kwargs=forward_kwargs, diagonal=True).items():
            if acc.count:
                out[name] = ChannelStats(sum_sq=acc.xtx.cpu().double(), count=acc.count)
    return out
