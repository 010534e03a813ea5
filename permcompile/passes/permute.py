"""The permute step: one interface for every permutation strategy, a handler per name (as torchao's ``quantize_``
dispatches on its config), each returning ``(perms by group name, GroupResult per group)``.

``permute`` owns the step's post-condition: every group gets a permutation its coupling allows
(``Group.is_valid``: pinned elements stay, head blocks move together), whatever the handler did.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import LearnedConfig, SearchConfig
from ..errors import UsageError
from ..registry import Registry


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


class _Heuristic:
    """Handler of a strategy that scores each group on its own with a pure function of ``math/strategies``
    (``kernel``); the search and learned strategies start from one of these (their warm start). The function is
    imported when first used: the CLI reads this table before torch is imported."""

    def __init__(self, function: str):
        self.function = function

    @property
    def kernel(self):
        from ..math import strategies

        return getattr(strategies, self.function)

    def __call__(self, req: PermuteRequest):
        from .sparsify import choose_permutations, group_progress

        cfg = req.config
        with group_progress(len(req.groups), cfg.permutation, req.quiet) as progress:
            return choose_permutations(req.groups, req.loaded.model, req.stats, cfg.criterion, cfg.permutation,
                                       cfg.sparsity.n, cfg.sparsity.m, req.pruned, seed=cfg.seed, progress=progress)


def _search(req: PermuteRequest):
    from .search import search_permutations

    return search_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, pruned=req.pruned,
                               quiet=req.quiet, checkpoints=req.checkpoints)


def _learned(req: PermuteRequest):
    from .learned import learned_permutations

    return learned_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, linears=req.linears,
                                quiet=req.quiet, checkpoints=req.checkpoints)


STRATEGIES = Registry("permutation strategy", "--permutation")
STRATEGIES.add("none", _Heuristic("identity"), help="keep the original channel order")
STRATEGIES.add("random", _Heuristic("random_perm"), help="a seeded random valid permutation (a baseline)")
STRATEGIES.add("greedy", _Heuristic("greedy"), help="Apex-ASP-style best-swap search on the criterion scores")
STRATEGIES.add("hungarian", _Heuristic("hungarian"),
               help="stripe slots reassigned by linear assignment on the criterion scores (the default: with "
                    "the weight update as good as search and learned, several times faster)")
STRATEGIES.add("search", _search, config_type=SearchConfig,
               help="exchange search on a per-layer output proxy, from a hungarian warm start (--search KEY=VALUE)")
STRATEGIES.add("learned", _learned, config_type=LearnedConfig,
               help="learned end to end against the model's own output (slowest; pays with --update none)")


def heuristic_kernel(name: str):
    """The ``math/strategies`` function behind heuristic strategy ``name`` (none, random, greedy, hungarian)."""
    handler = STRATEGIES.get(name).handler
    if not isinstance(handler, _Heuristic):
        raise UsageError(f"{name} is not a per-group heuristic (choose one of "
                         f"{', '.join(n for n in STRATEGIES if isinstance(STRATEGIES.get(n).handler, _Heuristic))})")
    return handler.kernel


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
