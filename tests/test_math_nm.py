import pytest
import torch

from permcompile.math.nm import (
    criterion_scores,
    is_nm,
    kept_importance,
    magnitude_scores,
    nm_mask,
    nm_violations,
    ria_scores,
    unstructured_mask,
    wanda_scores,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_mask_keeps_the_n_largest_of_every_stripe(n, m):
    scores = torch.rand(7, 6 * m, generator=_gen())
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    stripes = mask.reshape(7, 6, m)
    assert torch.all(stripes.sum(-1) == n)
    s = scores.reshape(7, 6, m)
    kept_min = torch.where(stripes, s, torch.inf).amin(-1)
    dropped_max = torch.where(stripes, -torch.inf, s).amax(-1)
    assert torch.all(kept_min >= dropped_max)


def test_nm_mask_ties_keep_the_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, True, False, False, False, True, True, False]]


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(torch.rand(3, 10), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.rand(3, 8), 5, 4)


def test_is_nm_and_violations():
    w = torch.randn(5, 16, generator=_gen(1))
    assert not is_nm(w, 2, 4)
    assert nm_violations(w, 2, 4) == 5 * 4
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert is_nm(pruned, 2, 4) and nm_violations(pruned, 2, 4) == 0
    # one stripe with three nonzeros is one violation
    pruned[2, 4:7] = 1.0
    assert nm_violations(pruned, 2, 4) == 1 and not is_nm(pruned, 2, 4)
    # fewer than n nonzeros is fine
    assert is_nm(torch.zeros(2, 8), 2, 4)


def test_kept_importance_matches_the_mask_and_the_permutation():
    scores = torch.rand(6, 12, generator=_gen(2))
    assert kept_importance(scores, 2, 4) == pytest.approx(float((scores * nm_mask(scores, 2, 4)).sum()), rel=1e-6)
    perm = torch.randperm(12, generator=_gen(3))
    assert kept_importance(scores, 2, 4, perm) == pytest.approx(kept_importance(scores[:, perm], 2, 4), rel=1e-12)
    assert kept_importance(scores, 4, 4) == pytest.approx(float(scores.sum()), rel=1e-6)
    assert kept_importance(scores, 0, 4) == 0.0


def test_criteria_formulas():
    w = torch.randn(4, 8, generator=_gen(4))
    act = torch.rand(8, generator=_gen(5)) + 0.1
    assert torch.equal(magnitude_scores(w), w.abs())
    assert torch.allclose(wanda_scores(w, act), w.abs() * act[None, :])
    expected = torch.empty_like(w)
    for i in range(4):
        for j in range(8):
            a = w[i, j].abs()
            expected[i, j] = (a / w[i].abs().sum() + a / w[:, j].abs().sum()) * act[j] ** 0.5
    assert torch.allclose(ria_scores(w, act), expected, rtol=1e-5)
    assert torch.allclose(ria_scores(w, act, a=1.0), expected * act.sqrt(), rtol=1e-5)


def test_ria_handles_zero_rows_and_columns():
    w = torch.randn(4, 8, generator=_gen(6))
    w[1] = 0
    w[:, 3] = 0
    s = ria_scores(w, torch.ones(8))
    assert torch.isfinite(s).all()
    assert torch.all(s[1] == 0) and torch.all(s[:, 3] == 0)


def test_criterion_dispatch():
    w = torch.randn(3, 8, generator=_gen(7))
    act = torch.rand(8, generator=_gen(8))
    assert torch.equal(criterion_scores("magnitude", w, None), w.abs())
    assert torch.equal(criterion_scores("wanda", w, act), wanda_scores(w, act))
    assert torch.equal(criterion_scores("ria", w, act), ria_scores(w, act))
    with pytest.raises(ValueError, match="unknown pruning criterion 'sparsegpt'"):
        criterion_scores("sparsegpt", w, act)
    with pytest.raises(ValueError, match="act_norm"):
        criterion_scores("wanda", w, None)
    with pytest.raises(ValueError, match="shape"):
        criterion_scores("ria", w, torch.ones(5))


def test_unstructured_mask_per_row_and_global():
    scores = torch.rand(5, 10, generator=_gen(9))
    mask = unstructured_mask(scores, 0.5)
    assert torch.all(mask.sum(1) == 5)
    kept_min = torch.where(mask, scores, torch.inf).amin(1)
    dropped_max = torch.where(mask, -torch.inf, scores).amax(1)
    assert torch.all(kept_min >= dropped_max)
    glob = unstructured_mask(scores, 0.5, per_row=False)
    assert int(glob.sum()) == 25
    assert scores[glob].min() >= scores[~glob].max()
    assert unstructured_mask(scores, 0.0).all() and not unstructured_mask(scores, 1.0).any()
    # at equal sparsity the per-row unstructured mask keeps at least as much as any 2:4 mask
    sq = torch.rand(6, 16, generator=_gen(10))
    assert float((sq * unstructured_mask(sq, 0.5)).sum()) >= kept_importance(sq, 2, 4) - 1e-5
    with pytest.raises(ValueError):
        unstructured_mask(scores, 1.5)
