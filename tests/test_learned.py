"""The ``learned`` strategy: a planted problem it must solve, and the pipeline on tiny models
(valid, folded, N:M, deterministic, and the loss it learns on is the loss of the model the compiler writes)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from permcompile.config import LearnedConfig, OptimizeConfig, SearchConfig
from permcompile.errors import UsageError
from permcompile.math.nm import is_nm
from permcompile.models import load_model
from permcompile.passes.learned import _effective_masks, _overrides, _sites, train_permutations
from permcompile.passes.groups import Group, Member
from permcompile.passes.sparsify import consumer_scores, weight_kout
from permcompile.pipeline import compress_
from permcompile.testing.zoo import build_tiny

FAST = LearnedConfig(steps=8, block_size=16)


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

    cfg = LearnedConfig(**{**dict(block_size=k, steps=300, lr=0.1, gumbel=1.0, loss="mse"), **kw})
    res = train_permutations(model, [group], {"g": torch.arange(k)}, {"0.weight": w.abs()}, batches, run,
                             objective, 2, 4, cfg, seed=0)
    return model, w, group, res


# four planted problems of one kind (~2.5 s each): the first by default, the other three with -m slow
@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3)])
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
                             lambda y, r, b: (y - r).pow(2).mean(), 2, 4, LearnedConfig(steps=0), seed=0)
    assert torch.equal(res.perms["g"], warm) and not res.kept and res.history == []


def _cfg(**kw):
    base = dict(permutation="learned", calib_samples=8, calib_seq_len=16, update="none", learned=FAST)
    base.update(kw)
    return OptimizeConfig(**base)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_learned_through_compress_is_valid_folded_nm_and_deterministic(name):
    runs = []
    for _ in range(2):
        loaded = load_model(build_tiny(name))
        c = compress_(loaded, _cfg())  # raises if folding changed the function or a mask is not N:M
        runs.append(c)
        assert c.fold_err <= 1e-4
        for g in c.groups:
            assert g.is_valid(c.perms[g.name])
        moved = [r for r in c.group_results if r.strategy == "learned"]
        assert moved and all("(hungarian) ->" in r.note for r in moved)
        assert all(r.objective == "learned-" + ("kl" if name == "llama" else "cosine") for r in moved)
        assert all(r.error_after <= r.error_before for r in moved)  # never worse than the warm start
        for info in c.linears:
            if info.prune:
                assert is_nm(weight_kout(loaded.model, info), 2, 4), info.param
    for g in runs[0].groups:
        assert torch.equal(torch.as_tensor(runs[0].perms[g.name]), torch.as_tensor(runs[1].perms[g.name]))


def test_learned_on_per_layer_sites_is_valid_folded_and_nm():
    """``--residual per-layer``: every reading site is a group of its own, learned like the block groups (in
    memory; test_optimize_with_learned_passes_every_check exports it, with -m slow)."""
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(residual="per-layer"))  # raises if folding changed the function or a mask is not N:M
    assert c.fold_err <= 1e-4
    sites = [r for r in c.group_results if r.kind == "residual-site"]
    assert len(sites) == 4 and all(r.strategy == "learned" for r in sites)
    assert all(r.error_after <= r.error_before for r in sites)
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])
    for info in c.linears:
        if info.prune:
            assert is_nm(weight_kout(loaded.model, info), 2, 4), info.param


def test_learned_runs_under_no_grad_and_refuses_inference_mode():
    """A caller inside ``torch.no_grad()`` gets the permutations it gets outside: the learned loop turns gradients on
    for itself (``backward`` failed with "does not require grad"; the search's Sinkhorn phase:
    test_math_search.py). Inside ``torch.inference_mode()``, which no code can leave for autograd, a configuration
    that trains is one clear error."""
    cfg = _cfg(learned=LearnedConfig(steps=4, block_size=16))
    assert cfg.trains_with_gradients and _cfg(permutation="search", search=SearchConfig(steps=1)).trains_with_gradients
    assert not _cfg(permutation="search").trains_with_gradients
    ref = compress_(load_model(build_tiny("llama")), cfg).perms
    loaded = load_model(build_tiny("llama"))
    with torch.no_grad():
        got = compress_(loaded, cfg).perms
    assert set(got) == set(ref) and all(torch.equal(torch.as_tensor(got[k]), torch.as_tensor(ref[k])) for k in ref)
    with torch.inference_mode(), pytest.raises(UsageError, match="trains with gradients.*torch.no_grad"):
        compress_(load_model(build_tiny("llama")), cfg)


def test_learned_composes_with_reconstruction():
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(update="obs"))
    assert c.mask_result is not None and any(r.strategy == "learned" for r in c.group_results)
    for info in c.linears:
        if info.prune:
            assert is_nm(weight_kout(loaded.model, info), 2, 4), info.param


def test_the_learned_loss_is_the_loss_of_the_compiled_model():
    """What the learned loop trains on (frozen stored weights times masks chosen in permuted order) is exactly the
    model the compiler writes (permutations folded, then the N:M mask applied in the folded order)."""
    from permcompile.calib.data import load_calibration
    from permcompile.calib.stats import collect_input_stats

    dense = load_model(build_tiny("llama"))
    cfg = _cfg(learned=LearnedConfig(steps=20, block_size=16, init_scale=0.5, lr=0.1))
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
        LearnedConfig(loss="bogus")
    with pytest.raises(UsageError):
        LearnedConfig(tau_start=0.1, tau_end=1.0)
    with pytest.raises(UsageError):
        OptimizeConfig(learned="fast")
    assert LearnedConfig().resolve_loss("causal-lm") == "kl" and LearnedConfig().resolve_loss("encoder") == "cosine"


# each a full optimize with the learned loop (~15-30 s): slow. By default the learned permutations are checked
# valid, folded and N:M in memory (test_learned_through_compress_...), and the export does not know which strategy
# chose the permutations: per-layer export and its checks are test_glue's
@pytest.mark.slow
@pytest.mark.parametrize("residual", ["global", "per-layer"])
def test_optimize_with_learned_passes_every_check(tiny_dir, tmp_path, residual):
    import json

    from permcompile.pipeline import optimize

    cfg = OptimizeConfig(permutation="learned", calib_samples=4, calib_seq_len=16, residual=residual, learned=FAST)
    res = optimize(str(tiny_dir("llama")), tmp_path / "out", cfg, quiet=True, prefetch_export=False)
    assert all(c["passed"] for c in res.report["checks"]), res.report["checks"]
    assert json.loads((tmp_path / "out" / "permutations.json").read_text())["strategy"] == "learned"


def test_dense_outputs_recomputed_past_the_memory_budget_give_the_same_result(monkeypatch):
    import permcompile.passes.learned as learned_mod

    kept = _learn_planted(1, steps=40)[3]
    monkeypatch.setattr(learned_mod, "REF_BUDGET_BYTES", 0)
    recomputed = _learn_planted(1, steps=40)[3]
    assert torch.equal(kept.perms["g"], recomputed.perms["g"]) and kept.history == recomputed.history


@pytest.mark.parametrize("loss,distill", [("ce", 0.0), ("kl", 0.1), ("cosine", 0.0)])
def test_every_loss_runs_on_a_causal_lm(loss, distill):
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(learned=LearnedConfig(steps=4, block_size=16, loss=loss, distill=distill)))
    notes = [r.note for r in c.group_results if r.strategy == "learned"]
    assert notes and all(n.startswith(f"{loss} loss") for n in notes)
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])


# --- resume: an interrupted loop continues to exactly the uninterrupted result ------------------------------

def _planted_run(tmp_path, *, resume=False, stop_after=None, seed=0, ckpt=True, **kw):
    """The planted 32-channel problem with Gumbel noise (so the RNG state matters) and a checkpoint every step;
    ``stop_after``: a Ctrl-C once that many steps ran."""
    from permcompile.passes.checkpoint import Checkpoints
    from permcompile.passes.learned import STATE_FILE, checkpoint_digest

    model, w, batches = _planted(0, 32)
    group = Group("g", 32, [Member("0.weight", 1, "consumer", module="0")])
    cfg = LearnedConfig(**{**dict(block_size=32, steps=16, lr=0.1, gumbel=1.0, loss="mse", checkpoint_steps=1), **kw})
    warm, scores = {"g": torch.arange(32)}, {"0.weight": w.abs()}
    checkpoint = None
    if ckpt:
        digest = checkpoint_digest(model, batches, [group], warm, scores, 2, 4, cfg, seed)
        checkpoint = Checkpoints(root=tmp_path, resume=resume).open("learned", digest, STATE_FILE)

    def progress(step, steps, value, tau):
        if stop_after is not None and step + 1 == stop_after:
            raise KeyboardInterrupt

    return train_permutations(model, [group], warm, scores, batches,
                              lambda o, b: functional_call(model, o, (b["x"],)),
                              lambda y, r, b: (y - r).pow(2).sum() / r.pow(2).sum(), 2, 4, cfg, seed=seed,
                              progress=progress, checkpoint=checkpoint)


def test_interrupted_loop_resumes_to_the_uninterrupted_result(tmp_path):
    whole = _planted_run(tmp_path / "a", ckpt=False)
    with pytest.raises(KeyboardInterrupt):
        _planted_run(tmp_path / "b", stop_after=7)
    resumed = _planted_run(tmp_path / "b", resume=True)
    assert torch.equal(resumed.perms["g"], whole.perms["g"])
    assert resumed.history == whole.history and resumed.loss_learned == whole.loss_learned
    assert not torch.equal(whole.perms["g"], torch.arange(32))  # the loop moved something: a real comparison
    again = _planted_run(tmp_path / "b", resume=True)  # finished: the saved result, no step rerun
    assert torch.equal(again.perms["g"], whole.perms["g"]) and again.history == whole.history


def test_a_checkpoint_of_other_inputs_is_refused(tmp_path):
    from permcompile.errors import UsageError

    with pytest.raises(KeyboardInterrupt):
        _planted_run(tmp_path, stop_after=5)
    with pytest.raises(UsageError, match="different model, calibration data or configuration"):
        _planted_run(tmp_path, resume=True, lr=0.2)  # other settings
    with pytest.raises(UsageError, match="different"):
        _planted_run(tmp_path, resume=True, seed=1)  # other seed
    (tmp_path / "learned" / "learned_state.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot be read"):
        _planted_run(tmp_path, resume=True)
    # no checkpoint at all: a resume starts over (the run may have been interrupted before the first save)
    assert _planted_run(tmp_path / "none", resume=True, steps=3).history


@pytest.mark.slow  # three tiny-model compressions (~15 s); the planted test above covers the loop by default
def test_resume_through_compress_gives_the_same_permutations(tmp_path, monkeypatch):
    from permcompile.passes.checkpoint import PassCheckpoint

    cfg = _cfg(learned=LearnedConfig(steps=6, block_size=16, lr=0.2, init_scale=0.5, checkpoint_steps=1))
    whole = compress_(load_model(build_tiny("llama")), cfg)
    real_save, saves = PassCheckpoint.save, []

    def save_then_stop(self, write, saved):  # Ctrl-C right after the third checkpoint is on disk
        written = real_save(self, write, saved)
        saves.append(saved)
        if written and len(saves) == 3:
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(PassCheckpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt) as info:
        compress_(load_model(build_tiny("llama")), cfg, checkpoint_dir=str(tmp_path))
    assert saves == [f"the learned loop at step {i} of 6 is" for i in (1, 2, 3)]
    assert info.value.resume_hint.startswith(saves[-1] + " checkpointed in ") and "--resume" in info.value.resume_hint
    monkeypatch.setattr(PassCheckpoint, "save", real_save)
    resumed = compress_(load_model(build_tiny("llama")), cfg, checkpoint_dir=str(tmp_path), resume=True)
    for g in whole.groups:
        assert torch.equal(torch.as_tensor(resumed.perms[g.name]), torch.as_tensor(whole.perms[g.name])), g.name
    assert [r.note for r in resumed.group_results] == [r.note for r in whole.group_results]


def test_autocast_and_micro_batch_knobs(tmp_path):
    """``autocast`` is bf16 on CUDA only (a no-op here); ``micro_batch`` splits the batches and still learns."""
    from permcompile.errors import UsageError
    from permcompile.passes.learned import _split

    assert LearnedConfig().resolve_autocast("cuda") and LearnedConfig().resolve_autocast("cuda:1")
    assert not LearnedConfig().resolve_autocast("cpu") and not LearnedConfig(autocast="off").resolve_autocast("cuda")
    with pytest.raises(UsageError):
        LearnedConfig(autocast="fp8")
    with pytest.raises(UsageError):
        LearnedConfig(micro_batch=-1)
    off = _planted_run(tmp_path, ckpt=False, steps=10, autocast="off")
    auto = _planted_run(tmp_path, ckpt=False, steps=10, autocast="auto")  # on the CPU: the fp32 run
    assert torch.equal(off.perms["g"], auto.perms["g"]) and off.history == auto.history
    parts = _split([{"x": torch.arange(10).view(5, 2), "n": 3}], 2)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1] and all(p["n"] == 3 for p in parts)
    micro = _planted_run(tmp_path, ckpt=False, steps=10, micro_batch=4)
    assert len(micro.history) == 10 and micro.perms["g"].sort().values.equal(torch.arange(32))


def test_learned_is_the_end_to_end_method_and_search_the_exchange_search():
    """One registry entry per name: ``learned`` runs passes/learned.py with LearnedConfig, ``search`` runs
    passes/search.py with SearchConfig; no other name reaches either, and choosing one warns about nothing."""
    import warnings

    from permcompile.config import SearchConfig
    from permcompile.errors import UsageError
    from permcompile.passes.permute import STRATEGIES

    learned, search = STRATEGIES.get("learned"), STRATEGIES.get("search")
    assert learned.handler.__name__ == "_learned" and learned.config_type is LearnedConfig
    assert search.handler.__name__ == "_search" and search.config_type is SearchConfig
    assert OptimizeConfig().permutation == "hungarian"
    with pytest.raises(UsageError, match="unknown --permutation e2e; choose one of none, random, greedy, hungarian, "
                                         "search, learned"):
        OptimizeConfig(permutation="e2e")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OptimizeConfig(permutation="learned")
        OptimizeConfig(permutation="search")


# --- memory: each layer's masked weight is built inside its own forward, checkpointed ---------------------------

@contextlib.contextmanager
def _eager_masking(model, sites, shared, perms, qs, n, m, mask_tau):
    """The loop's forward as it was before the masked weights were built lazily: every layer's mask and weight at
    once, passed to ``run`` as overrides (kept for the whole backward)."""
    yield _overrides(model, sites, _effective_masks(sites, perms, qs, n, m, mask_tau))


# llama without exploration noise is slow: the noisy case (its RNG replayed under checkpointing) covers it
@pytest.mark.parametrize("name,gumbel", [pytest.param("llama", 0.0, marks=pytest.mark.slow), ("llama", 1.0),
                                         ("bert", 1.0)])
def test_lazy_checkpointed_weights_give_the_eager_result_exactly(monkeypatch, name, gumbel):
    """Building each weight inside its layer's forward under torch.utils.checkpoint (the memory fix) changes no
    number: the same losses at every step and the same permutations as the whole-model overrides."""
    import permcompile.passes.learned as learned_mod

    cfg = _cfg(learned=LearnedConfig(steps=6, block_size=16, lr=0.1, gumbel=gumbel))
    lazy = compress_(load_model(build_tiny(name)), cfg)
    monkeypatch.setattr(learned_mod, "_masking", _eager_masking)
    eager = compress_(load_model(build_tiny(name)), cfg)
    assert [r.error_after for r in lazy.group_results] == [r.error_after for r in eager.group_results]
    for g in lazy.groups:
        assert torch.equal(torch.as_tensor(lazy.perms[g.name]), torch.as_tensor(eager.perms[g.name]))


def test_lazy_weights_restore_the_modules_and_keep_tied_weights_eager():
    from permcompile.passes.learned import _lazy_weights, _shared_params

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert _shared_params(model) == {"0.weight", "1.weight"}
    x = torch.randn(3, 4)
    with _lazy_weights(model, {"2.weight": lambda: model[2].weight.detach() * 0}):
        assert torch.equal(model(x), torch.zeros(3, 4))
        assert "forward" in model[2].__dict__
    assert "forward" not in model[2].__dict__ and isinstance(model[2].weight, nn.Parameter)
    assert torch.equal(model(x), model[2](model[1](model[0](x))))


def test_the_loop_announces_its_expected_time_before_the_first_step(tmp_path):
    """``announce`` is called once, before any step ran, with the steps to run and a positive time estimate."""
    events = []

    def progress(step, steps, value, tau):
        events.append(("step", step))

    def announce(steps, seconds, forward_s):
        events.append(("announce", steps, seconds > 0 and forward_s > 0))

    model, w, batches = _planted(0, 32)
    group = Group("g", 32, [Member("0.weight", 1, "consumer", module="0")])
    train_permutations(model, [group], {"g": torch.arange(32)}, {"0.weight": w.abs()}, batches,
                       lambda o, b: functional_call(model, o, (b["x"],)),
                       lambda y, r, b: (y - r).pow(2).sum() / r.pow(2).sum(), 2, 4,
                       LearnedConfig(block_size=32, steps=5, loss="mse"), progress=progress, announce=announce)
    assert events[0] == ("announce", 5, True) and [e for e in events if e[0] == "announce"] == [events[0]]
    assert [e[1] for e in events[1:]] == [0, 1, 2, 3, 4]
