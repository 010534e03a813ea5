"""Per-layer residual permutations: the one place permcompile adds operations to the graph ("glue").

Why: the residual stream is one channel space shared by every block, so a zero-glue permutation of it
must suit all the linears that read it (q/k/v and gate/up of every layer) at once, and one order cannot
suit them all. With ``residual="per-layer"`` each *reading site* (one tensor read by sibling linears:
q/k/v after the attention norm, gate/up after the MLP norm) gets its own permutation instead: the
readers' input columns are permuted and one gather reorders their shared input at run time
(``x[..., index]``). The function is exactly unchanged; the cost is one gather of K channels per token per
site, which the report counts as glue.

Data: :func:`split_residual` turns each residual group into the global group (producers, passengers,
the readers it could not split) plus one ``glue`` group per reading site (consumers only, no
constraints). Transforms: :func:`insert_glue_` (called by ``fold_``) registers the gathers;
:func:`standard_form` temporarily undoes the column permutation so ``hf/`` is saved as a plain
checkpoint that computes the same function without any gather (its pruned weights are then N:M only
after applying the recorded index).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .groups import Group, Pin, gather_index


def _shared_params(model: nn.Module) -> set[str]:
    """Parameter names whose tensor is also reachable under another name (tied weights)."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def split_residual(groups: list[Group], model: nn.Module, pruned: set[str]) -> list[Group]:
    """Give every reading site of each residual group its own group (analysis: returns new data).

    A site's readers move into a ``glue`` group when they are pruned, not tied to another parameter,
    read only at that site, and carry the channels in the same order (so one gather serves them all).
    Everything else stays in the residual group, which keeps its producers and passengers and is pinned
    (the sites' readers expect the stream in the model's own order).
    """
    tied = _shared_params(model)
    out: list[Group] = []
    for g in groups:
        if g.kind != "residual":
            out.append(g)
            continue
        by_module: dict[str, list] = {}
        for mem in g.consumers:
            by_module.setdefault(mem.module, []).append(mem)
        site_count: dict[str, int] = {}
        for sib in g.siblings:
            for mod in set(sib):
                site_count[mod] = site_count.get(mod, 0) + 1
        taken: set[str] = set()
        local: list[Group] = []
        for sib in g.siblings:
            mems = []
            for mod in sib:
                cands = by_module.get(mod, [])
                if (len(cands) != 1 or site_count.get(mod) != 1 or cands[0].param not in pruned
                        or cands[0].param in tied):
                    continue
                mems.append(cands[0])
            by_index: dict = {}
            for mem in mems:
                by_index.setdefault(mem.index, []).append(mem)
            for members in by_index.values():
                name = f"{g.name}@{_common_prefix([m.module for m in members])}"
                local.append(Group(name=name, size=g.size, members=list(members),
                                   siblings=[[m.module for m in members]], kind="residual-site", glue=True))
                taken.update(m.param for m in members)
        if not taken:
            out.append(g)
            continue
        # the sites' readers expect the stream in the model's order: the stream itself no longer moves
        pin = Pin("every reading site", "per-layer", "per-layer residual: the stream keeps its order, each reading "
                  "site has its own permutation", "", g.size)
        out.append(replace(g, members=[m for m in g.members if not (m.role == "consumer" and m.param in taken)],
                           siblings=[[s for s in sib if not any(m.module == s and m.param in taken
                                                                for m in g.consumers)] for sib in g.siblings],
                           fixed=list(range(g.size)), pins=list(g.pins) + [pin]))
        out.extend(local)
    return out


def _common_prefix(modules: list[str]) -> str:
    """``model.layers.0.self_attn`` for its q/k/v projections; the module itself when alone."""
    parts = [m.split(".") for m in modules]
    common = []
    for items in zip(*parts):
        if len(set(items)) > 1:
            break
        common.append(items[0])
    return ".".join(common) or modules[0]


