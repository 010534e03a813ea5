"""Fold a permutation per coupling group into the model's weights, in place.

Why: the deployed graph must carry no extra gather. Permuting a group's consumers' input columns, its
producers' rows and its passengers' entries together leaves the function unchanged, so the permutation
disappears into the weights. The exception is a ``glue`` group (per-layer residual sites,
``passes/glue.py``): it has readers only, so one gather of their input is registered with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .groups import Group, gather_index


@dataclass
class FoldReport:
    groups_permuted: int = 0
    tensors_changed: int = 0
    glue_ops: int = 0
    skipped: list[str] = field(default_factory=list)


def random_permutation(group: Group, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation that respects the group's blocks and fixed elements."""
    perm = torch.arange(group.size)
    labels = group.block_labels()
    fixed = group.fixed_mask()
    for label in torch.unique(labels):
        pos = torch.nonzero((labels == label) & ~fixed).flatten()
        if pos.numel() > 1:
            perm[pos] = pos[torch.randperm(pos.numel(), generator=generator)]
    return perm


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


def member_source(member, perm: torch.Tensor, size: int) -> torch.Tensor:
    """Positions to gather along ``member``'s axis (``new = old.index_select(axis, src)``)."""
    return gather_index(member.index_tensor(size), perm)


@torch.no_grad()
def fold_(model: nn.Module, groups: list[Group], perms: dict[str, torch.Tensor]) -> FoldReport:
    """Permute every member of every group in ``perms`` in place; identity permutations are skipped.

    Raises ValueError when a permutation violates its group's constraints (post-condition of the
    strategies) so a wrong model is never produced.
    """
    tensors = _tensors(model)
    report = FoldReport()
    done: dict[tuple[int, int], torch.Tensor] = {}
    for group in groups:
        perm = perms.get(group.name)
        if perm is None:
            continue
        perm = torch.as_tensor(perm, dtype=torch.long).cpu()
        if not group.is_valid(perm):
            raise ValueError(f"permutation for group {group.name} breaks its constraints (blocks or pins)")
        if torch.equal(perm, torch.arange(group.size)):
            continue
        report.groups_permuted += 1
        for mem in group.members:
            if mem.param not in tensors:
                raise KeyError(f"group {group.name} names {mem.param}, which the model does not have")
            t = tensors[mem.param]
            src = member_source(mem, perm, t.shape[mem.axis])
            key = (id(t), mem.axis)
            if key in done:
                if not torch.equal(done[key], src):
                    raise ValueError(f"{mem.param} would be permuted twice along axis {mem.axis}")
                continue
            done[key] = src
            t.data.copy_(t.data.index_select(mem.axis, src.to(t.device)))
            report.tensors_changed += 1
        if group.glue:
            from .glue import insert_glue_

            report.glue_ops += insert_glue_(model, group, perm)
    return report
