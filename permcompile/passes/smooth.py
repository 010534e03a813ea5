"""SmoothQuant diagonals folded into the weights, for INT8 activations (``QuantizeConfig.smooth_alpha``).

Why: an LLM's linear inputs have a few outlier channels, so one per-tensor INT8 scale wastes most of its range on
them. Dividing input channel j by ``s_j`` and multiplying the consumer's column j by ``s_j`` computes the same
function and moves the difficulty into the weights (per-channel scales absorb it there);
``s_j = max|X_j|^α / max|W_:j|^(1-α)`` (Xiao et al. 2023). The division is folded into whatever writes the channel,
so the deployed graph gains no op. A diagonal is a generalized permutation and the writers are the ones the
coupling analysis already found for permutations:

* a norm's output (q/k/v, gate/up): the norm's weight and bias (found by which norm output each pruned layer reads);
* an attention group (v_proj → o_proj): v's rows and bias, o's columns through the group's (GQA) index;
* an MLP group (act(gate) · up → down): the rows of *one* producer, the one outside the nonlinearity.

Unlike a permutation, a diagonal does not pass through everything a permutation passes through (a nonlinearity,
a norm over the channels, a residual stream that other layers read): each kind of site is folded for every block
at once and kept only if the model's output is unchanged (``check``, the fold check of permutations); otherwise it
is undone and reported as skipped (post-LayerNorm encoders such as BERT: the norm's output is also the residual).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Site:
    """One channel space to scale: ``consumers`` (param, K axis, element index per position) get ``× s``, the
    ``writers`` (param, axis) ``÷ s``; elements are the group's (v channels for attention)."""

    name: str
    kind: str
    size: int
    consumers: list = field(default_factory=list)
    writers: list = field(default_factory=list)
    scale: torch.Tensor | None = None


