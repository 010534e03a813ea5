"""The ``e2e`` strategy: a planted problem it must solve, and the pipeline on tiny models (valid, folded, N:M,
deterministic, and the loss it learns on is the loss of the model the compiler writes)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from permcompile.config import E2EConfig, OptimizeConfig
from permcompile.math.nm import is_nm
from permcompile.models import load_model
from permcompile.passes.e2e import _effective_masks, _overrides, _sites, train_permutations
from permcompile.passes.groups import Group, Member
from permcompile.passes.sparsify import consumer_scores, weight_kout
from permcompile.pipeline import compress_
from permcompile.testing.zoo import build_tiny

FAST = E2EConfig(steps=8, block_size=16)


def _planted(seed: int, k: int = 16, out: int = 8):
    """A linear layer whose weight is 2:4 in a hidden column order (two zero columns per stripe) and scrambled in
    the stored one: with the right permutation 2:4 pruning is lossless."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(out, k, generator=gen) + 0.5) * (torch.arange(k) % 4 < 2)
    w = w[:, torch.randperm(k, generator=gen)]
    model = nn.Sequential(nn.Linear(k, out, bias=False))
    model[0].weight.data.copy_(w)
    x = torch.randn(64, k, generator=gen)
    return model, w, [{"x": x[i:i + 16]} for i in range(0, 64, 16)]


def _learn_planted(seed: int, k: int = 32, **kw):
    model, w, batches = _planted(seed, k)
    group = Group("g", k, [Member("0.weight", 1, "consumer", module="0")])

    def run(overrides, batch):
        return functional_call(model, overrides, (batch["x"],))

    def objective(y, ref, batch):
        return (y - ref).pow(2).sum() / ref.pow(2).sum()

    cfg = E2EConfig(**{**dict(block_size=k, steps=300, lr=0.1, gumbel=1.0, loss="mse"), **kw})
    res = train_permutations(model, [group], {"g": torch.arange(k)}, {"0.weight": w.abs()}, batches, run,
                             objective, 2, 4, cfg, seed=0)
    return model, w, group, res


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_permutation_is_recovered_end_to_end(seed):
    model, w, group, res = _learn_planted(seed)
    assert res.loss_warm > 0.05  # the stored order loses a lot
    assert res.kept and res.loss_learned < 1e-9
    perm = res.perms["g"]
    assert group.is_valid(perm)
    assert is_nm(w[:, perm], 2, 4)  # the hidden order, up to moves that keep it 2:4
    assert torch.equal(model[0].weight, w)  # weights frozen: never written


def test_planted_problem_needs_the_gradient():
    """The control: the same search with the logits frozen (exploration noise only) and without the exploration
    noise stays short of the planted optimum (32 channels: 6^8 of the C(32,16) column sets are lossless)."""
    assert _learn_planted(0, lr=1e-9)[3].loss_learned > 0.01
    assert _learn_planted(0, gumbel=0.0)[3].loss_learned > 0.01


def test_no_steps_returns_the_warm_start():
    model, w, batches = _planted(0)
    group = Group("g", 16, [Member("0.weight", 1, "consumer", module="0")])
    warm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    res = train_permutations(model, [group], {"g": warm}, {"0.weight": w.abs()}, batches,
                             lambda o, b: functional_call(model, o, (b["x"],)),
                             lambda y, r, b: (y - r).pow(2).mean(), 2, 4, E2EConfig(steps=0), seed=0)
    assert torch.equal(res.perms["g"], warm) and not res.kept and res.history == []


def _cfg(**kw):
    base = dict(permutation="e2e", calib_samples=8, calib_seq_len=16, update="none", e2e=FAST)
    base.update(kw)
    return OptimizeConfig(**base)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_e2e_through_compress_is_valid_folded_nm_and_deterministic(name):
    runs = []
    for _ in range(2):
        loaded = load_model(build_tiny(name))
        c = compress_(loaded, _cfg())  # raises if folding changed the function or a mask is not N:M
        runs.append(c)
        assert c.fold_err <= 1e-4
        for g in c.groups:
            assert g.is_valid(c.perms[g.name])
        moved = [r for r in c.group_results if r.strategy == "e2e"]
        assert moved and all("(hungarian) ->" in r.note for r in moved)
        assert all(r.objective == "e2e-" + ("kl" if name == "llama" else "cosine") for r in moved)
        assert all(r.error_after <= r.error_before for r in moved)  # never worse than the warm start
        for info in c.linears:
            if info.prune:
                assert is_nm(weight_kout(loaded.model, info), 2, 4), info.param
    for g in runs[0].groups:
        assert torch.equal(torch.as_tensor(runs[0].perms[g.name]), torch.as_tensor(runs[1].perms[g.name]))


