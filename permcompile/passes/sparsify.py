"""Choose permutations per group and enforce N:M masks: the orchestration around ``permcompile.math``.

Every consumer of a group contributes its importance matrix ``[out, K]`` (criterion scores). The
group's objective is the importance kept by the N:M mask *in permuted order*, summed over its
consumers, so one permutation serves all the layers that share it.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..math.nm import criterion_scores, is_nm, kept_importance, nm_mask
from .fold import member_source
from .groups import Group


@dataclass
class LinearInfo:
    module: str  # module FQN
    param: str  # weight FQN
    k_axis: int  # 1 for nn.Linear ([out, K]); 0 for GPT-2 Conv1D ([K, out])
    shape: tuple[int, ...]
    prune: bool = True
    reason: str = ""  # why it stays dense

    @property
    def k(self) -> int:
        return self.shape[self.k_axis]


@dataclass
class GroupResult:
    name: str
    kind: str
    size: int
    strategy: str
    kept_identity: float
    kept_chosen: float
    seconds: float
    consumers: int
    fixed: int
    note: str = ""  # for people; the numbers a program reads are the typed fields below
    # the search strategy's exchanges (None for the heuristic strategies): its objective's error on this
    # group's pruned consumers with the warm start's permutation and with the one kept, and how many checked
    # exchanges it kept
    objective: str | None = None
    error_before: float | None = None
    error_after: float | None = None
    exchanges_kept: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MaskResult:
    layers: list[dict] = field(default_factory=list)
    dense: list[dict] = field(default_factory=list)


def weight_kout(model: nn.Module, info_or_member) -> torch.Tensor:
    """The weight in consumer orientation ``[out, K]`` (a view, no copy)."""
    param = info_or_member.param
    axis = info_or_member.k_axis if isinstance(info_or_member, LinearInfo) else info_or_member.axis
    w = model.get_parameter(param)
    return w if axis == 1 else w.t()


def _act_norm(stats: dict, module: str) -> torch.Tensor | None:
    s = stats.get(module) if stats else None
    return None if s is None else s.norm.float()


def consumer_scores(model, member_or_info, stats, criterion: str) -> torch.Tensor:
    w = weight_kout(model, member_or_info).detach().float()
    act = _act_norm(stats, member_or_info.module)
    if criterion != "magnitude" and act is None:
        raise KeyError(f"no calibration statistics for {member_or_info.module}")
    return criterion_scores(criterion, w, act)


MAX_ROWS = 16384  # residual groups stack every block's readers; a fixed row sample keeps the search fast


def group_score_matrix(group: Group, model: nn.Module, stats: dict, criterion: str, pruned: set[str],
                       m: int, normalize: bool = True, max_rows: int | None = MAX_ROWS,
                       seed: int = 0) -> torch.Tensor | None:
    """Stack every pruned consumer's scores in group-element columns: ``[rows, group.size]``.

    A consumer whose positions carry an element several times (GQA ``o_proj``) contributes one block of
    rows per replica. Consumers whose N:M stripes do not line up with the group's stripes are left out
    of the objective (they are still folded correctly). Past ``max_rows`` rows, a seeded uniform sample
    of them is kept. The sample is drawn over row numbers first, from the consumers' shapes alone, and each
    consumer's score matrix is computed and cut down to its sampled rows in turn: memory peaks at one
    consumer's scores plus the result, never the stack of a whole residual group (every reader of every
    block); the rows are those of sampling the full stack.
    """
    n = group.size
    layouts = []
    for mem in group.consumers:
        if mem.param not in pruned:
            continue
        rows, k = weight_kout(model, mem).shape  # shapes only: nothing computed yet
        index = mem.index_tensor(k)
        if not bool((index % m == torch.arange(index.numel()) % m).all()):
            continue
        counts = torch.bincount(index, minlength=n)
        layouts.append((mem, index, counts, rows, int(counts.max())))
    if not layouts:
        return None
    total = sum(rows * replicas for _, _, _, rows, replicas in layouts)
    keep = None
    if max_rows is not None and total > max_rows:
        # rows are independent terms of the objective: a seeded uniform sample estimates it without bias
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(total, generator=gen)[:max_rows].sort().values
    blocks = []
    offset = 0
    for mem, index, counts, rows, replicas in layouts:
        span = rows * replicas
        if keep is not None:
            lo, hi = torch.searchsorted(keep, torch.tensor([offset, offset + span])).tolist()
            local = keep[lo:hi] - offset  # this consumer's sampled rows, replica-major like the full stack
            offset += span
            if local.numel() == 0:
                continue
        else:
            local = None
            offset += span
        s = consumer_scores(model, mem, stats, criterion)
        if normalize:
            s = s / s.mean().clamp_min(1e-30)
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        for r in range(replicas):
            present = counts > r
            cols = torch.zeros(n, dtype=torch.long)
            cols[present] = order[starts[present] + r]
            if local is None:
                blocks.append(s[:, cols] * present.to(s.dtype))
                continue
            mine = local[(local >= r * rows) & (local < (r + 1) * rows)] - r * rows
            if mine.numel():
                blocks.append(s[mine][:, cols] * present.to(s.dtype))
        del s
    return torch.cat(blocks, dim=0) if blocks else torch.zeros(0, n)


@contextmanager
def group_progress(total: int, desc: str, quiet: bool):
    """A ``progress`` callback for :func:`choose_permutations` drawing a bar on stderr (None when quiet):
    ``greedy`` takes minutes on a 135M model."""
    if quiet:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="group", file=sys.stderr, leave=False)
    try:
        def advance(name: str) -> None:  # the whole group name: a cut one is ambiguous across blocks
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        yield advance
    finally:
        bar.close()


def choose_permutations(groups: list[Group], model: nn.Module, stats: dict, criterion: str, strategy: str,
                        n: int, m: int, pruned: set[str], seed: int = 0,
                        progress=None, *, kernel) -> tuple[dict[str, torch.Tensor], list[GroupResult]]:
    """One permutation per group with heuristic strategy ``strategy`` (``none``/``random``/``greedy``/``hungarian``),
    whose ``math/strategies`` function is ``kernel`` (``config.heuristic_kernel(strategy)``)."""
    fn = kernel
    perms: dict[str, torch.Tensor] = {}
    results: list[GroupResult] = []
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        start = time.perf_counter()
        scores = group_score_matrix(group, model, stats, criterion, pruned, m, seed=seed)
        if scores is None or group.size % m != 0 or group.movable < 2:
            note = "no pruned consumer" if scores is None else (
                "size not divisible by M" if group.size % m else "every element pinned")
            ident = torch.arange(group.size)
            perms[group.name] = ident
            k = kept_fraction(scores, n, m) if scores is not None and group.size % m == 0 else 0.0
            results.append(GroupResult(group.name, group.kind, group.size, "none", k, k, 0.0,
                                       len(group.consumers), len(set(group.fixed)), note))
            if progress:
                progress(group.name)
            continue
        perm = fn(scores, n, m, group.block_labels(), group.fixed_mask(), gen)
        perm = torch.as_tensor(perm, dtype=torch.long)
        if not group.is_valid(perm):  # post-condition of every strategy
            raise RuntimeError(f"strategy {strategy} returned an invalid permutation for {group.name}")
        k0, k1 = kept_fraction(scores, n, m), kept_fraction(scores, n, m, perm)
        perms[group.name] = perm
        results.append(GroupResult(group.name, group.kind, group.size, strategy, k0, k1,
                                   time.perf_counter() - start, len(group.consumers), len(set(group.fixed))))
        if progress:
            progress(group.name)
    return perms, results


def kept_fraction(scores: torch.Tensor, n: int, m: int, perm=None) -> float:
    """Share of the total score the N:M mask keeps. An all-zero score matrix (a zero weight, or inputs that are
    always zero) loses nothing to any mask: 1.0."""
    total = float(scores.sum())
    return kept_importance(scores, n, m, perm) / total if total > 0 else 1.0


def permute_stats_(stats: dict, groups: list[Group], perms: dict[str, torch.Tensor]) -> None:
    """Reorder calibration statistics the way ``fold_`` reordered the consumers' input channels."""
    for group in groups:
        perm = perms.get(group.name)
        if perm is None or torch.equal(perm, torch.arange(group.size)):
            continue
        for mem in group.consumers:
            s = stats.get(mem.module)
            if s is None:
                continue
            src = member_source(mem, perm, s.sum_sq.numel())
            s.sum_sq = s.sum_sq[src]
            if s.sum is not None:
                s.sum = s.sum[src]


