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