@torch.no_grad()
def channel_ranges(model: nn.Module, batches: list, modules: list[str], forward_kwargs: dict | None = None) -> dict:
    """Per input channel ``max |x|`` ([K], float32) of each named module over the calibration batches."""
    from ..dtypes import fp32_compute

    out: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def f(module, args):
            x = args[0].detach().float()
            a = x.reshape(-1, x.shape[-1]).abs().amax(0)
            out[name] = a if name not in out else torch.maximum(out[name], a)
        return f

    for name in modules:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with fp32_compute(model):
            for batch in batches:
                model(**batch, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def _norm_writers(model: nn.Module, batch: dict, modules: list[str], forward_kwargs: dict | None) -> dict:
    """consumer module → the norm module whose output tensor it reads, found in one forward by the identity of the
    tensor objects (each norm's latest output is held until the pass ends, so no object id is reused)."""
    outputs: dict[str, torch.Tensor] = {}
    read: dict[str, str] = {}
    handles = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: outputs.__setitem__(name, o) if torch.is_tensor(o) else None))

    def reader(name):
        def hook(m, a):
            hit = [norm for norm, t in outputs.items() if a and a[0] is t]
            if hit:
                read[name] = hit[0]
        return hook

    for name in modules:
        handles.append(model.get_submodule(name).register_forward_pre_hook(reader(name)))
    try:
        model(**batch, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return read


def _scale(amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float) -> torch.Tensor:
    s = amax_x.clamp_min(1e-8).pow(alpha) / amax_w.clamp_min(1e-8).pow(1 - alpha)
    s = torch.where((amax_x > 0) & (amax_w > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def _apply(model: nn.Module, site: _Site, s: torch.Tensor) -> None:
    """Fold ``s`` into the site's weights (``s`` = 1/s undoes it up to rounding)."""
    for params, scale_ in ((site.consumers, torch.Tensor.mul_), (site.writers, torch.Tensor.div_)):
        for param, axis, index in params:
            p = model.get_parameter(param)
            factor = s[index] if index is not None else s
            shape = [1] * p.dim()
            shape[axis] = -1
            scale_(p, factor.to(p.dtype).reshape(shape))


def _index(model: nn.Module, member) -> torch.Tensor:
    """The group element each position of ``member``'s axis carries (GQA, fused q/k/v)."""
    return member.index_tensor(model.get_parameter(member.param).shape[member.axis])


def _sites(model, groups, quantized: dict, batch, forward_kwargs) -> list[_Site]:
    """Every site whose consumers are all quantized, by kind: norm outputs, attention groups, MLP groups (one
    candidate per producer module, tried in turn)."""
    sites: list[_Site] = []
    norms = _norm_writers(model, batch, list(quantized), forward_kwargs)
    by_norm: dict[str, list[str]] = {}
    for consumer, norm in norms.items():
        by_norm.setdefault(norm, []).append(consumer)
    for norm, consumers in by_norm.items():
        mod = model.get_submodule(norm)
        writers = [(f"{norm}.weight", 0, None)]
        if getattr(mod, "bias", None) is not None:
            writers.append((f"{norm}.bias", 0, None))
        sites.append(_Site(norm, "norm", int(mod.weight.numel()),
                           [(quantized[c].param, quantized[c].k_axis, None) for c in consumers], writers))
    params = {i.param for i in quantized.values()}
    for g in groups:
        if g.kind not in ("attention", "mlp") or not g.consumers:
            continue
        if not all(c.param in params for c in g.consumers) or not g.producers:
            continue
        consumers = [(c.param, c.axis, _index(model, c)) for c in g.consumers]
        by_module: dict[str, list] = {}
        for p in g.producers:
            by_module.setdefault(p.module or p.param.rsplit(".", 1)[0], []).append(p)
        if g.kind == "attention":
            sites.append(_Site(g.name, "attention", g.size, consumers,
                               [(p.param, p.axis, _index(model, p)) for p in g.producers]))
        else:  # act(gate) · up: only the producer outside the nonlinearity may carry the diagonal
            for k, (module, members) in enumerate(sorted(by_module.items(), key=lambda kv: kv[0], reverse=True)):
                sites.append(_Site(g.name, f"mlp:{k}", g.size, consumers,
                                   [(p.param, p.axis, _index(model, p)) for p in members]))
    return sites


@torch.no_grad()
def smooth_(model: nn.Module, groups: list, quantized: list, batches: list, alpha: float, check,
            forward_kwargs: dict | None = None, stats: dict | None = None) -> dict:
    """Fold SmoothQuant diagonals (migration strength ``alpha``) into ``model`` in place; returns what was done.

    ``quantized``: the LinearInfo of the layers whose inputs will be quantized; ``check()``: the model's relative
    output error against the reference taken before folding (kept ≤ 1e-4, as for permutations). ``stats``
    (calibration ChannelStats by module) are rescaled alike, so masks chosen from them see the smoothed model."""
    infos = {i.module: i for i in quantized}
    amax = channel_ranges(model, batches, list(infos), forward_kwargs)
    sites = _sites(model, groups, infos, batches[0], forward_kwargs)
    module_of = {i.param: i.module for i in quantized}
    for site in sites:
        x = torch.zeros(site.size)
        w = torch.zeros(site.size)
        for param, axis, index in site.consumers:
            col_x = amax[module_of[param]]
            col_w = model.get_parameter(param).detach().float().abs().amax(dim=1 - axis)
            idx = index if index is not None else torch.arange(site.size)
            x.scatter_reduce_(0, idx, col_x, "amax")
            w.scatter_reduce_(0, idx, col_w, "amax")
        site.scale = _scale(x, w, alpha)
    done: dict = {"alpha": alpha, "sites": [], "skipped": []}
    kinds = sorted({s.kind for s in sites}, key=lambda k: (k.split(":")[0], k))
    kept_mlp_groups: set[str] = set()
    for kind in kinds:
        batch = [s for s in sites if s.kind == kind and not (kind.startswith("mlp") and s.name in kept_mlp_groups)]
        if not batch:
            continue
        for site in batch:
            _apply(model, site, site.scale)
        err = float(check())
        if err > 1e-4:
            for site in batch:
                _apply(model, site, 1.0 / site.scale)
            done["skipped"].append({"kind": kind, "sites": len(batch), "rel_err": err})
            continue
        for site in batch:
            if kind.startswith("mlp"):
                kept_mlp_groups.add(site.name)
            done["sites"].append({"name": site.name, "kind": kind.split(":")[0], "channels": site.size,
                                  "scale_min": float(site.scale.min()), "scale_max": float(site.scale.max())})
            if stats:
                for param, axis, index in site.consumers:
                    st = stats.get(module_of[param])
                    col = site.scale[index] if index is not None else site.scale
                    if st is not None and st.sum_sq.numel() == col.numel():
                        st.sum_sq.div_(col.double().square())
    done["check_rel_err"] = float(check())
    return done


__all__ = ["smooth_", "channel_ranges"]
