"""Per-input-channel activation statistics of every linear layer, streamed over calibration batches.

For each ``nn.Linear`` and transformers ``Conv1D`` (weight ``[K, out]``) a forward pre-hook accumulates, per
input channel j, the sum of squares ``sum_t x[t, j]^2`` over all (non-padded) tokens t (squares in fp32, sums in
float64). Only ``[K]`` vectors are kept, so memory does not grow with the amount of calibration data.
``ChannelStats.norm`` is then ``||X_j||_2`` as used by Wanda-style scores ``|W_ij| * ||X_j||_2``.

Padded tokens are excluded when a batch carries an ``attention_mask`` whose shape matches the leading
dimensions of a layer's input (``[B, S, K]`` against ``[B, S]``); inputs of other shapes (pooled ``[B, K]``
heads, for instance) count every row.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn



@dataclass
class ChannelStats:
    """Accumulated statistics of one layer's input channels (all tensors float64 on CPU, shape [K])."""

    sum_sq: torch.Tensor
    count: int = 0
    sum: torch.Tensor | None = None

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each input channel over all calibration tokens, float32 [K]."""
        return self.sum_sq.clamp_min(0).sqrt().float()

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x²] of each input channel, float32 [K] (the diagonal of the input Gram over the token count)."""
        return (self.sum_sq / max(self.count, 1)).float()

    @property
    def rms(self) -> torch.Tensor:
        """Root-mean-square of each input channel, float32 [K]."""
        return (self.sum_sq / max(self.count, 1)).clamp_min(0).sqrt().float()

    @property
    def mean(self) -> torch.Tensor | None:
        """Mean of each input channel (only when collected with ``track_mean=True``), float32 [K]."""
        return None if self.sum is None else (self.sum / max(self.count, 1)).float()

    @property
    def size(self) -> int:
        return int(self.sum_sq.numel())


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` in ``model``, by FQN."""
    conv1d: tuple[type, ...] = ()
    try:
        from transformers.pytorch_utils import Conv1D

        conv1d = (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, *conv1d))}


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(module.weight.shape[0])  # Conv1D: weight [K, out]


def _accepts(module_filter: Any, name: str, module: nn.Module) -> bool:
    if module_filter is None:
        return True
    if callable(module_filter):
        return bool(module_filter(name, module))
    return name in module_filter


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class StopForward(Exception):
    """Raised by a hook to end a calibration forward pass early (after the last layer we need)."""


def _stop(_module, _args):
    raise StopForward


@torch.no_grad()
def collect_input_stats(model: Any, batches: Iterable[dict[str, torch.Tensor]], module_filter: Any = None,
                        device: str | torch.device = "cpu", progress: bool = True, *, track_mean: bool = False,
                        forward_kwargs: dict[str, Any] | None = None,
                        stop_at: Iterable[str] = ()) -> dict[str, ChannelStats]:
    """Run ``model`` over ``batches`` and return input-channel statistics keyed by module FQN.

    ``model`` is an ``nn.Module`` or a :class:`permcompile.models.LoadedModel` (whose ``forward_kwargs()``, e.g.
    ``use_cache=False``, are then passed to every call). ``module_filter`` is a callable ``(name, module) ->
    bool`` or a collection of FQNs. Modules that never ran are left out of the result. The model is moved to
    ``device`` for the run and back afterwards. ``stop_at`` names modules (e.g. an LM head, run last and
    not pruned) at which each forward pass is cut short: their outputs are never needed here.
    """
    extra: dict[str, Any] = {}
    if not isinstance(model, nn.Module) and hasattr(model, "model"):
        extra.update(model.forward_kwargs() if hasattr(model, "forward_kwargs") else {})
        model = model.model
    extra.update(forward_kwargs or {})
    device = torch.device(device)
    acc_dtype = torch.float64 if device.type != "mps" else torch.float32

    targets = {n: m for n, m in linear_layers(model).items() if _accepts(module_filter, n, m)}
    sums_sq: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(name: str, k: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if not torch.is_tensor(x) or x.shape[-1] != k:
                return None
            mask = state["mask"]
            if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
                rows = x[mask]
            else:
                rows = x.reshape(-1, k)
            rows = rows.detach()
            if rows.dtype not in (torch.float32, torch.float64):
                rows = rows.float()  # fp16/bf16 squares overflow or lose precision
            if name not in sums_sq:
                sums_sq[name] = torch.zeros(k, dtype=acc_dtype, device=rows.device)
                counts[name] = 0
                if track_mean:
                    sums[name] = torch.zeros(k, dtype=acc_dtype, device=rows.device)
            # squares in the activation precision (fp32), reduction and accumulation in fp64
            # per-batch sums in fp32 (a few thousand rows at most), accumulation across batches in fp64
            sums_sq[name] += rows.square().sum(0).to(acc_dtype)
            counts[name] += int(rows.shape[0])
            if track_mean:
                sums[name] += rows.sum(0, dtype=acc_dtype)
            return None

        return hook

    params = list(model.parameters())
    original_device = params[0].device if params else device
    moved = original_device != device
    if moved:
        model.to(device)
    handles = [mod.register_forward_pre_hook(make_hook(n, in_features(mod)), with_kwargs=True)
               for n, mod in targets.items()]
    modules = dict(model.named_modules())
    for name in stop_at:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(_stop))
    try:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        iterator: Iterable = batches
        if progress and _is_tty():
            from tqdm.auto import tqdm

            iterator = tqdm(batches, total=total, desc="calibration", unit="batch", leave=False)
        for batch in iterator:
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            mask = inputs.get("attention_mask")
            state["mask"] = mask.bool() if torch.is_tensor(mask) and not bool(mask.bool().all()) else None
            try:
                model(**inputs, **extra)
            except StopForward:
                pass
    finally:
        state["mask"] = None
        for handle in handles:
            handle.remove()
        if moved:
            model.to(original_device)

    from .distributed import all_reduce_counts, all_reduce_sum_, world

    if world()[1] > 1:  # data parallel: every rank ends with the sums over all ranks' batches
        names = sorted(targets)
        for name in names:
            k = in_features(targets[name])
            sums_sq.setdefault(name, torch.zeros(k, dtype=acc_dtype))
            counts.setdefault(name, 0)
            if track_mean:
                sums.setdefault(name, torch.zeros(k, dtype=acc_dtype))
        all_reduce_sum_([sums_sq[n] for n in names])
        if track_mean:
            all_reduce_sum_([sums[n] for n in names])
        for name, c in zip(names, all_reduce_counts([counts[n] for n in names])):
            counts[name] = c
        for name in names:
            if counts[name] == 0:
                sums_sq.pop(name, None)
    return {
        name: ChannelStats(sum_sq=sums_sq[name].cpu().double(), count=counts[name],
                           sum=sums[name].cpu().double() if track_mean else None)
        for name in targets if name in sums_sq
    }
