import pytest
import torch

from permcompile.math import learned as E
from permcompile.math.nm import nm_mask
from permcompile.math.sinkhorn import perm_to_matrix


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.25])
def test_soft_permutation_is_doubly_stochastic(tau):
    logits = torch.randn(5, 16, 16, generator=_gen(0))
    p = E.soft_permutation(logits, tau, iters=300)
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(5, 16), atol=1e-3)
    assert torch.allclose(p.sum(-2), torch.ones(5, 16), atol=1e-5)


def test_warm_logits_harden_to_the_identity():
    logits = E.init_logits(3, 16, scale=2.0, generator=_gen(1))
    perm, _ = E.harden_st(E.soft_permutation(logits, 1.0, 5))
    assert torch.equal(perm, torch.arange(16).expand(3, 16))


def test_harden_st_is_hard_forward_soft_backward():
    logits = torch.randn(2, 8, 8, generator=_gen(2), requires_grad=True)
    soft = E.soft_permutation(logits, 0.5, 5)
    perm, q = E.harden_st(soft)
    assert torch.allclose(q.detach(), perm_to_matrix(perm), atol=1e-6)
    (q * torch.randn(2, 8, 8, generator=_gen(3))).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_block_layout_respects_labels_and_fixed():
    labels = torch.tensor([0] * 12 + [1] * 12)
    fixed = torch.zeros(24, dtype=torch.bool)
    fixed[[0, 13]] = True
    layouts = E.block_layout(labels, fixed, block=8)
    seen = torch.cat([lay.flatten() for lay in layouts])
    assert seen.unique().numel() == seen.numel() == 22  # every free position once, the fixed ones never
    for lay in layouts:
        for row in lay:
            assert labels[row].unique().numel() == 1
    with pytest.raises(ValueError):
        E.block_layout(labels, fixed, block=1)


def test_composed_block_permutations_are_valid():
    labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
    fixed = torch.zeros(24, dtype=torch.bool)
    fixed[[3, 17]] = True
    # a valid warm start: shuffle each label's free elements
    warm = torch.arange(24)
    for lab in range(3):
        pos = torch.nonzero((labels == lab) & ~fixed).flatten()
        warm[pos] = pos[torch.randperm(pos.numel(), generator=_gen(lab))]
    for lay in E.block_layout(labels, fixed, block=4):
        logits = torch.randn(lay.shape[0], lay.shape[1], lay.shape[1], generator=_gen(7))
        q, _ = E.harden_st(E.soft_permutation(logits, 0.2, 5))
        warm = E.compose_blocks(warm, lay, q)
    assert torch.equal(warm.sort().values, torch.arange(24))
    assert torch.equal(labels[warm], labels)
    assert torch.equal(warm[fixed], torch.arange(24)[fixed])


def test_compose_blocks_matches_folding_twice():
    base = torch.randperm(12, generator=_gen(4))
    layout = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    q = torch.stack([torch.randperm(4, generator=_gen(5 + b)) for b in range(3)])
    w = torch.randn(3, 12, generator=_gen(6))
    full = E.compose_blocks(base, layout, q)
    # folding base then q (in the folded coordinates) is folding the composition
    assert torch.equal(w[:, base][:, E.compose_blocks(torch.arange(12), layout, q)], w[:, full])


def test_permute_columns_with_hard_matrices_is_a_gather_and_unpermute_inverts_it():
    x = torch.randn(5, 12, generator=_gen(8))
    colidx = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]])  # columns 8-11 stay put
    q = torch.stack([torch.randperm(4, generator=_gen(9)), torch.randperm(4, generator=_gen(10))])
    y = E.permute_columns(x, colidx, perm_to_matrix(q))
    expect = x.clone()
    for b in range(2):
        expect[:, colidx[b]] = x[:, colidx[b][q[b]]]
    assert torch.equal(y, expect)
    assert torch.allclose(E.unpermute_columns(y, colidx, perm_to_matrix(q)), x)


def test_st_nm_mask_is_the_hard_mask_with_a_surrogate_gradient():
    s = torch.rand(6, 16, generator=_gen(11)).requires_grad_()
    mask = E.st_nm_mask(s, 2, 4, tau=0.5)
    assert torch.equal(mask.detach().bool(), nm_mask(s.detach(), 2, 4))
    soft = E.soft_topn_mask(s, 2, 4, 0.5)
    assert torch.allclose(soft.reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2.0))
    (mask * torch.randn(6, 16, generator=_gen(12))).sum().backward()
    assert s.grad.abs().sum() > 0


def test_losses_vanish_at_the_reference_and_grow_away_from_it():
    y = torch.randn(2, 5, 11, generator=_gen(13))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(E.kl_to_dense(y, y, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(E.cosine_distance(y, y, mask)) == pytest.approx(0.0, abs=1e-6)
    noisy = y + torch.randn(2, 5, 11, generator=_gen(14))
    assert float(E.kl_to_dense(noisy, y, mask)) > 0.01
    assert float(E.cosine_distance(noisy, y, mask)) > 0.01
    # padding is ignored: changing a masked token changes nothing
    moved = noisy.clone()
    moved[0, 4] += 100
    assert float(E.cosine_distance(moved, y, mask)) == pytest.approx(float(E.cosine_distance(noisy, y, mask)))
    ids = torch.randint(0, 11, (2, 5), generator=_gen(15))
    peaked = torch.full((2, 5, 11), -20.0)
    peaked[:, :-1].scatter_(-1, ids[:, 1:, None], 20.0)
    assert float(E.next_token_ce(peaked, ids)) < 1e-6
    assert float(E.layerwise_distill([y, y], [y, y])) == 0.0
    assert float(E.layerwise_distill([noisy], [y])) > 0


def test_anneal_is_geometric():
    assert E.anneal(0, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert E.anneal(9, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert E.anneal(5, 11, 1.0, 0.01) == pytest.approx(0.1)
