"""Where each position of a (possibly replicated) channel axis is gathered from under a permutation.

Pure index arithmetic: the passes (fold, glue) and the learner's maths both use it.
"""
from __future__ import annotations

import torch


def gather_index(index: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Positions to gather along a member's axis so that it follows ``perm``.

    ``index[i]`` is the element carried by position ``i``; after permuting, position ``i`` must carry
    element ``perm[index[i]]``, taken from the same replica (the k-th position that carried it).
    Returns ``src`` with ``new = old.index_select(axis, src)``.
    """
    index = torch.as_tensor(index, dtype=torch.long)
    perm = torch.as_tensor(perm, dtype=torch.long)
    n = perm.numel()
    # rank of each position among the positions carrying the same element (stable)
    order = torch.argsort(index, stable=True)
    sorted_idx = index[order]
    counts = torch.bincount(index, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(index)
    rank[order] = torch.arange(index.numel()) - starts[sorted_idx]
    target = perm[index]
    if bool((counts[target] <= rank).any()):
        raise ValueError("permutation moves an element to one this member carries fewer times")
    return order[starts[target] + rank]


def replica_columns(cols: torch.Tensor, n: int, layout: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For a block layout ``layout`` ([blocks, B] group positions) of a group of ``n`` elements and a consumer whose
    columns carry elements ``cols``: per replica (GQA: a kv element read by several query heads), the blocks whose
    every element this consumer carries that many times, and the columns carrying them: ``[(blocks, columns)]``."""
    counts = torch.bincount(cols, minlength=n)
    order = torch.argsort(cols, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    out = []
    for rep in range(int(counts.max()) if counts.numel() else 0):
        present = (counts[layout] > rep).all(dim=1)
        if not bool(present.any()):
            continue
        sel = torch.nonzero(present).flatten()
        out.append((sel, order[starts[layout[sel]] + rep]))
    return out
