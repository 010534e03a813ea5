import itertools

import numpy as np
import pytest
import torch

from permcompile.math import strategies as S
from permcompile.math.nm import kept_importance
from permcompile.math.strategies import greedy, hungarian, identity, random_perm
from permcompile.passes.permute import heuristic_kernel

# the per-group heuristics of the strategy registry, by name (passes/permute.STRATEGIES)
STRATEGIES = {name: heuristic_kernel(name) for name in ("none", "random", "greedy", "hungarian")}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _heavy(rows, n, seed=0):
    """|W| * lognormal per-column activation norms: the outlier-channel structure of real LLMs."""
    g = _gen(seed)
    return torch.randn(rows, n, generator=g).abs() * torch.exp(torch.randn(n, generator=g))


def _kept(scores, perm, n_keep=2, m=4):
    """Kept importance with the strategies' convention (partial last stripe padded with zeros)."""
    pad = (-scores.shape[1]) % m
    scores = torch.nn.functional.pad(scores[:, perm], (0, pad))
    return kept_importance(scores, n_keep, m)


def _assert_valid(perm, blocks, fixed):
    n = blocks.numel()
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(blocks[perm], blocks)
    assert torch.equal(perm[fixed], torch.arange(n)[fixed])


def _messy_constraints(n, seed):
    """Non-contiguous blocks and scattered fixed elements: stripes mix blocks and pinned positions."""
    g = _gen(seed)
    return torch.randint(0, 3, (n,), generator=g), torch.rand(n, generator=g) < 0.2


def test_registry():
    from permcompile.errors import UsageError

    assert STRATEGIES["none"] is identity and STRATEGIES["hungarian"] is hungarian
    assert STRATEGIES["random"] is random_perm and STRATEGIES["greedy"] is greedy
    with pytest.raises(UsageError, match="not a per-group heuristic"):
        heuristic_kernel("search")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("n", [48, 50])  # 50: a partial last stripe
def test_results_are_valid_under_messy_constraints(name, n):
    scores = _heavy(20, n, seed=n)
    blocks, fixed = _messy_constraints(n, seed=n)
    perm = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(1))
    _assert_valid(perm, blocks, fixed)


@pytest.mark.parametrize("name", ["greedy", "hungarian"])
@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_identity(name, seed):
    n = 40 + 4 * seed
    scores = _heavy(16, n, seed=seed)
    if seed % 2:
        blocks, fixed = _messy_constraints(n, seed)
    else:
        blocks, fixed = torch.arange(n) // 6, torch.zeros(n, dtype=torch.bool)
    perm = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(seed))
    _assert_valid(perm, blocks, fixed)
    assert _kept(scores, perm) >= _kept(scores, torch.arange(n)) - 1e-9


@pytest.mark.parametrize("name", ["greedy", "hungarian"])
def test_identity_is_kept_when_it_is_already_optimal(name):
    # Every stripe already holds exactly two large and two tiny columns: nothing can be gained.
    big = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(8)
    scores = big * 10 + torch.rand(12, 32, generator=_gen(3)) * 1e-3
    perm = STRATEGIES[name](scores, 2, 4, torch.zeros(32, dtype=torch.long), torch.zeros(32, dtype=torch.bool), _gen(0))
    assert _kept(scores, perm) >= _kept(scores, torch.arange(32)) - 1e-9


@pytest.mark.parametrize("name", ["greedy", "hungarian"])
def test_strict_improvement_on_heavy_tailed_scores(name):
    scores = _heavy(64, 256, seed=11)
    blocks, fixed = torch.zeros(256, dtype=torch.long), torch.zeros(256, dtype=torch.bool)
    perm = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(0))
    assert _kept(scores, perm) > 1.01 * _kept(scores, torch.arange(256))


def test_hungarian_and_greedy_are_comparable():
    scores = _heavy(64, 256, seed=12)
    args = (scores, 2, 4, torch.arange(256) // 64, torch.zeros(256, dtype=torch.bool), _gen(0))
    h, g = _kept(scores, hungarian(*args)), _kept(scores, greedy(*args))
    assert h >= 0.995 * g


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_deterministic_given_the_generator(name):
    scores = _heavy(16, 64, seed=5)
    blocks, fixed = _messy_constraints(64, seed=5)
    a = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(42))
    b = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(42))
    assert torch.equal(a, b)


