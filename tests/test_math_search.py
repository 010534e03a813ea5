"""The learned permutation's optimiser on toy problems (pure tensor math, no model)."""
from __future__ import annotations

import torch

import pytest

from permcompile.config import SearchConfig
from permcompile.errors import UsageError
from permcompile.math.search import Consumer, gram_rows, learn_permutation, objective_gram, output_error
from permcompile.math.nm import nm_mask


def _planted(n=32, out=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.zeros(out, n)
    for j in range(n):
        if j % 4 < 2:
            base[:, j] = torch.randn(out, generator=gen).abs() + 1.0
        else:
            base[:, j] = 0.01 * torch.randn(out, generator=gen)
    hidden = torch.randperm(n, generator=gen)
    w = torch.empty_like(base)
    w[:, hidden] = base  # perm = hidden puts base's stripes back: 2:4 becomes (nearly) lossless
    return w, hidden


def _free(n):
    return torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)


def test_recovers_planted_permutation():
    n = 32
    w, hidden = _planted(n)
    c = Consumer(w, w.abs(), torch.eye(n), torch.arange(n))
    assert output_error([c], torch.arange(n), 2, 4) > 0.05
    labels, fixed = _free(n)
    res = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=32, steps=150, rounds=1, lr=0.1)
    assert res.loss_best < 1e-3 * res.loss_warm + 1e-4
    assert torch.equal(res.perm.sort().values, torch.arange(n))


def test_identity_optimal_problem_keeps_identity():
    n = 16
    w, _ = _planted(n)
    w = w[:, torch.argsort(torch.arange(n))]  # columns already in the lossless order when hidden is identity
    gen = torch.Generator().manual_seed(1)
    base = torch.zeros(8, n)
    for j in range(n):
        base[:, j] = (torch.rand(8, generator=gen) + 1.0) if j % 4 < 2 else 0.0
    c = Consumer(base, base.abs(), torch.eye(n), torch.arange(n))
    assert output_error([c], torch.arange(n), 2, 4) == 0.0
    labels, fixed = _free(n)
    res = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=16, steps=20, rounds=2)
    assert torch.equal(res.perm, torch.arange(n))
    assert res.loss_best == 0.0


def test_never_worse_than_warm_start_and_respects_constraints():
    gen = torch.Generator().manual_seed(3)
    n, out = 48, 12
    w = torch.randn(out, n, generator=gen) ** 3
    x = torch.randn(200, n, generator=gen)
    x[:, 1::2] += x[:, ::2]  # correlated channels: the Gram matrix matters
    c = Consumer(w, w.abs() * x.norm(dim=0), x.T @ x / 200, torch.arange(n))
    labels = torch.arange(n) // 16  # three "heads"
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[32:36] = True
    warm = torch.arange(n)
    res = learn_permutation([c], n, 2, 4, warm, labels, fixed, block=8, steps=15, rounds=2,
                            generator=torch.Generator().manual_seed(0))
    assert res.loss_best <= res.loss_warm
    assert abs(output_error([c], res.perm, 2, 4) - res.loss_best) < 1e-5
    assert torch.equal(labels[res.perm], labels)
    assert torch.equal(res.perm[fixed], torch.arange(n)[fixed])
    again = learn_permutation([c], n, 2, 4, warm, labels, fixed, block=8, steps=15, rounds=2,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.perm, again.perm)  # same seed, same result


def test_sinkhorn_phase_runs_under_no_grad():
    """A caller's ``torch.no_grad()`` does not reach the Sinkhorn phase's optimiser: same result as outside."""
    gen = torch.Generator().manual_seed(3)
    n = 32
    w = torch.randn(8, n, generator=gen) ** 3
    c = Consumer(w, w.abs(), torch.eye(n), torch.arange(n))
    labels, fixed = _free(n)

    def run():
        return learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=8, steps=5, rounds=1,
                                 generator=torch.Generator().manual_seed(0))

    ref = run()
    with torch.no_grad():
        got = run()
    assert torch.equal(got.perm, ref.perm) and got.loss_best == ref.loss_best and got.history == ref.history


