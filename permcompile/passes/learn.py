"""Orchestration of the learned permutation strategy (the math lives in ``permcompile.math.learn``).

Streaming: groups are processed one Transformer block at a time. For each block we run the calibration
batches through the model with hooks that accumulate the input Gram matrices ``XᵀX`` of that block's
consumers only, learn the block's permutations, write a checkpoint, and free the Grams, so memory stays
bounded by one block whatever the model's depth. ``--resume`` reloads the finished blocks from the
checkpoint (refusing one made from different inputs).

The residual-stream group (one model-wide permutation, zero glue) keeps the Hungarian solution: it is
read by every block, so its exact objective needs every block's Gram at once; the measured gain of
permuting the residual stream at all is small (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..math.learn import Consumer, learn_permutation
from .groups import Group
from .sparsify import GroupResult, choose_permutations, consumer_scores, weight_kout


def block_key(module: str) -> str:
    """The Transformer block a module belongs to: its path up to the first numeric component."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return module


class _GramHooks:
    """Accumulate ``XᵀX`` (float64) of the inputs of selected linear modules."""

    def __init__(self, model: nn.Module, modules: list[str], device: str):
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: torch.Tensor | None = None
        self.handles = []
        self.device = device
        for name in modules:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def fn(_mod, args):
            x = args[0].detach()
            if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
                x = x[self.mask.bool()]
            x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float64)
            g = x.T @ x
            if name in self.grams:
                self.grams[name] += g
            else:
                self.grams[name] = g
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _fingerprint(loaded, groups, config, batches) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": loaded.name, "source": str(loaded.source), "sparsity": str(config.sparsity),
                         "criterion": config.criterion, "seed": config.seed,
                         "learn": {k: getattr(config.learn, k) for k in config.learn.__dataclass_fields__},
                         "groups": [g.name for g in groups]}, sort_keys=True).encode())
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    for name, p in sorted(loaded.model.named_parameters()):
        h.update(name.encode())
        h.update(str(float(p.detach().double().sum())).encode())
    return h.hexdigest()


def default_checkpoint_dir(loaded, config) -> Path:
    base = Path(os.environ.get("PERMCOMPILE_CACHE", Path.home() / ".cache" / "permcompile"))
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{loaded.name}-{config.sparsity}-{config.criterion}-s{config.seed}")
    return base / "learn" / tag


def learn_permutations(loaded, groups: list[Group], stats: dict, batches: list[dict], config, *, pruned: set[str],
                       quiet: bool = False, resume: bool = False, checkpoint_dir: str | None = None,
                       max_blocks: int | None = None):
    """Learned permutations for every group; returns ``(perms, results)`` like ``choose_permutations``."""
    n, m = config.sparsity.n, config.sparsity.m
    lc = config.learn
    net = loaded.model
    net.eval()
    start_all = time.perf_counter()
    perms, results = choose_permutations(groups, net, stats, config.criterion, "hungarian", n, m, pruned,
                                         seed=config.seed)
    by_name = {r.name: r for r in results}

    learnable = [g for g in groups if g.kind != "residual" and g.size % m == 0 and g.movable >= 2 * m
                 and any(c.param in pruned for c in g.consumers)
                 and by_name[g.name].strategy != "none"]
    blocks: "OrderedDict[str, list[Group]]" = OrderedDict()
    for g in learnable:
        blocks.setdefault(block_key(g.consumers[0].module), []).append(g)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(loaded, config)
    ckpt = ckpt_dir / "learn_state.json"
    fp = _fingerprint(loaded, groups, config, batches)
    state = {"fingerprint": fp, "done": {}}
    if resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        saved = json.loads(ckpt.read_text())
        if saved.get("fingerprint") != fp:
            raise UsageError("--resume: the checkpoint was made from a different model, data or configuration; "
                             "rerun without --resume")
        state = saved
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(config.seed)
    device = config.device
    use_tqdm = not quiet
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc="learn", unit="block", file=sys.stderr, leave=False)
    for bi, (key, block_groups) in enumerate(blocks.items()):
        if max_blocks is not None and bi >= max_blocks:
            break
        if key in state["done"]:
            for name, entry in state["done"][key].items():
                perms[name] = torch.tensor(entry["perm"], dtype=torch.long)
                r = by_name[name]
                r.kept_chosen, r.strategy = entry["kept"], "learned"
                r.note = entry.get("note", "")
            if bar:
                bar.update(1)
            continue
        t0 = time.perf_counter()
        modules = sorted({c.module for g in block_groups for c in g.consumers if c.param in pruned})
        hooks = _GramHooks(net, modules, "cpu")
        try:
            with torch.no_grad():
                for b in batches:
                    hooks.mask = b.get("attention_mask")
                    net(**b, **loaded.forward_kwargs())
        finally:
            hooks.close()
        done_block = {}
        for g in block_groups:
            consumers = []
            for mem in g.consumers:
                if mem.param not in pruned or mem.module not in hooks.grams:
                    continue
                w = weight_kout(net, mem).detach().float()
                s = consumer_scores(net, mem, stats, config.criterion)
                gram = (hooks.grams[mem.module] / max(1, hooks.tokens[mem.module])).float()
                consumers.append(Consumer(w, s, gram, mem.index_tensor(w.shape[1])))
            if not consumers:
                continue

            def on_step(step, value, best, _g=g):
                if bar:
                    bar.set_postfix_str(f"{_g.name[-32:]} step {step} loss {value:.4f} best {best:.4f}")

            res = learn_permutation(
                consumers, g.size, n, m, perms[g.name], g.block_labels(), g.fixed_mask(),
                block=lc.block_size, steps=lc.steps, rounds=2, lr=lc.lr, sinkhorn_iters=lc.sinkhorn_iters,
                tau_start=lc.tau_start, tau_end=lc.tau_end, generator=gen, device=device, on_step=on_step)
            if not g.is_valid(res.perm):
                raise RuntimeError(f"learned permutation for {g.name} breaks its constraints")
            perms[g.name] = res.perm
            r = by_name[g.name]
            from .sparsify import group_score_matrix
            from ..math.nm import kept_importance

            scores = group_score_matrix(g, net, stats, config.criterion, pruned, m)
            r.kept_chosen = kept_importance(scores, n, m, res.perm) / float(scores.sum())
            r.strategy = "learned"
            r.note = f"output error {res.loss_warm:.5f} (hungarian) -> {res.loss_best:.5f}"
            r.seconds += time.perf_counter() - t0
            done_block[g.name] = {"perm": res.perm.tolist(), "kept": r.kept_chosen, "note": r.note}
        del hooks
        state["done"][key] = done_block
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, ckpt)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return perms, results