def test_e2e_composes_with_reconstruction():
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(update="obs"))
    assert c.mask_result is not None and any(r.strategy == "e2e" for r in c.group_results)
    for info in c.linears:
        if info.prune:
            assert is_nm(weight_kout(loaded.model, info), 2, 4), info.param


def test_the_learned_loss_is_the_loss_of_the_compiled_model():
    """What e2e trains on (frozen stored weights times masks chosen in permuted order) is exactly the model the
    compiler writes (permutations folded, then the N:M mask applied in the folded order)."""
    from permcompile.calib.data import load_calibration
    from permcompile.calib.stats import collect_input_stats

    dense = load_model(build_tiny("llama"))
    cfg = _cfg(e2e=E2EConfig(steps=20, block_size=16, init_scale=0.5, lr=0.1))
    batches = load_calibration(None, dense, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    stats = collect_input_stats(dense.model, batches, forward_kwargs=dense.forward_kwargs())
    compiled = load_model(copy.deepcopy(dense.model))
    c = compress_(compiled, cfg, stats=stats, batches=batches)
    assert any(not torch.equal(torch.as_tensor(c.perms[g.name]), torch.arange(g.size)) for g in c.groups)
    pruned = [i for i in c.linears if i.prune]
    scores = {i.param: consumer_scores(dense.model, i, stats, cfg.criterion) for i in pruned}
    sites = _sites(c.groups, c.perms, {}, scores, {i.param: i.k_axis for i in pruned})
    over = _overrides(dense.model, sites, _effective_masks(sites, c.perms, None, 2, 4, 0.5))
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        want = compiled.model(input_ids=ids, use_cache=False).logits
        got = functional_call(dense.model, over, (), {"input_ids": ids, "use_cache": False}).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_config_is_validated():
    from permcompile.errors import UsageError

    with pytest.raises(UsageError):
        E2EConfig(loss="bogus")
    with pytest.raises(UsageError):
        E2EConfig(tau_start=0.1, tau_end=1.0)
    with pytest.raises(UsageError):
        OptimizeConfig(e2e="fast")
    assert E2EConfig().resolve_loss("causal-lm") == "kl" and E2EConfig().resolve_loss("encoder") == "cosine"


@pytest.mark.parametrize("residual", ["global", "per-layer"])
def test_optimize_with_e2e_passes_every_check(tiny_dir, tmp_path, residual):
    import json

    from permcompile.pipeline import optimize

    cfg = OptimizeConfig(permutation="e2e", calib_samples=4, calib_seq_len=16, residual=residual, e2e=FAST)
    res = optimize(str(tiny_dir("llama")), tmp_path / "out", cfg, quiet=True, prefetch_export=False)
    assert all(c["passed"] for c in res.report["checks"]), res.report["checks"]
    assert json.loads((tmp_path / "out" / "permutations.json").read_text())["strategy"] == "e2e"


def test_dense_outputs_recomputed_past_the_memory_budget_give_the_same_result(monkeypatch):
    import permcompile.passes.e2e as e2e_mod

    kept = _learn_planted(1, steps=40)[3]
    monkeypatch.setattr(e2e_mod, "REF_BUDGET_BYTES", 0)
    recomputed = _learn_planted(1, steps=40)[3]
    assert torch.equal(kept.perms["g"], recomputed.perms["g"]) and kept.history == recomputed.history


@pytest.mark.parametrize("loss,distill", [("ce", 0.0), ("kl", 0.1), ("cosine", 0.0)])
def test_every_loss_runs_on_a_causal_lm(loss, distill):
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(e2e=E2EConfig(steps=4, block_size=16, loss=loss, distill=distill)))
    notes = [r.note for r in c.group_results if r.strategy == "e2e"]
    assert notes and all(n.startswith(f"{loss} loss") for n in notes)
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])