def test_replicated_columns_gqa_style():
    """Two query heads share one kv head: each element is carried by two columns."""
    gen = torch.Generator().manual_seed(5)
    n = 16  # one kv head of 16 channels, two query heads -> 32 columns
    w = torch.randn(8, 32, generator=gen) ** 3
    cols = torch.arange(32) % 16
    c = Consumer(w, w.abs(), torch.eye(32), cols)
    labels, fixed = _free(n)
    res = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=16, steps=30, rounds=1)
    assert res.loss_best <= res.loss_warm
    assert abs(output_error([c], res.perm, 2, 4) - res.loss_best) < 1e-5


def _correlated_problem(n=48, out=12, seed=3, cols=None):
    gen = torch.Generator().manual_seed(seed)
    width = n if cols is None else cols.numel()
    w = torch.randn(out, width, generator=gen) ** 3
    x = torch.randn(300, width, generator=gen)
    x[:, 1::2] += x[:, ::2]
    return Consumer(w, w.abs() * x.norm(dim=0), x.T @ x / 300, torch.arange(n) if cols is None else cols)


def test_swap_refine_tracks_the_loss_exactly_and_respects_constraints():
    from permcompile.math.search import output_error, swap_refine

    n = 48
    c = _correlated_problem(n)
    labels = torch.arange(n) // 16
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[32:36] = True
    start = output_error([c], torch.arange(n), 2, 4)
    perm, loss, kept = swap_refine([c], [c.gram], torch.arange(n), 2, 4, labels, fixed, trials=400,
                                   generator=torch.Generator().manual_seed(0))
    assert kept > 0 and loss < start
    assert abs(output_error([c], perm, 2, 4) - loss) < 1e-6  # incremental bookkeeping is exact
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(labels[perm], labels)
    assert torch.equal(perm[fixed], torch.arange(n)[fixed])
    again, _, _ = swap_refine([c], [c.gram], torch.arange(n), 2, 4, labels, fixed, trials=400,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(perm, again)


def test_swap_refine_with_replicated_columns():
    from permcompile.math.search import output_error, swap_refine

    n = 16
    c = _correlated_problem(n, cols=torch.arange(48) % 16)  # three query heads read one kv head
    labels, fixed = _free(n)
    start = output_error([c], torch.arange(n), 2, 4)
    perm, loss, kept = swap_refine([c], [c.gram], torch.arange(n), 2, 4, labels, fixed, trials=300)
    assert kept > 0 and loss < start
    assert abs(output_error([c], perm, 2, 4) - loss) < 1e-6


@pytest.mark.parametrize("n_keep,m", [(2, 4), (4, 8), (1, 4)])
def test_dropped_entries_is_the_nm_mask_complement_with_its_tie_rule(n_keep, m):
    from permcompile.math.search import _dropped_entries

    gen = torch.Generator().manual_seed(m + n_keep)
    scores = torch.randint(0, 3, (10, 4 * m), generator=gen).float()  # many ties: the lower position must win
    expected = ~nm_mask(scores, n_keep, m)
    assert torch.equal(_dropped_entries(scores.T.contiguous(), n_keep, m), expected.T)
    assert int(expected.sum()) == 10 * 4 * (m - n_keep)


def test_swap_refine_diagonal_gram_and_several_consumers():
    from permcompile.math.search import output_error, swap_refine

    n = 32
    a = _correlated_problem(n, seed=3)
    b = _correlated_problem(n, cols=torch.arange(64) % n, seed=4)  # replicas, like GQA heads
    cs = [Consumer(c.w, c.scores, objective_gram(c.gram, "diagonal"), c.cols) for c in (a, b)]
    labels, fixed = _free(n)
    start = output_error(cs, torch.arange(n), 2, 4)
    perm, loss, kept = swap_refine(cs, [c.gram for c in cs], torch.arange(n), 2, 4, labels, fixed, trials=300)
    assert kept > 0 and loss < start
    assert abs(output_error(cs, perm, 2, 4) - loss) < 1e-6  # the vector form of a diagonal Gram is exact too
    threads = torch.get_num_threads()
    swap_refine(cs, [c.gram for c in cs], torch.arange(n), 2, 4, labels, fixed, trials=10)
    assert torch.get_num_threads() == threads  # the single-threaded trial loop restores the setting


def test_learned_with_exchanges_beats_the_sinkhorn_phase_alone():
    n = 48
    c = _correlated_problem(n, seed=7)
    labels, fixed = _free(n)
    base = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=16, steps=10, rounds=1)
    more = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=16, steps=10, rounds=1,
                             swap_trials=500)
    assert more.loss_best < base.loss_best and more.swaps > 0
    assert abs(output_error([c], more.perm, 2, 4) - more.loss_best) < 1e-6


