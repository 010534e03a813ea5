"""OBS reconstruction under N:M masks (permcompile.math.obs) against brute-force least squares."""
from __future__ import annotations

import pytest
import torch

from permcompile.math.nm import is_nm, nm_mask
from permcompile.math.obs import (HessianAccumulator, choose_update, masked_least_squares, output_error,
                                  refit_masked_, shrink_, sparsegpt_nm_, unshrink_)


def _problem(out=24, k=32, tokens=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen) @ (torch.randn(k, k, generator=gen) * 0.4) + torch.randn(
        tokens, k, generator=gen)
    w = torch.randn(out, k, generator=gen)
    acc = HessianAccumulator(k)
    acc.add(x[:100])
    acc.add(x[100:])  # accumulation over blocks of tokens is one XᵀX
    return x, w, acc


def test_hessian_accumulates_xtx():
    x, _, acc = _problem()
    assert acc.count == x.shape[0]
    torch.testing.assert_close(acc.hessian(), (x.T @ x) / x.shape[0], rtol=1e-4, atol=1e-4)


def test_a_held_out_part_kept_as_rows_is_the_same_moment_until_it_outgrows_the_matrix():
    """A held-out accumulator keeps its inputs as rows while they are fewer than K (smaller than XᵀX): the same
    output errors and Hessian updates as the matrix; once K tokens arrive it becomes the matrix."""
    from permcompile.math.obs import Moment

    gen = torch.Generator().manual_seed(0)
    k = 48
    rows_acc, gram_acc = HessianAccumulator(k, keep_rows=True), HessianAccumulator(k)
    batches = [torch.randn(10, k, generator=gen), torch.randn(2, 5, k, generator=gen)]
    for x in batches:
        for acc in (rows_acc, gram_acc):
            acc.add(x)
    assert rows_acc.xtx is None and rows_acc.count == gram_acc.count == 20
    kept, matrix = rows_acc.moment(), gram_acc.moment()
    assert kept.rows is not None and kept.rows.shape == (20, k) and matrix.gram is not None
    torch.testing.assert_close(kept.rows.T @ kept.rows, matrix.gram, rtol=1e-5, atol=1e-6)
    d = torch.randn(6, k, generator=gen)
    assert output_error(d, torch.zeros_like(d), kept) == pytest.approx(output_error(d, torch.zeros_like(d), matrix),
                                                                        rel=1e-5)
    h = torch.eye(k)
    torch.testing.assert_close(kept.add_to_(h.clone(), -3.0), matrix.add_to_(h.clone(), -3.0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(rows_acc.hessian(), gram_acc.hessian(), rtol=1e-5, atol=1e-6)  # asked for: formed
    grown = HessianAccumulator(k, keep_rows=True)
    grown.add(torch.randn(40, k, generator=gen))
    assert grown.xtx is None
    grown.add(torch.randn(8, k, generator=gen))  # 48 tokens: no smaller than the matrix any more
    assert grown.xtx is not None and isinstance(grown.moment(), Moment) and grown.moment().gram is not None


def test_output_error_is_the_layer_output_error():
    x, w, acc = _problem()
    w2 = w * nm_mask(w.abs(), 2, 4)
    direct = float(((x @ (w - w2).T) ** 2).sum()) / x.shape[0]
    assert output_error(w, w2, acc.hessian()) == pytest.approx(direct, rel=1e-4)


def test_masked_least_squares_matches_lstsq_on_the_data():
    """The reference solver is the least-squares optimum on the inputs themselves."""
    x, w, acc = _problem(out=5)
    keep = nm_mask(torch.rand(5, 32, generator=torch.Generator().manual_seed(3)), 2, 4)
    ref = masked_least_squares(w, keep, acc.hessian())
    for i in range(5):
        s = keep[i].nonzero().flatten()
        sol = torch.linalg.lstsq(x[:, s].double(), (x @ w[i]).double().unsqueeze(1)).solution.flatten()
        torch.testing.assert_close(ref[i, s].double(), sol, rtol=1e-3, atol=1e-3)
        assert bool((ref[i, ~keep[i]] == 0).all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_is_nm_and_beats_the_mask_alone(n, m):
    _, w, acc = _problem()
    h = acc.hessian()
    wanda = w.abs() * torch.diagonal(h).sqrt()
    err_mask = output_error(w, w * nm_mask(wanda, n, m), h)
    w1 = w.clone()
    keep = sparsegpt_nm_(w1, h, n, m, damp=1e-6)
    assert is_nm(w1, n, m) and bool((w1[~keep] == 0).all()) and int(keep.sum()) == w.numel() * n // m
    err = output_error(w, w1, h)
    assert err < 0.8 * err_mask
    # the same mask, frozen weights: reconstruction is what wins, not the mask choice alone
    assert err < output_error(w, w * keep, h)


def test_obs_update_is_the_optimum_when_every_pruned_column_precedes_the_kept_ones():
    """One stripe with its pruned columns first: the left-to-right OBS update is exactly least squares."""
    x, w, acc = _problem(out=16, k=4, tokens=200)
    h = acc.hessian()
    scores = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(16, 4)  # keep columns 2 and 3 in every row
    w1 = w.clone()
    keep = sparsegpt_nm_(w1, h, 2, 4, damp=0.0, scores=scores)
    opt = masked_least_squares(w, keep, h)
    torch.testing.assert_close(w1, opt, rtol=1e-4, atol=1e-4)


def test_refit_reaches_the_fixed_mask_optimum_and_never_hurts():
    _, w, acc = _problem()
    h = acc.hessian()
    w1 = w.clone()
    keep = sparsegpt_nm_(w1, h, 2, 4, damp=1e-6)
    before = output_error(w, w1, h)
    opt = masked_least_squares(w, keep, h)
    w2 = w1.clone()
    refit_masked_(w2, w, keep, h, iters=200, damp=0.0)
    assert is_nm(w2, 2, 4)
    assert output_error(w, w2, h) <= before
    assert output_error(w, w2, h) == pytest.approx(output_error(w, opt, h), rel=1e-3)


def test_already_sparse_weights_are_left_alone():
    _, w, acc = _problem()
    w = w * nm_mask(w.abs(), 2, 4)
    w1 = w.clone()
    sparsegpt_nm_(w1, acc.hessian(), 2, 4, damp=1e-6)
    torch.testing.assert_close(w1, w, rtol=1e-4, atol=1e-4)


def test_result_does_not_depend_on_the_column_block():
    _, w, acc = _problem()
    a, b = w.clone(), w.clone()
    ka = sparsegpt_nm_(a, acc.hessian(), 2, 4, block=8)
    kb = sparsegpt_nm_(b, acc.hessian(), 2, 4, block=128)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dead_channels_and_bad_shapes():
    x, w, _ = _problem()
    x[:, 5] = 0  # a channel that never fires
    acc = HessianAccumulator(32)
    acc.add(x)
    w1 = w.clone()
    sparsegpt_nm_(w1, acc.hessian(), 2, 4)
    assert bool(torch.isfinite(w1).all()) and is_nm(w1, 2, 4) and bool((w1[:, 5] == 0).all())
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_nm_(torch.randn(4, 30), torch.eye(30), 2, 4)
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_nm_(torch.randn(4, 32), torch.eye(16), 2, 4)


def test_damping_without_copies_matches_dampen():
    from permcompile.math.obs import dampen, dampened_inverse_cholesky, damping_diagonal, inverse_cholesky_upper

    x = _problem(out=4, k=32, tokens=300)[0].clone()
    x[:, 5] = 0  # a dead channel
    h = x.T @ x
    d = damping_diagonal(h, 0.01)
    assert torch.allclose(dampen(h, 0.01), h + torch.diag(d), rtol=1e-6, atol=0)
    u = dampened_inverse_cholesky(h, 0.01)
    assert torch.allclose(u, inverse_cholesky_upper(dampen(h, 0.01)), atol=1e-6)
    assert torch.equal(u, u.triu())
    inv = torch.linalg.inv(dampen(h, 0.01).double())
    assert torch.allclose((u.T @ u).double(), inv, rtol=1e-4, atol=1e-5 * float(inv.abs().max()))
    bad = h.clone()
    bad[5, 5] = -1.0
    bad[5, 6] = bad[6, 5] = 0.5  # not an XᵀX: the vector form does not hold
    assert damping_diagonal(bad, 0.01) is None


def test_shrink_keeps_the_diagonal_and_unshrink_undoes_it():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / 64
    s = shrink_(h.clone(), 0.4)
    torch.testing.assert_close(torch.diagonal(s), torch.diagonal(h))
    off = ~torch.eye(12, dtype=torch.bool)
    torch.testing.assert_close(s[off], 0.6 * h[off])
    torch.testing.assert_close(unshrink_(s, 0.4), h)
    assert shrink_(h.clone(), 0.0).equal(h)


def _correlated_inputs(tokens: int, tie: float, seed: int) -> torch.Tensor:
    """Channels in pairs (2j, 2j+1) that move together with strength ``tie`` (1: identical)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 8, generator=g)
    noise = torch.randn(tokens, 8, generator=g)
    x = torch.empty(tokens, 16)
    x[:, 0::2] = base
    x[:, 1::2] = tie * base + (1 - tie ** 2) ** 0.5 * noise
    return x


def test_choose_update_keeps_the_plain_update_where_it_carries_over():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    x_fit, x_val = _correlated_inputs(512, 0.95, 2), _correlated_inputs(512, 0.95, 3)
    h_fit, h_val = x_fit.T @ x_fit / 512, x_val.T @ x_val / 512
    crit = w.abs() * torch.diagonal(h_fit).sqrt()
    choice, errors = choose_update(w, h_fit, h_val, crit, 2, 4, (0.0, 0.5), refit_iters=10)
    assert choice == 0.0 and errors["shrink=0"] < errors["mask"]
    assert "shrink=0.5" not in errors  # the fast path stops at the first update that beats the mask


def test_choose_update_falls_back_where_the_fit_does_not_carry_over():
    """Fitted where paired channels are copies of each other, scored where they are opposite: leaning on the
    fitted correlation makes things worse than the mask alone, so the mask (or a shrunk update) wins."""
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    x_fit = _correlated_inputs(512, 0.99, 2)
    x_val = _correlated_inputs(512, -0.99, 3)
    h_fit, h_val = x_fit.T @ x_fit / 512, x_val.T @ x_val / 512
    crit = w.abs() * torch.diagonal(h_fit).sqrt()
    choice, errors = choose_update(w, h_fit, h_val, crit, 2, 4, (0.0, 0.5), refit_iters=10)
    assert errors["shrink=0"] > errors["mask"]
    assert choice is None or errors[f"shrink={choice:g}"] < errors["mask"]
