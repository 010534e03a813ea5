"""Coupling groups as data.

A *group* is one channel space of the model: a set of tensor axes whose entries must be permuted together
so that the model computes the same function. The analysis (``passes/coupling.py``) finds them from the
exported graph; strategies choose one permutation per group; ``passes/fold.py`` applies it to the weights.

Every member names a parameter by fully qualified name (FQN), the axis of that parameter that moves,
and ``index``: for each position along that axis, the group element it carries (``None`` means
``range(size)``). Several positions may carry the same element (GQA: one kv head's value channel feeds
several query heads' columns of ``o_proj``); the k-th position carrying element ``e`` then takes the
k-th position carrying ``perm[e]``.

Roles:
- ``consumer``: a linear layer's input channels (its K axis, the N:M axis);
- ``producer``: the rows (and bias) of the layer that writes the channels;
- ``passenger``: norm weights/biases, position/class embeddings, layer scales riding along.

Constraints on a permutation ``perm`` (``perm[p]`` = element placed at position ``p``):
- ``fixed``: elements that must stay where they are (``perm[e] == e``); they come from *pins*,
  graph outputs or operations the analysis does not understand;
- ``blocks``: a block label per element; ``perm`` may only move an element within its block
  (attention heads: a value channel cannot move to another head).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from ..math.gather import gather_index as gather_index  # re-exported: the passes import it from here


@dataclass(frozen=True)
class Member:
    param: str
    axis: int
    role: str  # "consumer" | "producer" | "passenger"
    index: tuple[int, ...] | None = None  # element carried by each position; None = identity
    module: str = ""  # owning module FQN (for reports)

    def index_tensor(self, size: int) -> torch.Tensor:
        if self.index is None:
            return torch.arange(size)
        return torch.tensor(self.index, dtype=torch.long)


@dataclass(frozen=True)
class Pin:
    node: str
    op: str
    reason: str
    module: str = ""
    elements: int = 0  # how many elements this pin fixes


@dataclass
class Group:
    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    fixed: list[int] = field(default_factory=list)  # elements that may not move
    blocks: list[int] | None = None  # block label per element; None = one block
    pins: list[Pin] = field(default_factory=list)
    siblings: list[list[str]] = field(default_factory=list)  # consumer modules reading the same tensor
    kind: str = "other"  # "residual" | "residual-site" | "mlp" | "attention" | "other"
    glue: bool = False  # readers only: folding it needs a gather of their input (passes/glue.py)

    # ---- views -----------------------------------------------------------------------------
    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    @property
    def passengers(self) -> list[Member]:
        return [m for m in self.members if m.role == "passenger"]

    @property
    def pinned(self) -> bool:
        """True when every element is fixed: the group cannot move without glue."""
        return len(self.fixed) >= self.size

    @property
    def movable(self) -> int:
        return self.size - len(set(self.fixed))

    def fixed_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool)
        if self.fixed:
            mask[torch.tensor(sorted(set(self.fixed)), dtype=torch.long)] = True
        return mask

    def block_labels(self) -> torch.Tensor:
        if self.blocks is None:
            return torch.zeros(self.size, dtype=torch.long)
        return torch.tensor(self.blocks, dtype=torch.long)

    def is_valid(self, perm: torch.Tensor) -> bool:
        """Whether ``perm`` is a permutation that respects ``fixed`` and ``blocks``."""
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (self.size,) or not torch.equal(perm.sort().values, torch.arange(self.size)):
            return False
        labels = self.block_labels()
        if not torch.equal(labels[perm], labels):
            return False
        fixed = self.fixed_mask()
        return bool(torch.equal(perm[fixed], torch.arange(self.size)[fixed]))

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = [_compact_member(m) for m in self.members]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        members = [
            Member(m["param"], m["axis"], m["role"], tuple(m["index"]) if m.get("index") is not None else None,
                   m.get("module", ""))
            for m in d["members"]
        ]
        pins = [Pin(**p) for p in d.get("pins", [])]
        return cls(d["name"], d["size"], members, list(d.get("fixed", [])), d.get("blocks"), pins,
                   [list(s) for s in d.get("siblings", [])], d.get("kind", "other"), bool(d.get("glue", False)))


def _compact_member(m: Member) -> dict:
    d = asdict(m)
    d["index"] = list(m.index) if m.index is not None else None
    return d


def groups_to_json(groups: Iterable[Group]) -> str:
    return json.dumps([g.to_dict() for g in groups], indent=1)


def groups_from_json(text: str) -> list[Group]:
    return [Group.from_dict(d) for d in json.loads(text)]
