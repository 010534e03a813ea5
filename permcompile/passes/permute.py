"""The permute step: one interface for every permutation strategy, a handler per name (as torchao's ``quantize_``
dispatches on its config), each returning ``(perms by group name, GroupResult per group)``.

``permute`` owns the step's post-condition: every group gets a permutation its coupling allows
(``Group.is_valid``: pinned elements stay, head blocks move together), whatever the handler did.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PermuteRequest:
    """What a strategy may read. ``stats`` are the search statistics (criterion or OBS), ``config`` the run's
    ``OptimizeConfig`` (with the criterion the search scores by)."""

    loaded: object
    groups: list
    stats: dict
    batches: list
    config: object
    linears: list
    pruned: set
    quiet: bool = True
    resume: bool = False
    checkpoint_dir: str | None = None


def _heuristic(req: PermuteRequest):
    from .sparsify import choose_permutations, group_progress

    cfg = req.config
    with group_progress(len(req.groups), cfg.permutation, req.quiet) as progress:
        return choose_permutations(req.groups, req.loaded.model, req.stats, cfg.criterion, cfg.permutation,
                                   cfg.sparsity.n, cfg.sparsity.m, req.pruned, seed=cfg.seed, progress=progress)


def _search(req: PermuteRequest):  # exchange search on a per-layer proxy (passes/learn.py; "learned" before #21)
    from .search import learn_permutations

    return learn_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, pruned=req.pruned,
                              quiet=req.quiet, resume=req.resume, checkpoint_dir=req.checkpoint_dir)


def _learned(req: PermuteRequest):  # learned end to end against the model's own output (passes/e2e.py)
    from .learned import e2e_permutations

    return e2e_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, linears=req.linears,
                            quiet=req.quiet, resume=req.resume, checkpoint_dir=req.checkpoint_dir)


HANDLERS = {"none": _heuristic, "random": _heuristic, "greedy": _heuristic, "hungarian": _heuristic,
            "search": _search, "learned": _learned, "e2e": _learned}  # "e2e": alias of "learned"


def permute(req: PermuteRequest) -> tuple[dict, list]:
    """Run the configured strategy; raises if it returned a permutation its group's coupling forbids."""
    perms, results = HANDLERS[req.config.permutation](req)
    for g in req.groups:
        perm = perms.get(g.name)
        if perm is None:
            perms[g.name] = perm = torch.arange(g.size)
        if not g.is_valid(torch.as_tensor(perm)):
            raise RuntimeError(f"strategy {req.config.permutation} returned an invalid permutation for {g.name}")
    return perms, results