def test_diagonal_objective_is_the_dropped_squared_wanda_score():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 16, generator=gen) * torch.linspace(0.2, 3.0, 16)
    x[:, 1] = x[:, 0]  # two identical channels: the full Gram sees that their errors can cancel
    g = x.T @ x / x.shape[0]
    w = torch.randn(5, 16, generator=gen)
    w[:, 1] = -w[:, 0]
    scores = torch.rand(5, 16, generator=gen) + 1.0
    scores[:, :2] = 0.01  # columns 0 and 1 are always dropped
    perm = torch.arange(16)
    d = torch.diagonal(g)
    drop = ~nm_mask(scores, 2, 4)
    expected = float(((w * drop) ** 2 * d).sum() / (w ** 2 * d).sum())
    diag = Consumer(w, scores, objective_gram(g, "diagonal"), torch.arange(16))
    assert abs(output_error([diag], perm, 2, 4) - expected) < 1e-6
    # the same weights with only columns 0 and 1 dropped: they cancel exactly on the output, not on the diagonal
    w2 = torch.zeros_like(w)
    w2[:, :2] = w[:, :2]
    full = Consumer(w2, scores, objective_gram(g, "output"), torch.arange(16))
    diag2 = Consumer(w2, scores, objective_gram(g, "diagonal"), torch.arange(16))
    assert output_error([full], perm, 2, 4) < 1e-6
    assert output_error([diag2], perm, 2, 4) > 0.5
    assert torch.equal(objective_gram(g, "output"), g)


