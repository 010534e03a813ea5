"""Orchestration of the ``search`` permutation strategy, the exchange search on a per-layer proxy (the math lives in
``permcompile.math.search``).

Streaming: groups are processed one Transformer block at a time. For each block we run the calibration
batches through the model with hooks that accumulate the input Gram matrices ``XᵀX`` of that block's
consumers only, search the block's permutations, write a checkpoint, and free the Grams, so memory stays
bounded by one block whatever the model's depth. The ``diagonal`` objective (the decoder default) needs only
``diag(XᵀX)``, which the calibration statistics already hold: it runs no Gram pass at all (``_StatGrams``),
unless ``sequential`` asks for Grams of the pruned prefix. ``--resume`` reloads the finished blocks from the
checkpoint (``passes/checkpoint.py``).

The residual-stream group (one model-wide permutation, zero glue) is read by every block, so its exact
objective would need every block's Gram at once. With ``SearchConfig.residual_trials > 0`` (default) it is refined
after the blocks by exchanges on the diagonal objective, which needs only the per-channel ``E[x²]`` the
calibration statistics already hold: every pruned reader counts, each normalised to the same weight
(``_refine_residual``). Otherwise it keeps its warm start. With ``residual="per-layer"``
each reading site is its own group (``passes/glue.py``) and is searched like any other group of its block.
"""
from __future__ import annotations

import zlib
import json
import sys
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..calib.stats import StopForward
from ..math.search import Consumer, gram_rows, learn_permutation, objective_gram
from .checkpoint import Checkpoints, write_atomic
from .groups import Group
from .sparsify import choose_permutations, consumer_scores, group_progress, kept_fraction, weight_kout


def block_key(module: str) -> str:
    """The Transformer block a module belongs to: its path up to the first numeric component."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return module


class _StatGrams:
    """The ``diagonal`` objective's Grams without a forward pass: ``diag(XᵀX)`` is the per-channel sum of squares
    the calibration statistics already hold (same tokens, padding excluded alike), kept as ``[K]`` vectors."""

    def __init__(self, stats: dict, modules: list[str]):
        self.grams = {name: stats[name].sum_sq for name in modules}
        self.tokens = {name: stats[name].count for name in modules}

    def close(self):
        pass


def _stat_grams_suffice(config, sequential, stats: dict, modules: list[str]) -> bool:
    """True when the block's objective needs only the diagonal the calibration statistics hold."""
    return config.search.objective == "diagonal" and sequential is None and all(x in stats for x in modules)


class _GramHooks:
    """Accumulate ``XᵀX`` (float64) of the inputs of selected linear modules (rows per ``gram_rows``)."""

    def __init__(self, model: nn.Module, modules: list[str], device: str, objective: str = "output"):
        self.objective = objective
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
            x = gram_rows(x.reshape(-1, x.shape[-1]).to(self.device, torch.float32), self.objective)
            g = (x.T @ x).double()  # fp32 products, fp64 accumulation across batches
            if name in self.grams:
                self.grams[name] += g
            else:
                self.grams[name] = g
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _last_module(net: nn.Module, modules: list[str]):
    """A hook that ends the forward pass right after the last of ``modules`` (in registration order) ran."""
    names = [n for n, _ in net.named_modules()]
    wanted = [n for n in names if n in set(modules)]
    if not wanted:
        return None

    def stop(_mod, _args, _out):
        raise StopForward

    return net.get_submodule(wanted[-1]).register_forward_hook(stop)


def _fingerprint(loaded, groups, config, batches) -> str:
    """Digest of what the searched permutations depend on: the weights, the calibration data and the settings
    (:func:`passes.checkpoint.content_digest`)."""
    from .checkpoint import content_digest

    return content_digest(loaded.model, batches, {
        "sparsity": str(config.sparsity), "criterion": config.criterion, "seed": config.seed,
        "search": {k: getattr(config.search, k) for k in config.search.__dataclass_fields__},
        "groups": [g.name for g in groups]})


STATE_FILE = "search_state.json"


