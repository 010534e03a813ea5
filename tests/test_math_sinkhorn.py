import pytest
import torch

from permcompile.math.nm import nm_mask
from permcompile.math.sinkhorn import (
    block_diag_apply,
    cosine_loss,
    harden,
    log_sinkhorn,
    mse_loss,
    perm_to_matrix,
    soft_nm_mask,
    straight_through,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_log_sinkhorn_is_doubly_stochastic(tau):
    log_alpha = torch.randn(3, 5, 16, 16, generator=_gen(0))
    p = log_sinkhorn(log_alpha, iters=50, tau=tau).exp()
    assert p.shape == log_alpha.shape
    assert torch.allclose(p.sum(-1), torch.ones(3, 5, 16), atol=1e-4)
    assert torch.allclose(p.sum(-2), torch.ones(3, 5, 16), atol=1e-4)


def test_log_sinkhorn_is_stable_for_extreme_inputs():
    log_alpha = torch.randn(8, 8, generator=_gen(1)) * 1e4
    out = log_sinkhorn(log_alpha, iters=20, tau=0.01)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        log_sinkhorn(log_alpha, 3, tau=0.0)


def test_log_sinkhorn_is_differentiable():
    log_alpha = torch.randn(6, 6, generator=_gen(2), requires_grad=True)
    log_sinkhorn(log_alpha, 5, 0.5).exp()[0, 0].backward()
    assert log_alpha.grad is not None and torch.isfinite(log_alpha.grad).all()


def test_perm_matrix_convention():
    w = torch.randn(3, 6, generator=_gen(3))
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    p = perm_to_matrix(perm)
    assert p.shape == (6, 6) and p[0, 2] == 1 and p.sum() == 6
    assert torch.allclose(w @ p.T, w[:, perm])


def test_harden_recovers_a_permutation_from_a_noisy_one_hot():
    perms = torch.stack([torch.randperm(12, generator=_gen(s)) for s in range(4)]).reshape(2, 2, 12)
    noisy = perm_to_matrix(perms) + 0.4 * torch.rand(2, 2, 12, 12, generator=_gen(9))
    hard = harden(noisy)
    assert hard.shape == (2, 2, 12) and hard.dtype == torch.long
    assert torch.equal(hard, perms)
    # log-probabilities from Sinkhorn work as well
    soft = log_sinkhorn(torch.log(noisy), iters=10, tau=0.1)
    assert torch.equal(harden(soft), perms)


def test_harden_returns_valid_permutations_for_random_input():
    soft = torch.randn(5, 9, 9, generator=_gen(4))
    hard = harden(soft)
    for perm in hard:
        assert torch.equal(perm.sort().values, torch.arange(9))


def test_harden_handles_minus_inf():
    mat = torch.full((3, 3), float("-inf"))
    mat[0, 1] = mat[1, 2] = mat[2, 0] = 0.0
    assert harden(mat).tolist() == [1, 2, 0]
    assert torch.equal(harden(torch.full((3, 3), float("-inf"))).sort().values, torch.arange(3))


def test_straight_through_has_the_hard_value_and_the_soft_gradient():
    logits = torch.randn(5, 5, generator=_gen(5), requires_grad=True)
    soft = log_sinkhorn(logits, 10, 0.5).exp()
    hard = perm_to_matrix(harden(soft.detach()))
    st = straight_through(hard, soft)
    assert torch.allclose(st, hard)
    weight = torch.randn(5, 5, generator=_gen(6))
    (st * weight).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_nm_mask_approaches_the_hard_mask():
    scores = torch.rand(6, 32, generator=_gen(7))
    hard = nm_mask(scores, 2, 4).float()
    coarse = soft_nm_mask(scores, 2, 4, tau=1.0)
    fine = soft_nm_mask(scores, 2, 4, tau=1e-5)
    assert coarse.min() >= 0 and coarse.max() <= 1
    assert (fine - hard).abs().max() < 1e-3
    assert (fine - hard).abs().mean() < (coarse - hard).abs().mean()
    assert torch.equal(soft_nm_mask(scores, 4, 4, 0.1), torch.ones_like(scores))


def test_soft_nm_mask_is_differentiable():
    scores = torch.rand(3, 8, generator=_gen(8), requires_grad=True)
    soft_nm_mask(scores, 2, 4, tau=0.1).mul(scores).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    with pytest.raises(ValueError):
        soft_nm_mask(torch.rand(2, 6), 2, 4, 0.1)


def test_losses():
    y_ref = torch.randn(4, 10, generator=_gen(10))
    assert mse_loss(y_ref, y_ref) == 0
    assert mse_loss(torch.zeros_like(y_ref), y_ref) == pytest.approx(1.0)
    assert mse_loss(2 * y_ref, y_ref) == pytest.approx(1.0)
    assert cosine_loss(y_ref, y_ref) == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(3 * y_ref, y_ref) == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-y_ref, y_ref) == pytest.approx(2.0, abs=1e-6)


def test_block_diag_apply_matches_indexing_for_hard_matrices():
    b, nb = 8, 4
    w = torch.randn(5, b * nb, generator=_gen(11))
    local = torch.stack([torch.randperm(b, generator=_gen(20 + i)) for i in range(nb)])
    perm = (local + torch.arange(nb)[:, None] * b).reshape(-1)
    out = block_diag_apply(w, perm_to_matrix(local))
    assert torch.allclose(out, w[:, perm])
    # leading dims are carried through
    w3 = torch.randn(2, 3, b * nb, generator=_gen(12))
    assert torch.allclose(block_diag_apply(w3, perm_to_matrix(local)), w3[..., perm])
    with pytest.raises(ValueError):
        block_diag_apply(w, perm_to_matrix(local)[:3])


def test_block_diag_apply_is_differentiable_in_the_soft_matrices():
    w = torch.randn(3, 16, generator=_gen(13))
    logits = torch.randn(2, 8, 8, generator=_gen(14), requires_grad=True)
    block_diag_apply(w, log_sinkhorn(logits, 5, 1.0).exp()).pow(2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