@torch.no_grad()
def apply_masks_(model: nn.Module, linears: list[LinearInfo], stats: dict, criterion: str, n: int,
                 m: int) -> MaskResult:
    """Zero all but the N highest-scoring weights in every group of M along K (in stored order)."""
    result = MaskResult()
    for info in linears:
        if not info.prune:
            result.dense.append({"module": info.module, "param": info.param, "reason": info.reason})
            continue
        w = weight_kout(model, info)
        scores = consumer_scores(model, info, stats, criterion)
        mask = nm_mask(scores, n, m)
        total = float(scores.sum())
        kept = float((scores * mask).sum())
        w.mul_(mask.to(w.dtype))
        result.layers.append({"module": info.module, "param": info.param, "shape": list(info.shape),
                              "k": info.k, "sparsity": float(1 - mask.float().mean()),
                              "kept_importance": kept / total if total else 1.0})
    check_nm(model, linears, n, m)
    return result


def check_nm(model: nn.Module, linears: list[LinearInfo], n: int, m: int) -> None:
    """Post-condition: every pruned weight is N:M along its input axis."""
    bad = [i.module for i in linears if i.prune and not is_nm(weight_kout(model, i), n, m)]
    if bad:
        raise AssertionError(f"weights not {n}:{m} along K after masking: {', '.join(bad[:5])}")


def unstructured_masks_(model: nn.Module, linears: list[LinearInfo], stats: dict, criterion: str,
                        sparsity: float = 0.5) -> None:
    """The upper-bound baseline: the same criterion, unstructured per output row."""
    from ..math.nm import unstructured_mask

    with torch.no_grad():
        for info in linears:
            if info.prune:
                w = weight_kout(model, info)
                w.mul_(unstructured_mask(consumer_scores(model, info, stats, criterion), sparsity).to(w.dtype))


def select_linears(model: nn.Module, captured, groups: list[Group], m: int,
                   prune_embeddings: bool = False) -> list[LinearInfo]:
    """Every linear layer of the graph, with whether it is pruned and, if not, why."""
    from ..capture import linear_nodes, output_linears

    heads = output_linears(captured)
    tied = {p for p, c in captured.aliases.items() if p != c} | {c for p, c in captured.aliases.items() if p != c}
    out: list[LinearInfo] = []
    seen = set()
    for node, module, param in linear_nodes(captured):
        if param in seen:
            continue
        seen.add(param)
        shape = captured.param_shapes[param]
        k_axis = 1 if str(node.target) == "aten.linear.default" else 0
        info = LinearInfo(module, param, k_axis, shape)
        if not prune_embeddings and (node.name in heads or param in tied):
            info.prune, info.reason = False, "output head (embeddings and LM head stay dense)"
        elif info.k % m != 0:
            info.prune, info.reason = False, f"K={info.k} not divisible by M={m}"
        out.append(info)
    return out