def _read_state(path: Path) -> tuple[dict, str | None]:
    """A checkpoint's state and the digest it was saved with (``PassCheckpoint.load`` checks it)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    done = saved.get("done") if isinstance(saved, dict) else None
    if not isinstance(done, dict) or not all(isinstance(v, dict) for v in done.values()):
        raise ValueError("not a permcompile checkpoint")
    return saved, saved.get("fingerprint")


GRAM_BUDGET_BYTES = 1 << 30  # Gram matrices held at once (float64): bounds memory whatever the depth


def _chunks(keys, blocks, net, pruned, budget):
    """Consecutive blocks whose consumers' Gram matrices fit in ``budget`` bytes together (at least one)."""
    chunk, used = [], 0
    for key in keys:
        mods = {c.module: c for g in blocks[key] for c in g.consumers if c.param in pruned}
        size = 0
        for c in mods.values():
            k = weight_kout(net, c).shape[1]
            size += k * k * 8
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(key)
        used += size
    if chunk:
        yield chunk


def _search_block(block_groups, hooks, net, stats, config, pruned, perms, by_name, gen, bar,
                 sensitivity: dict | None = None) -> dict:
    from .sparsify import group_score_matrix

    n, m = config.sparsity.n, config.sparsity.m
    lc = config.search
    done_block = {}
    for g in block_groups:
        consumers = []
        for mem in g.consumers:
            if mem.param not in pruned or mem.module not in hooks.grams:
                continue
            w = weight_kout(net, mem).detach().float()
            s = consumer_scores(net, mem, stats, config.criterion)
            if sensitivity is not None and mem.module in sensitivity:
                # rows weighted by their task-loss Fisher: the objective becomes the end-to-end estimate
                # (the mask stays the criterion's per-row choice: row weights do not change it)
                w = w * sensitivity[mem.module].clamp_min(0).sqrt()[:, None]
            acc = hooks.grams[mem.module] / max(1, hooks.tokens[mem.module])
            # a vector is the diagonal already (_StatGrams); objective_gram keeps only the diagonal of a matrix
            gram = (torch.diag(acc) if acc.dim() == 1 else objective_gram(acc, lc.objective)).float()
            consumers.append(Consumer(w, s, gram, mem.index_tensor(w.shape[1])))
        if not consumers:
            continue

        def on_step(step, value, best, _g=g):
            if bar:
                bar.set_postfix_str(f"{_g.name} step {step} loss {value:.4f} best {best:.4f}")

        res = learn_permutation(
            consumers, g.size, n, m, perms[g.name], g.block_labels(), g.fixed_mask(),
            block=lc.block_size, steps=lc.steps, rounds=lc.rounds, lr=lc.lr, sinkhorn_iters=lc.sinkhorn_iters,
            tau_start=lc.tau_start, tau_end=lc.tau_end, generator=gen, device=config.device, on_step=on_step,
            swap_trials=lc.swap_trials, amp=lc.resolve_amp(config.device))
        if not g.is_valid(res.perm):
            raise RuntimeError(f"searched permutation for {g.name} breaks its constraints")
        perms[g.name] = res.perm
        r = by_name[g.name]
        scores = group_score_matrix(g, net, stats, config.criterion, pruned, m, seed=config.seed)
        r.kept_chosen = kept_fraction(scores, n, m, res.perm)
        r.strategy = "search"
        _record_search(r, lc.objective, float(res.loss_warm), float(res.loss_best), int(res.swaps),
                       f"{lc.objective} error {res.loss_warm:.5f} ({lc.warm_start}) -> {res.loss_best:.5f}"
                       f" ({res.swaps} exchanges kept)")
        if bar:
            bar.set_postfix_str(f"{g.name} {lc.objective} error {res.loss_warm:.4f} -> {res.loss_best:.4f}, "
                                f"kept importance {r.kept_chosen:.4f}")
        done_block[g.name] = _entry(r, res.perm)
    return done_block


_SEARCH_FIELDS = ("objective", "error_before", "error_after", "exchanges_kept")


def _record_search(r, objective: str, before: float, after: float, kept: int, note: str) -> None:
    """A group's exchange-search outcome: typed fields for programs, ``note`` for people."""
    r.objective, r.error_before, r.error_after, r.exchanges_kept, r.note = objective, before, after, kept, note


