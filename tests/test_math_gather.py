"""permcompile.math.gather: gather positions of a replicated channel axis under a permutation."""
from __future__ import annotations

import pytest
import torch

from permcompile.math.gather import gather_index


def test_plain_axis_gathers_the_permutation_itself():
    perm = torch.tensor([2, 0, 3, 1])
    src = gather_index(torch.arange(4), perm)
    assert torch.equal(src, perm)
    x = torch.tensor([10.0, 11.0, 12.0, 13.0])
    assert torch.equal(x.index_select(0, src), x[perm])


def test_replicated_axis_takes_each_copy_from_its_own_replica():
    # GQA-like: a member whose 6 positions carry elements 0..2 twice (two heads share them)
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    perm = torch.tensor([1, 2, 0])
    src = gather_index(index, perm)
    assert torch.equal(index[src], perm[index])  # position i now carries element perm[index[i]]
    assert sorted(src.tolist()) == list(range(6))  # a bijection: the k-th copy comes from the k-th replica
    assert src.tolist() == [1, 2, 0, 4, 5, 3]


def test_an_element_carried_fewer_times_cannot_receive_a_copy():
    with pytest.raises(ValueError, match="fewer times"):
        gather_index(torch.tensor([0, 0, 1]), torch.tensor([1, 0]))