def test_random_perm_depends_on_the_generator_and_respects_blocks():
    n = 64
    blocks, fixed = torch.arange(n) // 16, torch.zeros(n, dtype=torch.bool)
    fixed[[0, 17, 40]] = True
    scores = torch.rand(4, n, generator=_gen(0))
    perms = [random_perm(scores, 2, 4, blocks, fixed, _gen(s)) for s in range(3)]
    for perm in perms:
        _assert_valid(perm, blocks, fixed)
    assert not torch.equal(perms[0], perms[1])


def _planted(rows, n, seed, blocks=None):
    """Scores whose hidden order makes 2:4 lossless, scrambled by a valid permutation.

    In the hidden order every stripe holds two large and two tiny columns on every row, so the best
    permutation keeps all the large mass.
    """
    g = _gen(seed)
    pattern = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(n // 4)
    hidden = torch.where(pattern.bool(), 1.0 + torch.rand(rows, n, generator=g),
                         1e-3 * torch.rand(rows, n, generator=g))
    blocks = torch.zeros(n, dtype=torch.long) if blocks is None else blocks
    scramble = random_perm(hidden, 2, 4, blocks, torch.zeros(n, dtype=torch.bool), g)
    scores = hidden[:, scramble]
    best = float(hidden[:, pattern.bool()].sum(dtype=torch.float64))
    return scores, blocks, best


@pytest.mark.parametrize("blocked", [False, True])
def test_hungarian_solves_a_planted_problem(blocked):
    n = 256
    blocks = torch.arange(n) // 64 if blocked else None
    scores, blocks, best = _planted(32, n, seed=7, blocks=blocks)
    start = _kept(scores, torch.arange(n))
    assert start < 0.9 * best  # the scramble really hurts
    perm = hungarian(scores, 2, 4, blocks, torch.zeros(n, dtype=torch.bool), _gen(0))
    _assert_valid(perm, blocks, torch.zeros(n, dtype=torch.bool))
    assert _kept(scores, perm) >= 0.999 * best


def test_greedy_solves_a_small_planted_problem():
    scores, blocks, best = _planted(16, 64, seed=8)
    perm = greedy(scores, 2, 4, blocks, torch.zeros(64, dtype=torch.bool), _gen(0))
    assert _kept(scores, perm) >= 0.999 * best


def test_blocks_that_straddle_stripes():
    # blocks of 6 elements with m=4: stripes mix two blocks; blocks are not in position order either
    n = 48
    blocks = (torch.arange(n) // 6) % 3
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[[5, 6, 21]] = True
    scores = _heavy(24, n, seed=9)
    for name in ("greedy", "hungarian"):
        perm = STRATEGIES[name](scores, 2, 4, blocks, fixed, _gen(0))
        _assert_valid(perm, blocks, fixed)
        assert _kept(scores, perm) > _kept(scores, torch.arange(n))


@pytest.mark.parametrize("name", ["greedy", "hungarian"])
@pytest.mark.parametrize("n_keep,m", [(0, 4), (4, 4), (1, 1)])
def test_trivial_sparsities_return_identity(name, n_keep, m):
    scores = _heavy(8, 16, seed=1)
    perm = STRATEGIES[name](scores, n_keep, m, None, None, _gen(0))
    assert torch.equal(perm, torch.arange(16))


@pytest.mark.parametrize("name", ["greedy", "hungarian"])
def test_all_fixed_returns_identity(name):
    scores = _heavy(8, 16, seed=1)
    perm = STRATEGIES[name](scores, 2, 4, None, torch.ones(16, dtype=torch.bool), _gen(0))
    assert torch.equal(perm, torch.arange(16))


@pytest.mark.parametrize("n_keep,m", [(1, 4), (3, 4), (2, 8), (4, 8), (1, 2)])
def test_other_sparsities(n_keep, m):
    n = 64
    scores = _heavy(16, n, seed=n_keep + m)
    blocks, fixed = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    base = _kept(scores, torch.arange(n), n_keep, m)
    for name in ("greedy", "hungarian"):
        perm = STRATEGIES[name](scores, n_keep, m, blocks, fixed, _gen(0))
        _assert_valid(perm, blocks, fixed)
        assert _kept(scores, perm, n_keep, m) > base


def test_hungarian_options():
    scores = _heavy(16, 128, seed=3)
    args = (scores, 2, 4, torch.arange(128) // 32, torch.zeros(128, dtype=torch.bool))
    base = _kept(scores, torch.arange(128))
    for init in ("identity", "balanced", "best"):
        perm = hungarian(*args, _gen(0), init=init, window=4, max_sweeps=3)
        _assert_valid(perm, args[3], args[4])
        assert _kept(scores, perm) > base
    best = _kept(scores, hungarian(*args, _gen(0), init="best"))
    assert best >= _kept(scores, hungarian(*args, _gen(0), init="identity")) - 1e-9
    with pytest.raises(ValueError, match="init"):
        hungarian(*args, _gen(0), init="nope")


def test_greedy_limits():
    scores = _heavy(16, 64, seed=4)
    args = (scores, 2, 4, None, None, _gen(0))
    assert torch.equal(greedy(*args, max_swaps=0), torch.arange(64))
    one = greedy(*args, max_swaps=1)
    assert int((one != torch.arange(64)).sum()) == 2
    assert _kept(scores, one) > _kept(scores, torch.arange(64))
    timed = greedy(*args, time_limit=0.0)
    assert torch.equal(timed.sort().values, torch.arange(64))


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        hungarian(torch.full((2, 8), float("nan")), 2, 4, None, None, _gen(0))
    with pytest.raises(ValueError, match="shape"):
        greedy(torch.rand(2, 8), 2, 4, torch.zeros(7, dtype=torch.long), None, _gen(0))
    with pytest.raises(ValueError, match="rows, n"):
        hungarian(torch.rand(8), 2, 4, None, None, _gen(0))


def test_slot_round_is_the_optimal_single_slot_reassignment():
    # Brute force: over every way of permuting the slot-1 elements among 5 stripes, the round's result
    # is at least as good as the best one.
    scores = _heavy(6, 20, seed=13)
    p = S._prepare(scores, 2, 4, None, None)
    start = np.random.default_rng(0).permutation(20)
    arr = S._Arrangement(p, start)
    arr.slot_round(1, window=8, generator=_gen(0))
    slot = np.arange(5) * 4 + 1
    best = -np.inf
    for order in itertools.permutations(range(5)):
        trial = start.copy()
        trial[slot] = start[slot][list(order)]
        best = max(best, p.kept(trial))
    assert p.kept(arr.perm) == pytest.approx(best, rel=1e-6)
    assert np.array_equal(np.sort(arr.perm), np.arange(20))
    assert np.array_equal(np.delete(arr.perm, slot), np.delete(start, slot))


def test_shuffle_slots_keeps_the_objective_and_constraints():
    n = 48
    scores = _heavy(8, n, seed=14)
    blocks, fixed = _messy_constraints(n, seed=14)
    p = S._prepare(scores, 2, 4, blocks, fixed)
    arr = S._Arrangement(p, np.arange(n))
    before = p.kept(arr.perm)
    arr.shuffle_slots(_gen(0))
    perm = torch.from_numpy(arr.perm)
    _assert_valid(perm, blocks, fixed)
    assert torch.equal(perm // 4, torch.arange(n) // 4)  # nobody left its stripe
    assert p.kept(arr.perm) == pytest.approx(before, rel=1e-9)
    assert np.array_equal(arr.x, p.arrange(arr.perm))


@pytest.mark.parametrize("k,n", [(3, 1), (3, 2), (3, 3), (4, 2), (7, 3), (7, 5), (8, 4)])
def test_order_statistic_kernels(k, n):
    vals = [np.random.default_rng(k * 10 + j).random((5, 9)).astype(np.float32) for j in range(k)]
    stacked = np.sort(np.stack(vals), axis=0)[::-1]  # descending along the k axis
    assert np.allclose(S._nth_largest(vals, n), stacked[n - 1])
    assert np.allclose(S._top_sum(vals, n), stacked[:n].sum(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("i,j", [(3, 5), (6, 2)])
@pytest.mark.parametrize("buffer", [1 << 20, 50])  # 50: one window per buffer fill
def test_min_sum_kernel(i, j, buffer, monkeypatch):
    monkeypatch.setattr(S, "_KERNEL_BUFFER", buffer)
    rng = np.random.default_rng(0)
    a = rng.random((4, i, 33)).astype(np.float32)
    b = rng.random((4, j, 33)).astype(np.float32)
    ref = np.minimum(a[:, :, None, :], b[:, None, :, :]).sum(-1)
    assert np.allclose(S._min_sum(a, b), ref, rtol=1e-5)
    relu = np.maximum(a[0][:, None, :] - b[0][None, :, :], 0).sum(-1)
    assert np.allclose(S._relu_sum(a[0], b[0]), relu, rtol=1e-5, atol=1e-5)