def _entry(r, perm: torch.Tensor) -> dict:
    """A searched group's checkpoint entry: its permutation and what :func:`_record_search` recorded."""
    return {"perm": perm.tolist(), "kept": r.kept_chosen, "note": r.note,
            **{key: getattr(r, key) for key in _SEARCH_FIELDS}}


RESIDUAL_KEY = "<residual>"  # checkpoint entry of the residual-stream refinement
MAX_RESIDUAL_ROWS = 131_072  # rows (all readers stacked) the residual refinement scores; a seeded sample beyond


def _refine_residual(groups, net, stats, config, pruned, perms, by_name, gen) -> dict:
    """Exchange refinement of the global residual-stream group(s) on the diagonal objective.

    Every pruned reader (q/k/v and gate/up of every block) contributes its rows: the energy ``W² E[x²]`` of each
    weight (``E[x²]`` from the calibration statistics, so nothing beyond what Wanda collected is needed), each
    reader scaled so its rows sum to 1, so the objective is the mean over readers of the share of ``Σ W² E[x²]``
    its mask drops (deep layers with large activations do not own it). At most ``MAX_RESIDUAL_ROWS`` rows
    (a seeded sample beyond that). Returns checkpoint entries like :func:`_search_block`.
    """
    from ..math.search import diagonal_exchanges
    from .sparsify import group_score_matrix

    n, m = config.sparsity.n, config.sparsity.m
    done = {}
    for g in groups:
        r = by_name.get(g.name)
        if (g.kind != "residual" or r is None or r.strategy == "none" or g.size % m or g.movable < 2 * m):
            continue
        energies, scores = [], []
        for mem in g.consumers:
            st = stats.get(mem.module) if stats else None
            if mem.param not in pruned or st is None:
                continue
            w = weight_kout(net, mem).detach().float()
            if not torch.equal(mem.index_tensor(w.shape[1]), torch.arange(g.size)):
                continue  # not one column per element in order (never the case for residual readers)
            e = w.square() * st.mean_sq
            energies.append((e / e.sum().clamp_min(1e-30)).T)
            scores.append(consumer_scores(net, mem, stats, config.criterion).T)
        if not energies:
            continue
        energy, score = torch.cat(energies, dim=1), torch.cat(scores, dim=1)  # [n, rows]
        if energy.shape[1] > MAX_RESIDUAL_ROWS:
            keep = torch.randperm(energy.shape[1], generator=gen)[:MAX_RESIDUAL_ROWS].sort().values
            energy, score = energy[:, keep], score[:, keep]
        energy, score = energy.contiguous(), score.contiguous()
        perm, before, after, kept = diagonal_exchanges(energy, score, perms[g.name], n, m, g.block_labels(),
                                                       g.fixed_mask(), trials=config.search.residual_trials,
                                                       generator=gen)
        if not g.is_valid(perm):
            raise RuntimeError(f"searched permutation for {g.name} breaks its constraints")
        perms[g.name] = perm
        matrix = group_score_matrix(g, net, stats, config.criterion, pruned, m, seed=config.seed)
        r.kept_chosen = kept_fraction(matrix, n, m, perm)
        r.strategy = "search"
        _record_search(r, "diagonal", float(before), float(after), int(kept),
                       f"diagonal error over {len(energies)} readers {before:.5f} ({config.search.warm_start})"
                       f" -> {after:.5f} ({kept} exchanges kept)")
        done[g.name] = _entry(r, perm)
    return done


def _block_rank(net: nn.Module) -> dict[str, int]:
    """Model order of the Transformer blocks (``block_key`` of every module, first appearance)."""
    rank: dict[str, int] = {}
    for name, _ in net.named_modules():
        rank.setdefault(block_key(name), len(rank))
    return rank


