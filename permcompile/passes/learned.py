"""The ``learned`` permutation strategy: permutations learned end to end against the model's own output
(orchestration).

Why: the heuristics (``hungarian``) and the exchange ``search`` score each layer alone on a proxy; the published
methods that beat them (PermLLM, AMD arXiv 2601.22980) learn the permutations against the model's output. This
pass does that with our coupling groups, so the result still folds into the weights with zero glue.

How (the math is in ``permcompile.math.learned``): every movable coupling group gets learnable ``B×B`` logits per block
(``math.learned.block_layout``: blocks never mix head/GQA labels nor touch pinned elements). Each step, Sinkhorn gives
the soft permutations and Hungarian the hard ones (straight-through); for every pruned consumer the criterion's
N:M mask is chosen in the permuted order and mapped back to the stored order, and the model runs with its frozen
weights times those masks, each masked weight built inside its own layer's forward and every block checkpointed
(``_lazy_weights``: backward recomputes one block at a time; no parameter is written, the modules get their own
``forward`` back after each step). The loss compares the output with the dense model's on the calibration
batches; AdamW updates the logits only. The permutations start
at ``hungarian`` (the warm start, folded first in thought: the learned block permutation acts on the warm start's
positions) and, with ``keep_best``, are returned only if they beat it over all calibration batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..math import learned as E
from ..math.gather import replica_columns
from ..math.nm import nm_mask
from ..math.strategies import hungarian
from .checkpoint import Checkpoints, PassCheckpoint
from .groups import Group, gather_index
from .sparsify import choose_permutations, consumer_scores, group_progress, kept_fraction

if TYPE_CHECKING:  # annotations only: config.py's strategy table imports this module when the strategy runs
    from ..config import LearnedConfig


@dataclass
class _Site:
    """One pruned consumer: its stored weight's ``[out, K]`` view, criterion scores, and how its columns move."""

    param: str
    k_axis: int
    scores: torch.Tensor  # [out, K] stored order, fixed
    group: str | None
    cols: torch.Tensor | None  # group element carried by each column (None: no group)
    src_warm: torch.Tensor | None  # stored column feeding each column once the warm start is folded
    moves: list = field(default_factory=list)  # (layout key, blocks present, colidx [nb', B]) per replica


@dataclass
class LearnedResult:
    perms: dict
    loss_warm: float  # over all calibration batches, hard masks
    loss_learned: float
    kept: bool  # whether the learned permutations replaced the warm start
    history: list  # loss per step (the hard permutation's, on that step's batch)
    seconds: float


def _sites(groups: list[Group], warm: dict, layouts: dict, scores: dict, k_axes: dict,
           device: torch.device | str = "cpu") -> list[_Site]:
    """Every pruned weight of ``scores`` as a :class:`_Site`, its tensors on ``device`` (the model's)."""
    owner = {}
    for g in groups:
        for mem in g.consumers:
            if mem.param in scores:
                owner.setdefault(mem.param, (g, mem))
    sites = []
    for param in sorted(scores):
        s = scores[param].to(device)
        k_axis = k_axes.get(param, 1)
        g, mem = owner.get(param, (None, None))
        if g is None or g.name not in warm:
            sites.append(_Site(param, k_axis, s, None, None, None))
            continue
        cols = mem.index_tensor(s.shape[1])
        site = _Site(param, k_axis, s, g.name, cols.to(device), gather_index(cols, warm[g.name]).to(device))
        for key, layout in layouts.get(g.name, []):
            for sel, colidx in replica_columns(cols, g.size, layout):
                site.moves.append((key, sel.to(device), colidx.to(device)))
        sites.append(site)
    return sites


