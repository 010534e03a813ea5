"""The permute step: one interface for every permutation strategy, a handler per name (as torchao's ``quantize_``
dispatches on its config), each returning ``(perms by group name, GroupResult per group)``.

``permute`` owns the step's post-condition: every group gets a permutation its coupling allows
(``Group.is_valid``: pinned elements stay, head blocks move together), whatever the handler did.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import STRATEGIES, heuristic_kernel


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
    checkpoints: object = None  # passes.checkpoint.Checkpoints: where a resumable strategy keeps its state


def permute(req: PermuteRequest) -> tuple[dict, list]:
    """Run the configured strategy; raises if it returned a permutation its group's coupling forbids."""
    import torch

    perms, results = STRATEGIES.get(req.config.permutation).handler(req)
    for g in req.groups:
        perm = perms.get(g.name)
        if perm is None:
            perms[g.name] = perm = torch.arange(g.size)
        if not g.is_valid(torch.as_tensor(perm)):
            raise RuntimeError(f"strategy {req.config.permutation} returned an invalid permutation for {g.name}")
    return perms, results


__all__ = ["PermuteRequest", "STRATEGIES", "heuristic_kernel", "permute"]