class GatherInput:
    """Forward pre-hook ``x -> x[..., index]`` on a linear's input; siblings share one gather.

    ``memo`` is shared by the readers of one site: when they receive the very same tensor (the usual
    case: q, k and v read one variable), the gathered tensor is reused, so an exported graph holds one
    Gather per site. The memo is dropped once every reader has taken it.
    """

    def __init__(self, index: torch.Tensor, memo: dict, readers: int):
        self.index = index
        self.memo = memo
        self.readers = readers

    def __call__(self, _module, args):
        x = args[0]
        memo = self.memo
        if memo.get("x") is x and memo.get("left", 0) > 0:
            y = memo["y"]
            memo["left"] -= 1
            if memo["left"] == 0:
                memo.clear()
        else:
            y = x.index_select(-1, self.index.to(x.device))
            memo.clear()
            if self.readers > 1:
                memo.update(x=x, y=y, left=self.readers - 1)
        return (y,) + tuple(args[1:])


def _glue_sources(model: nn.Module, group: Group, perm: torch.Tensor) -> list[tuple[str, str, int, torch.Tensor]]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for mem in group.consumers:
        k = tensors[mem.param].shape[mem.axis]
        out.append((mem.module, mem.param, mem.axis, gather_index(mem.index_tensor(k), perm)))
    return out


def insert_glue_(model: nn.Module, group: Group, perm: torch.Tensor) -> int:
    """Register the gathers that make ``group``'s (already permuted) readers compute what they did.

    Each reader's columns were gathered with ``src`` (``W' = W[:, src]``), so its input is gathered with
    the same ``src``: ``W' x[src] = W x``. Returns the number of gather ops (one per site).
    """
    sources = _glue_sources(model, group, perm)
    memo: dict = {}
    for module, _param, _axis, src in sources:
        mod = model.get_submodule(module)
        handle = mod.register_forward_pre_hook(GatherInput(src.clone(), memo, len(sources)))
        handles = getattr(mod, "_permcompile_glue", [])
        handles.append(handle)
        mod._permcompile_glue = handles
    return 1 if sources else 0


def glue_records(model: nn.Module, groups: list[Group], perms: dict) -> list[dict]:
    """What the report says about each gather: its readers, their parameters and the index (JSON data)."""
    records = []
    for g in groups:
        perm = perms.get(g.name)
        if not g.glue or perm is None or torch.equal(torch.as_tensor(perm), torch.arange(g.size)):
            continue
        for module, param, axis, src in _glue_sources(model, g, torch.as_tensor(perm)):
            records.append({"group": g.name, "module": module, "param": param, "k_axis": axis,
                            "index": [int(i) for i in src]})
    return records


def glue_cost(model: nn.Module, groups: list[Group], perms: dict, linears) -> dict:
    """Run-time cost of the gathers, per token: elements moved vs the linear layers' multiply-adds."""
    sites = [g for g in groups if g.glue and perms.get(g.name) is not None
             and not torch.equal(torch.as_tensor(perms[g.name]), torch.arange(g.size))]
    moved = sum(g.size for g in sites)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    macs = sum(int(tensors[i.param].numel()) for i in linears if i.param in tensors)
    return {"ops": len(sites), "elements_per_token": moved, "linear_macs_per_token": macs,
            "ratio": moved / macs if macs else 0.0}


@contextmanager
def standard_form(model: nn.Module, records: list[dict]):
    """Temporarily put the glued readers' columns back in the model's own order (for saving ``hf/``).

    Inside the block the weights compute, without any gather, what the glued model computes; the
    deployment order is restored on exit, whatever happens.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    done = []
    try:
        for rec in records:
            t = tensors[rec["param"]]
            src = torch.tensor(rec["index"], dtype=torch.long, device=t.device)
            inv = torch.empty_like(src)
            inv[src] = torch.arange(src.numel(), device=t.device)
            t.data.copy_(t.data.index_select(rec["k_axis"], inv))
            done.append((t, rec["k_axis"], src))
        yield
    finally:
        for t, axis, src in reversed(done):
            t.data.copy_(t.data.index_select(axis, src))