def _hard_mask(site: _Site, perm: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """The N:M mask the compiler will apply once ``perm`` is folded, in the stored column order."""
    if perm is None:
        return nm_mask(site.scores, n, m).float()
    src = gather_index(site.cols, perm.to(site.cols.device))
    mask = torch.empty_like(site.scores)
    mask[:, src] = nm_mask(site.scores[:, src], n, m).float()
    return mask


def _soft_mask(site: _Site, fwd: list, bwd: list, n: int, m: int, mask_tau: float) -> torch.Tensor:
    """The softmax-over-M surrogate of ``site``'s mask in the stored column order, its columns moved by the block
    permutations ``fwd`` (one ``[nb', B, B]`` per move, in move order) and moved back by ``bwd`` (reversed order)."""
    x = site.scores[:, site.src_warm]  # columns in the warm start's folded order
    for (_, _, colidx), q in zip(site.moves, fwd):
        x = E.permute_columns(x, colidx, q)
    soft = E.soft_topn_mask(x, n, m, mask_tau)
    for (_, _, colidx), q in zip(reversed(site.moves), bwd):
        soft = E.unpermute_columns(soft, colidx, q)
    back = torch.empty_like(site.src_warm)
    back[site.src_warm] = torch.arange(site.src_warm.numel(), device=back.device)
    return soft[:, back]  # stored order


def _block_slices(sites, qs) -> dict[str, tuple[list, list]]:
    """Per site with moves, the slices of the soft block permutations ``qs`` its surrogate reads: ``(fwd, bwd)``
    as :func:`_soft_mask` takes them. Taken for every site in order before the forward pass (as the whole-model
    masks once were), so the gradients reach ``qs`` in the same order and sum to the same values."""
    out = {}
    for site in sites:
        if site.moves and qs is not None:
            fwd = [qs[key][sel] for key, sel, _ in site.moves]
            bwd = [qs[key][sel] for key, sel, _ in reversed(site.moves)]
            out[site.param] = (fwd, bwd)
    return out


def _effective_masks(sites, perms, qs, n, m, mask_tau) -> dict[str, torch.Tensor]:
    """Per site the hard mask of ``perms`` in value, with the straight-through gradient of the soft block
    permutations ``qs`` (layout key → ``[nb, B, B]``) through the softmax-over-M surrogate (every site at once:
    the training loop builds each one inside its layer's forward instead, :func:`_weight_builders`)."""
    out = {}
    for site in sites:
        hard = _hard_mask(site, perms.get(site.group) if site.group else None, n, m)
        if not site.moves or qs is None:
            out[site.param] = hard
            continue
        fwd, bwd = _block_slices([site], qs)[site.param]
        soft = _soft_mask(site, fwd, bwd, n, m, mask_tau)
        out[site.param] = hard + soft - soft.detach()
    return out


def _overrides(model: nn.Module, sites, masks) -> dict[str, torch.Tensor]:
    params = {}
    for site in sites:
        w = model.get_parameter(site.param).detach()
        mk = masks[site.param].to(w.dtype)
        params[site.param] = w * (mk if site.k_axis == 1 else mk.t())
    return params


def _weight_builders(model: nn.Module, sites, perms, qs, n, m, mask_tau) -> dict[str, Callable]:
    """Per site a function giving the weight :func:`_overrides` would give for ``_effective_masks(sites, perms,
    qs, ...)``, the same values and gradient, computed when called: :func:`_lazy_weights` calls it inside the
    layer's forward, so only one layer's masks exist at a time. The hard masks are kept as booleans (1 byte per
    weight); the soft block permutations are sliced here, in site order (:func:`_block_slices`)."""
    slices = _block_slices(sites, qs)
    out = {}
    for site in sites:
        hard = _hard_mask(site, perms.get(site.group) if site.group else None, n, m).bool()

        def build(site=site, hard=hard, qsl=slices.get(site.param)):
            w = model.get_parameter(site.param).detach()
            mk = hard.float()
            if qsl is not None:
                soft = _soft_mask(site, qsl[0], qsl[1], n, m, mask_tau)
                mk = mk + soft - soft.detach()
            mk = mk.to(w.dtype)
            return w * (mk if site.k_axis == 1 else mk.t())

        out[site.param] = build
    return out


def _shared_params(model: nn.Module) -> set[str]:
    """Names of parameters reachable under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict):
    saved = {k: module._parameters[k] for k in tensors}
    try:
        for k, t in tensors.items():
            module._parameters[k] = t  # what torch.func.functional_call does
        yield
    finally:
        for k, p in saved.items():
            module._parameters[k] = p


def _blocks(model: nn.Module, params) -> list[str]:
    """The repeated blocks (children of an ``nn.ModuleList``: a transformer's layers) holding some of ``params``."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            for i, _ in enumerate(mod):
                prefix = f"{name}.{i}." if name else f"{i}."
                if any(p.startswith(prefix) for p in params):
                    out.append(prefix[:-1])
    return out


def _stateful(args, kwargs) -> bool:
    """Whether a forward's inputs hold a KV cache (a forward run twice would write it twice)."""
    return any(type(v).__name__.endswith("Cache") for v in (*args, *kwargs.values()))


@contextlib.contextmanager
def _lazy_weights(model: nn.Module, builders: dict[str, Callable]):
    """While active, the module owning each parameter of ``builders`` runs its own forward with that parameter
    replaced by ``builders[param]()``, built inside the forward. With gradient enabled the forwards are
    checkpointed (``torch.utils.checkpoint``, non-reentrant; the same values, the same graph): every repeated
    block holding such a weight (a transformer layer, :func:`_blocks`) as a whole, and every such module outside
    those blocks, so backward recomputes one block's masks, weights and activations at a time instead of keeping
    every layer's. The modules get back their own ``forward`` on exit; the parameters are never written."""
    from torch.utils.checkpoint import checkpoint

    by_module: dict[str, list] = {}
    for param, build in builders.items():
        mod_name, _, local = param.rpartition(".")
        by_module.setdefault(mod_name, []).append((local, build))
    inside = [0]  # > 0 while a checkpointed block runs: its modules are not checkpointed again

    def wrap(mod, body):
        own = mod.__dict__.get("forward")
        orig = mod.forward

        def forward(*args, **kwargs):
            def inner(*args):
                return body(orig, args, kwargs)

            if torch.is_grad_enabled() and not inside[0] and not _stateful(args, kwargs):
                return checkpoint(inner, *args, use_reentrant=False)
            return inner(*args)

        mod.forward = forward
        patched.append((mod, own))

    def block_body(orig, args, kwargs):
        inside[0] += 1
        try:
            return orig(*args, **kwargs)
        finally:
            inside[0] -= 1

    patched = []
    try:
        for mod_name, items in by_module.items():
            mod = model.get_submodule(mod_name)
            wrap(mod, _module_body(mod, items))
        for name in _blocks(model, builders):
            wrap(model.get_submodule(name), block_body)
        yield
    finally:
        for mod, own in reversed(patched):
            if own is not None:
                mod.forward = own
            else:
                del mod.forward


def _module_body(mod: nn.Module, items: list) -> Callable:
    def body(orig, args, kwargs):
        with _swapped(mod, {local: build() for local, build in items}):
            return orig(*args, **kwargs)

    return body


@contextlib.contextmanager
def _masking(model: nn.Module, sites, shared: set, perms, qs, n, m, mask_tau):
    """While active, the model runs with every site's weight masked (:func:`_weight_builders`): built inside its
    layer's forward (:func:`_lazy_weights`; keep it active through backward, which recomputes the blocks), except
    tied weights, yielded as overrides for ``run``."""
    builders = _weight_builders(model, sites, perms, qs, n, m, mask_tau)
    eager = {p: builders.pop(p)() for p in list(builders) if p in shared}
    with _lazy_weights(model, builders):
        yield eager


def _run_masked(run: Callable, model: nn.Module, sites, shared: set, perms, qs, n, m, mask_tau, batch):
    """``run`` with every site's weight masked (:func:`_masking`), for a forward without backward."""
    with _masking(model, sites, shared, perms, qs, n, m, mask_tau) as eager:
        return run(eager, batch)


REF_BUDGET_BYTES = 1 << 30


def _nbytes(out) -> int:
    """Bytes of the tensors in a model output (a tensor, a ModelOutput/dict, or a tuple of them)."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, dict):
        return sum(_nbytes(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return sum(_nbytes(v) for v in out)
    return 0


# fields that change when or where the loop's state is saved, not what it computes: left out of the digest
_NOT_DIGESTED = ("checkpoint_steps", "checkpoint_seconds")


def checkpoint_digest(model: nn.Module, batches: list, groups: list[Group], warm: dict, scores: dict, n: int, m: int,
                      config: LearnedConfig, seed: int, extra: dict | None = None) -> str:
    """What the loop's result depends on: the weights, the calibration batches, the groups, the warm start, the
    criterion scores and every setting (``passes.checkpoint.content_digest``). ``extra``: the caller's settings
    that ``run``/``objective`` depend on (the resolved loss, the criterion)."""
    from .checkpoint import content_digest

    h = hashlib.sha256()
    for name in sorted(warm):
        h.update(name.encode() + torch.as_tensor(warm[name], dtype=torch.long).numpy().tobytes())
    for name in sorted(scores):
        h.update(name.encode() + scores[name].detach().float().cpu().contiguous().numpy().tobytes())
    settings = {"pass": "learned", "n": n, "m": m, "seed": seed, "groups": sorted(g.name for g in groups),
                "learned": {k: getattr(config, k) for k in config.__dataclass_fields__ if k not in _NOT_DIGESTED},
                "warm+scores": h.hexdigest(), "extra": extra or {}}
    return content_digest(model, batches, settings)


STATE_FILE = "learned_state.safetensors"


def _read_state(path: Path) -> tuple[tuple[dict, dict], str | None]:
    """``((state, tensors), digest)`` of a saved loop: tensors, and the JSON state in the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        state = json.loads((fh.metadata() or {})["state"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return (state, tensors), state.get("digest")


def _write_state(path: Path, state: dict, tensors: dict, digest: str) -> None:
    """Tensors and state in one file, so one atomic rename commits both."""
    from safetensors.torch import save_file

    from .checkpoint import write_atomic

    meta = {"state": json.dumps({**state, "digest": digest})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _split(batches: list, size: int) -> list:
    """Each batch's tensors cut into chunks of ``size`` rows (0: unchanged)."""
    if size <= 0:
        return batches
    out = []
    for b in batches:
        rows = next(iter(b.values())).shape[0]
        for i in range(0, rows, size):
            out.append({k: v[i:i + size] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
                        for k, v in b.items()})
    return out


@torch.enable_grad()  # it trains: it must run when the caller disabled gradients (torch.no_grad)
def train_permutations(model: nn.Module, groups: list[Group], warm: dict[str, torch.Tensor],
                       scores: dict[str, torch.Tensor], batches: list, run: Callable, objective: Callable, n: int,
                       m: int, config: LearnedConfig, seed: int = 0, k_axes: dict | None = None,
                       progress: Callable | None = None, checkpoint: PassCheckpoint | None = None,
                       announce: Callable[[int, float, float], None] | None = None) -> LearnedResult:
    """Learn one block-diagonal permutation per movable group on top of ``warm``, end to end.

    ``scores[param]``: the criterion's ``[out, K]`` scores of every pruned weight (they move with their columns;
    ``k_axes[param]`` = 0 for a weight stored ``[K, out]``, default 1);
    ``run(overrides, batch)``: the model's output with the parameters in ``overrides`` replaced;
    ``objective(out, ref, batch)``: the scalar loss of ``out`` against the dense model's ``ref`` for ``batch``.
    The model's parameters are never written. Returns the permutations (valid for their groups) and the losses.
    ``checkpoint``: save the loop's state there as it runs, and (``--resume``) continue from it: the result is the
    same as an uninterrupted run's. ``announce(steps, seconds, forward_seconds)``: called once before the first step
    with the steps left and the loop's expected time, estimated from the warm start's evaluation (a step costs
    about three forward passes: the forward, and the backward that recomputes each checkpointed block).
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device  # everything learned lives beside the weights
    cfg = config
    batches = _split(batches, cfg.micro_batch)
    amp = cfg.resolve_autocast(device)
    saved = checkpoint.load(_read_state) if checkpoint is not None else None
    if saved is not None and "final" in saved[0]:  # the loop had finished: its result, without a forward pass
        state, tensors = saved
        fin = state["final"]
        perms = {name[len("final/"):]: t.long() for name, t in tensors.items() if name.startswith("final/")}
        return LearnedResult(perms, fin["loss_warm"], fin["loss_learned"], fin["kept"], state["history"],
                         time.perf_counter() - start)
    layouts: dict[str, list] = {}
    logits: dict[str, torch.Tensor] = {}
    for g in groups:
        if g.name not in warm or g.size % m or g.movable < 2 or not any(c.param in scores for c in g.consumers):
            continue
        for layout in E.block_layout(g.block_labels(), g.fixed_mask(), cfg.block_size):
            key = f"{g.name}/{layout.shape[1]}"
            layouts.setdefault(g.name, []).append((key, layout))
            logits[key] = E.init_logits(layout.shape[0], layout.shape[1], cfg.init_scale, 0.01,
                                        gen).to(device).requires_grad_()
    sites = _sites(groups, warm, layouts, scores, k_axes or {}, device)
    shared = _shared_params(model)

    def hard_perms(qh: dict | None) -> dict:
        perms = {name: torch.as_tensor(p, dtype=torch.long) for name, p in warm.items()}
        if qh is None:
            return perms
        for name, entries in layouts.items():
            for key, layout in entries:
                perms[name] = E.compose_blocks(perms[name], layout, qh[key])
        return perms

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            first = run({}, batches[0])
        # the dense outputs are kept when they fit REF_BUDGET_BYTES (an LM's logits over a large vocabulary may
        # not), else recomputed for each batch: one more forward pass, without gradient
        keep_refs = _nbytes(first) * len(batches) <= REF_BUDGET_BYTES
        with torch.no_grad():
            refs = [first] + [run({}, b) for b in batches[1:]] if keep_refs else None

        def ref(i):
            if refs is not None:
                return refs[i]
            with torch.no_grad():
                return run({}, batches[i])

        def batch_losses(perms) -> list[float]:
            with torch.no_grad():
                return [float(objective(_run_masked(run, model, sites, shared, perms, None, n, m, cfg.mask_tau, b),
                                        ref(i), b)) for i, b in enumerate(batches)]

        clock = time.perf_counter()
        warm_losses = batch_losses(hard_perms(None))
        forward_s = (time.perf_counter() - clock) / len(batches)
        loss_warm = sum(warm_losses) / len(batches)
        history: list[float] = []
        qh_last = None
        # the hard permutation with the lowest step loss relative to the warm start's on the same batch: a
        # candidate for the final choice beside the last one (the search may pass through a better point)
        best_ratio, qh_best = 1.0, None
        if logits and cfg.steps > 0:
            opt = torch.optim.AdamW(list(logits.values()), lr=cfg.lr, weight_decay=0.0)
            order = torch.randperm(len(batches), generator=gen).tolist()
            first = 0
            keys = list(logits)
            if saved is not None:  # everything the next step reads: logits, AdamW moments, RNG, best so far
                state, tensors = saved
                first, history, best_ratio = state["step"], list(state["history"]), state["best_ratio"]
                with torch.no_grad():
                    for key in keys:
                        logits[key].copy_(tensors[f"logits/{key}"].to(device))
                opt_state = opt.state_dict()
                if state["adam"]:
                    opt_state["state"] = {i: {"step": tensors[f"adam_step/{key}"],
                                              "exp_avg": tensors[f"exp_avg/{key}"].to(device),
                                              "exp_avg_sq": tensors[f"exp_avg_sq/{key}"].to(device)}
                                          for i, key in enumerate(keys)}
                    opt.load_state_dict(opt_state)
                gen.set_state(tensors["rng"])
                if state["has_best"]:
                    qh_best = {key: tensors[f"best/{key}"].long().to(device) for key in keys}
                checkpoint.saved = f"the learned loop at step {first} of {cfg.steps} is"
                if not checkpoint.quiet:
                    print(f"[permcompile] --resume: the learned loop continues at step {first} of {cfg.steps} from "
                          f"{checkpoint.path}", file=sys.stderr, flush=True)
            if announce is not None and first < cfg.steps:  # the steps, then up to two evaluations of all batches
                announce(cfg.steps - first, forward_s * (3 * (cfg.steps - first) + 2 * len(batches)), forward_s)
            last_save = time.perf_counter()

            def save_state(step_done: int, final: dict | None = None, perms_out: dict | None = None) -> None:
                tensors = {"rng": gen.get_state()}
                for i, key in enumerate(keys):
                    tensors[f"logits/{key}"] = logits[key]
                    st = opt.state.get(logits[key])
                    if st:
                        tensors[f"adam_step/{key}"] = torch.as_tensor(st["step"], dtype=torch.float32)
                        tensors[f"exp_avg/{key}"] = st["exp_avg"]
                        tensors[f"exp_avg_sq/{key}"] = st["exp_avg_sq"]
                    if qh_best is not None:
                        tensors[f"best/{key}"] = qh_best[key]
                state = {"step": step_done, "history": history, "best_ratio": best_ratio,
                         "has_best": qh_best is not None, "adam": bool(opt.state)}
                if final is not None:
                    state["final"] = final
                    tensors.update({f"final/{name}": p for name, p in perms_out.items()})
                checkpoint.save(lambda folder: _write_state(folder / STATE_FILE, state, tensors, checkpoint.digest),
                                f"the learned loop at step {step_done} of {cfg.steps} is")

            for step in range(first, cfg.steps):
                tau = E.anneal(step, cfg.steps, cfg.tau_start, cfg.tau_end)
                i = order[step % len(order)]
                dense = ref(i)  # fp32 whatever the autocast
                # the layers build their masked weights until backward (which recomputes them) is done
                with contextlib.ExitStack() as masked:
                    with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                        qs, qh = {}, {}
                        for key, lg in logits.items():
                            if cfg.gumbel > 0:  # Gumbel-Sinkhorn exploration, fading with the temperature
                                u = torch.rand(lg.shape, generator=gen).clamp(1e-9, 1 - 1e-9).to(device)
                                lg = lg - cfg.gumbel * (tau / cfg.tau_start) * torch.log(-torch.log(u))
                            qh[key], qs[key] = E.harden_st(E.soft_permutation(lg.float(), tau, cfg.sinkhorn_iters))
                        perms = hard_perms(qh)
                        eager = masked.enter_context(_masking(model, sites, shared, perms, qs, n, m, cfg.mask_tau))
                        loss = objective(run(eager, batches[i]), dense, batches[i])
                    opt.zero_grad()
                    loss.float().backward()
                opt.step()
                history.append(float(loss.detach()))
                ratio = history[-1] / max(warm_losses[i], 1e-30)
                if ratio < best_ratio:
                    best_ratio, qh_best = ratio, {k: v.clone() for k, v in qh.items()}
                now = time.perf_counter()
                if checkpoint is not None and checkpoint.due() and (
                        (step + 1) % cfg.checkpoint_steps == 0 or now - last_save >= cfg.checkpoint_seconds):
                    save_state(step + 1)
                    last_save = now
                if progress:
                    progress(step, cfg.steps, history[-1], tau)
            # the permutation the final logits give (the last step's, after its update)
            tau = cfg.tau_end
            with torch.no_grad():
                qh_last = {key: E.harden(E.soft_permutation(lg, tau, cfg.sinkhorn_iters)) for key, lg in logits.items()}
        learned, loss_learned = hard_perms(None), loss_warm
        if qh_best is not None and qh_last is not None and all(torch.equal(qh_best[k], qh_last[k]) for k in qh_last):
            qh_best = None  # the same permutations: one evaluation pass is enough
        for cand in (qh_last, qh_best):
            if cand is not None:
                perms = hard_perms(cand)
                value = sum(batch_losses(perms)) / len(batches)
                if qh_last is cand or value < loss_learned:
                    learned, loss_learned = perms, value
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    keep = qh_last is not None and (not cfg.keep_best or loss_learned < loss_warm)
    perms = learned if keep else hard_perms(None)
    if checkpoint is not None and qh_last is not None and checkpoint.due():
        # the result itself: a resume after a later step's interruption (reconstruction) skips the whole loop
        save_state(cfg.steps, {"loss_warm": loss_warm, "loss_learned": loss_learned, "kept": keep}, perms)
    for g in groups:
        if g.name in perms and not g.is_valid(perms[g.name]):  # post-condition: the fold accepts it
            raise RuntimeError(f"learned permutation for {g.name} breaks its constraints")
    return LearnedResult(perms, loss_warm, loss_learned, keep, history, time.perf_counter() - start)


def _main(out):
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out[0]


def model_objective(loss: str, distill: float = 0.0) -> Callable:
    """``objective(out, ref, batch)`` for an HF model's outputs (``loss`` as in :class:`LearnedConfig`, resolved)."""

    def objective(out, ref, batch):
        y, y_ref = _main(out), _main(ref)
        mask = batch.get("attention_mask")
        mask = mask if mask is not None and y.dim() == 3 and mask.shape == y.shape[:2] else None
        if loss == "kl":
            value = E.kl_to_dense(y, y_ref, mask)
        elif loss == "ce":
            value = E.next_token_ce(y, batch["input_ids"], mask)
        elif loss == "cosine":
            value = E.cosine_distance(y, y_ref, mask)
        elif loss == "mse":
            value = (y.float() - y_ref.float()).pow(2).sum() / y_ref.float().pow(2).sum().clamp_min(1e-12)
        else:
            raise ValueError(f"unknown learned loss {loss!r}")
        if distill > 0:
            hs, hs_ref = getattr(out, "hidden_states", None), getattr(ref, "hidden_states", None)
            if hs is not None and hs_ref is not None:
                value = value + distill * E.layerwise_distill(hs[1:], hs_ref[1:], mask)
        return value

    return objective


def learned_permutations(loaded, groups: list[Group], stats: dict, batches: list[dict], config, *, linears: list,
                         quiet: bool = True, checkpoints: Checkpoints | None = None):
    """The ``learned`` strategy for ``compress_``: returns ``(perms, results)`` like ``choose_permutations``.

    ``checkpoints``: where the loop's state is saved as it runs and (``--resume``) continued from; None: no
    checkpoint."""
    from torch.func import functional_call

    from .sparsify import group_score_matrix

    n, m = config.sparsity.n, config.sparsity.m
    cfg = config.learned
    net = loaded.model
    net.eval()
    pruned = {i.param for i in linears if i.prune}
    with group_progress(len(groups), "warm start (hungarian)", quiet) as progress:
        warm, results = choose_permutations(groups, net, stats, config.criterion, "hungarian", n, m, pruned,
                                            seed=config.seed, progress=progress, kernel=hungarian)
    by_name = {r.name: r for r in results}
    movable = {r.name for r in results if r.strategy != "none"}
    scores = {i.param: consumer_scores(net, i, stats, config.criterion) for i in linears if i.prune}
    k_axes = {i.param: i.k_axis for i in linears if i.prune}

    loss = cfg.resolve_loss(loaded.family)
    kwargs = loaded.forward_kwargs()
    if cfg.distill > 0:
        kwargs = {**kwargs, "output_hidden_states": True}
    device = torch.device(config.device)
    home = next(net.parameters()).device
    if device != home:  # learned on the device, the model goes back where the pipeline keeps it
        net.to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def run(overrides, batch):
        return functional_call(net, overrides, (), {**batch, **kwargs}, strict=False)

    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"learned ({loss})", unit="step", file=sys.stderr, leave=False)

    def report(step, steps, value, tau):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.5f} tau {tau:.3f}")

    learn_groups = [g for g in groups if g.name in movable]
    digest = checkpoint_digest(net, batches, learn_groups, warm, scores, n, m, cfg, config.seed,
                               {"loss": loss, "criterion": config.criterion, "k_axes": k_axes})
    ckpt = checkpoints.open("learned", digest, STATE_FILE) if checkpoints is not None else None

    def announce(steps, seconds, forward_s):
        if bar is not None:  # above the bar, which stays in place
            bar.write(f"[permcompile] learned: {steps} steps on {device}, at least about {seconds:.0f} s (a step is "
                      f"~3 forward passes of {forward_s:.2f} s; LearnedConfig.steps sets the budget)", file=sys.stderr)

    try:
        res = train_permutations(net, learn_groups, warm, scores, batches, run, model_objective(loss, cfg.distill),
                                 n, m, cfg, seed=config.seed, k_axes=k_axes, progress=report, checkpoint=ckpt,
                                 announce=announce)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the CLI's error line says how to go on
        if ckpt is not None:
            ckpt.hint(exc)
        raise
    finally:
        if bar is not None:
            bar.close()
        if device != home:
            net.to(home)
    if not quiet:
        print(f"[permcompile] learned: {loss} loss {res.loss_warm:.5f} (hungarian) -> {res.loss_learned:.5f} (learned, "
              f"{cfg.steps} steps, {res.seconds:.0f} s); {'kept' if res.kept else 'kept the warm start'}",
              file=sys.stderr)
    perms = dict(warm)
    for g in groups:
        if g.name not in movable:
            continue
        perms[g.name] = res.perms[g.name]
        r = by_name[g.name]
        matrix = group_score_matrix(g, net, stats, config.criterion, pruned, m, seed=config.seed)
        r.kept_chosen = kept_fraction(matrix, n, m, perms[g.name])
        r.strategy = "learned"
        r.seconds += res.seconds / max(1, len(movable))
        # the model's loss is one number for all groups: each group reports it
        r.objective, r.error_before, r.error_after = f"learned-{loss}", res.loss_warm, (
            res.loss_learned if res.kept else res.loss_warm)
        r.note = (f"{loss} loss over the calibration batches {res.loss_warm:.5f} (hungarian) -> "
                  f"{res.loss_learned:.5f} (learned){'' if res.kept else '; warm start kept'}")
    return perms, results