def test_relative_objective_weighs_every_token_alike():
    """A sink token 1000x larger than the rest owns the plain Gram, not the relative one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    x[0] = 1000 * torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0) * x[1:].norm(dim=1).mean()
    rows = gram_rows(x, "relative")
    assert torch.allclose(rows.norm(dim=1), torch.ones(64))
    assert torch.allclose(rows * x.norm(dim=1, keepdim=True), x, atol=1e-5)  # same directions
    plain, rel = x.T @ x, rows.T @ rows
    top = lambda g: float(torch.linalg.eigvalsh(g)[-1] / torch.trace(g))  # noqa: E731
    assert top(plain) > 0.99 and top(rel) < 0.2
    assert torch.equal(gram_rows(x, "output"), x) and torch.equal(objective_gram(plain, "relative"), plain)
    SearchConfig(objective="relative")


def test_unknown_objective_is_refused():
    with pytest.raises(UsageError, match="objective"):
        SearchConfig(objective="cosine")
    with pytest.raises(ValueError):
        objective_gram(torch.eye(3), "cosine")


def test_diagonal_exchanges_track_the_dropped_energy_exactly():
    from permcompile.math.search import diagonal_exchanges

    gen = torch.Generator().manual_seed(3)
    n, rows = 32, 50
    w = torch.randn(rows, n, generator=gen) ** 3
    ex2 = torch.rand(n, generator=gen) * 4
    energy, scores = (w.square() * ex2).T.contiguous(), (w.abs() * ex2.sqrt()).T.contiguous()
    scores[:, ::3] = scores[:, ::3].round()  # ties: the lower position must win, as in nm_mask
    labels = torch.arange(n) // 16
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[20:24] = True

    def dropped_share(perm):
        mask = nm_mask(scores[perm].T, 2, 4)
        return float((energy[perm].T * (~mask)).sum() / energy.sum())

    perm, start, end, kept = diagonal_exchanges(energy, scores, torch.arange(n), 2, 4, labels, fixed, trials=500,
                                                generator=torch.Generator().manual_seed(0))
    assert abs(start - dropped_share(torch.arange(n))) < 1e-6
    assert kept > 0 and end < start and abs(end - dropped_share(perm)) < 1e-6
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(labels[perm], labels) and torch.equal(perm[fixed], torch.arange(n)[fixed])
    again = diagonal_exchanges(energy, scores, torch.arange(n), 2, 4, labels, fixed, trials=500,
                               generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(perm, again)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_sinkhorn_phase_under_autocast(amp, monkeypatch):
    """--amp runs the Sinkhorn phase's loss under torch.autocast (here the CPU's): the matmuls see the reduced
    dtype, the planted permutation is still recovered and the result is a valid permutation."""
    if amp == "fp16" and not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    n = 32
    w, _ = _planted(n)
    c = Consumer(w, w.abs(), torch.eye(n), torch.arange(n))
    labels, fixed = _free(n)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        if a.requires_grad or b.requires_grad:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    res = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=32, steps=150, rounds=1, lr=0.1,
                            amp=amp)
    monkeypatch.undo()
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert seen and set(seen) == {want}
    assert torch.equal(res.perm.sort().values, torch.arange(n))
    assert res.loss_best < 1e-2 * res.loss_warm + 1e-3
    off = learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, block=32, steps=5, rounds=1, amp="off")
    assert off.perm.numel() == n
    with pytest.raises(ValueError, match="amp"):
        learn_permutation([c], n, 2, 4, torch.arange(n), labels, fixed, steps=1, amp="int8")


def test_amp_auto_resolves_per_device():
    assert SearchConfig().resolve_amp("cpu") == "off"
    assert SearchConfig().resolve_amp("cuda:0") == "bf16"
    assert SearchConfig(amp="fp16").resolve_amp("cpu") == "fp16"
    with pytest.raises(UsageError, match="--search amp"):
        SearchConfig(amp="int8")


def test_small_groups_search_every_pair_and_stop_at_a_local_optimum():
    """A group with fewer candidate pairs than trials gets every pair tried per pass and stops after a pass that
    keeps nothing: the result is a pairwise-exchange local optimum, reached in far fewer than ``trials`` tries;
    large groups keep the random draws (real models: their results are unchanged)."""
    from permcompile.math.search import _exchange_pairs, diagonal_exchanges, swap_refine

    gen = torch.Generator().manual_seed(5)
    n, rows = 24, 40
    w = torch.randn(rows, n, generator=gen) ** 3
    ex2 = torch.rand(n, generator=gen) * 4
    energy, scores = (w.square() * ex2).T.contiguous(), (w.abs() * ex2.sqrt()).T.contiguous()
    labels, fixed = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    tried = []
    real = _exchange_pairs

    def counting(*a, **k):
        for pair in real(*a, **k):
            tried.append(pair)
            yield pair

    import permcompile.math.search as learn_mod
    learn_mod._exchange_pairs, saved = counting, learn_mod._exchange_pairs
    try:
        perm, start, end, kept = diagonal_exchanges(energy, scores, torch.arange(n), 2, 4, labels, fixed,
                                                    trials=10 ** 6, generator=torch.Generator().manual_seed(0))
    finally:
        learn_mod._exchange_pairs = saved
    pairs = (n * n - (n // 4) * 16) // 2  # cross-stripe pairs of 24 free elements in stripes of 4
    assert kept > 0 and end < start
    assert pairs <= len(tried) < 10 ** 4 and len(tried) % pairs == 0  # whole passes, the last one kept nothing

    def dropped(p):
        return float((energy[p].T * (~nm_mask(scores[p].T, 2, 4))).sum())

    base = dropped(perm)
    for i in range(n):  # no single exchange improves the result
        for j in range(i + 1, n):
            if i // 4 != j // 4:
                q = perm.clone()
                q[i], q[j] = perm[j], perm[i]
                assert dropped(q) >= base - 1e-6 * float(energy.sum())
    # one pass when nothing is kept; the trial budget caps the passes; above the budget: random draws
    def pairs_tried(trials, accepted):
        return len(list(_exchange_pairs(torch.arange(n), labels, fixed, 4, trials, torch.Generator(), accepted)))

    counter = iter(range(10 ** 6))
    assert pairs_tried(300, lambda: 0) == pairs and pairs_tried(300, lambda: next(counter)) == 300
    assert pairs_tried(pairs - 1, lambda: 0) < pairs - 1  # random draws, same-stripe ones skipped
    # swap_refine (output objective) takes the same path
    c = Consumer(w, w.abs(), torch.eye(n), torch.arange(n))
    res = swap_refine([c], [c.gram], torch.arange(n), 2, 4, labels, fixed, trials=10 ** 6)
    assert torch.equal(res[0].sort().values, torch.arange(n))