class _SequentialMasks:
    """Sequential calibration: prune the blocks already decided so later blocks see pruned inputs.

    ``mask_before(key, searching)`` zeroes, in place, every pruned weight of the blocks before ``key`` (and of
    ``key`` itself where its group is not being searched) with the N:M mask
    the pipeline will apply (criterion scores in the order given by its group's permutation, mapped back to
    the stored order); ``restore()`` puts the dense weights back. The permutations themselves are not
    folded: a mask in stored coordinates gives the same outputs.
    """

    def __init__(self, net, groups, perms, pruned, stats, criterion, n, m):
        self.net, self.perms, self.stats, self.criterion, self.n, self.m = net, perms, stats, criterion, n, m
        self.rank = _block_rank(net)
        self.owner = {}
        for g in groups:
            for mem in g.consumers:
                if mem.param in pruned:
                    self.owner.setdefault(mem.param, (g, mem))
        self.saved: dict[str, torch.Tensor] = {}

    def mask_before(self, key: str, searching: set[str]) -> None:
        """Mask the blocks before ``key`` and the weights of ``key`` whose groups are not in ``searching``
        (their permutation is already final, e.g. the global residual group's readers q/k/v and gate/up)."""
        from ..math.nm import nm_mask
        from .groups import gather_index

        limit = self.rank.get(key, len(self.rank))
        with torch.no_grad():
            for param, (g, mem) in self.owner.items():
                r = self.rank.get(block_key(mem.module), limit + 1)
                if param in self.saved or r > limit or (r == limit and g.name in searching):
                    continue
                w = weight_kout(self.net, mem)
                scores = consumer_scores(self.net, mem, self.stats, self.criterion)
                src = gather_index(mem.index_tensor(w.shape[1]), self.perms[g.name])
                mask = torch.empty_like(scores, dtype=torch.bool)
                mask[:, src] = nm_mask(scores[:, src], self.n, self.m)
                self.saved[param] = self.net.get_parameter(param).detach().clone()
                w.mul_(mask.to(w.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for param, dense in self.saved.items():
                self.net.get_parameter(param).copy_(dense)
        self.saved.clear()


def search_permutations(loaded, groups: list[Group], stats: dict, batches: list[dict], config, *, pruned: set[str],
                        quiet: bool = False, checkpoints: Checkpoints | None = None):
    """Searched permutations for every group; returns ``(perms, results)`` like ``choose_permutations``.
    ``checkpoints``: where finished blocks are saved and (``--resume``) reloaded from; None: no checkpoint."""
    n, m = config.sparsity.n, config.sparsity.m
    # "auto" becomes the family's objective here, so checkpoints, notes and Grams all name the real one
    config = replace(config, search=replace(config.search, objective=config.search.resolve_objective(loaded.family)))
    net = loaded.model
    net.eval()
    with group_progress(len(groups), f"warm start ({config.search.warm_start})", quiet) as progress:
        perms, results = choose_permutations(groups, net, stats, config.criterion, config.search.warm_start, n, m,
                                             pruned, seed=config.seed, progress=progress,
                                             kernel=config.search.warm_start_kernel())
    by_name = {r.name: r for r in results}

    searchable = [g for g in groups if g.kind != "residual" and g.size % m == 0 and g.movable >= 2 * m
                  and any(c.param in pruned for c in g.consumers)
                  and by_name[g.name].strategy != "none"]
    blocks: "OrderedDict[str, list[Group]]" = OrderedDict()
    for g in searchable:
        blocks.setdefault(block_key(g.consumers[0].module), []).append(g)
    keys = list(blocks)

    fp = _fingerprint(loaded, groups, config, batches)
    ckpt = checkpoints.open("search", fp, STATE_FILE) if checkpoints is not None else None
    state = (ckpt.load(_read_state) if ckpt is not None else None) or {"fingerprint": fp, "done": {}}

    def _saved(state) -> str:  # what the checkpoint holds, for the Ctrl-C hint
        return f"{sum(k in state['done'] for k in keys)} of {len(keys)} searched blocks are"

    if state["done"]:
        ckpt.saved = _saved(state)

    use_tqdm = not quiet
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc="search", unit="block", file=sys.stderr, leave=False)
    def restore(key):  # a finished block (or the residual phase) from the checkpoint
        for name, entry in state["done"][key].items():
            perms[name] = torch.tensor(entry["perm"], dtype=torch.long)
            r = by_name[name]
            r.kept_chosen, r.strategy, r.note = entry["kept"], "search", entry.get("note", "")
            for key in _SEARCH_FIELDS:  # absent from a checkpoint of an older version: left None
                setattr(r, key, entry.get(key))

    def save(key, entries, t1):
        for name in entries:
            by_name[name].seconds += time.perf_counter() - t1
        state["done"][key] = entries
        if ckpt is not None:
            ckpt.save(lambda folder: write_atomic(folder / STATE_FILE, lambda p: p.write_text(
                json.dumps(state), encoding="utf-8")), _saved(state))

    def generator(key):  # one per block: a resumed run draws the same numbers as an uninterrupted one
        return torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(key.encode()))

    for key in keys:  # finished blocks come from the checkpoint
        if key in state["done"]:
            restore(key)
            if bar:
                bar.update(1)
    if state["done"] and not quiet:
        reused = sum(k in state["done"] for k in keys)
        extra = " and the residual-stream refinement" if RESIDUAL_KEY in state["done"] else ""
        print(f"[permcompile] --resume: reused {reused} of {len(keys)} searched blocks{extra} from {ckpt.path}; "
              f"{len(keys) - reused} left to search", file=sys.stderr, flush=True)
    sensitivity = None
    todo = [k for k in keys if k not in state["done"]]
    if config.search.task_loss and todo:
        from ..calib.sensitivity import output_sensitivity

        modules = sorted({c.module for k in todo for g in blocks[k] for c in g.consumers if c.param in pruned})
        sensitivity = output_sensitivity(net, batches, modules, loaded.family, forward_kwargs=loaded.forward_kwargs(),
                                         seed=config.seed, progress=not quiet)
    sequential = None
    if config.search.sequential:
        sequential = _SequentialMasks(net, groups, perms, pruned, stats, config.criterion, n, m)
        chunks = [[k] for k in todo]  # each block sees the blocks before it pruned
    else:
        chunks = list(_chunks(todo, blocks, net, pruned, GRAM_BUDGET_BYTES))
    try:
        for chunk in chunks:
            modules = sorted({c.module for k in chunk for g in blocks[k] for c in g.consumers if c.param in pruned})
            t0 = time.perf_counter()
            if sequential is not None:
                sequential.mask_before(chunk[0], {g.name for g in blocks[chunk[0]]})
            if _stat_grams_suffice(config, sequential, stats, modules):
                hooks = _StatGrams(stats, modules)  # no forward pass, no K×K accumulators
            else:
                hooks = _GramHooks(net, modules, "cpu", config.search.objective)
                last = _last_module(net, modules)
                try:
                    with torch.no_grad():
                        for b in batches:
                            hooks.mask = b.get("attention_mask")
                            try:
                                net(**b, **loaded.forward_kwargs())
                            except StopForward:  # everything this chunk needs has run
                                pass
                finally:
                    hooks.close()
                    if last is not None:
                        last.remove()
            gram_seconds = (time.perf_counter() - t0) / max(1, len(chunk))
            for key in chunk:
                t1 = time.perf_counter() - gram_seconds  # each block is charged its share of the Gram pass
                done_block = _search_block(blocks[key], hooks, net, stats, config, pruned, perms, by_name,
                                          generator(key), bar, sensitivity)
                for g in blocks[key]:  # free this block's Grams before the next
                    for c in g.consumers:
                        hooks.grams.pop(c.module, None)
                save(key, done_block, t1)
                if bar:
                    bar.update(1)
        if config.search.residual_trials > 0:
            if RESIDUAL_KEY in state["done"]:
                restore(RESIDUAL_KEY)
            else:
                t1 = time.perf_counter()
                if bar:
                    bar.set_postfix_str(f"residual stream: {config.search.residual_trials} exchange trials")
                save(RESIDUAL_KEY, _refine_residual(groups, net, stats, config, pruned, perms, by_name,
                                                    generator(RESIDUAL_KEY)), t1)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the CLI's error line says how to go on
        if ckpt is not None:
            ckpt.hint(exc)
        raise
    finally:  # also on Ctrl-C: clear the bar so the error message starts its own line
        if sequential is not None:
            sequential.restore()
        if bar:
            bar.close()
    return perms, results
