"""The search strategy end to end on a tiny model: valid, deterministic, resumable, never worse."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from permcompile.config import OptimizeConfig, SearchConfig
from permcompile.errors import UsageError
from permcompile.models import load_model
from permcompile.passes.checkpoint import Checkpoints
from permcompile.pipeline import compress_
from permcompile.testing.zoo import build_tiny

SEARCH = SearchConfig(steps=6, rounds=1, block_size=16, swap_trials=200, residual_trials=0)  # both block phases


def _cfg(**kw):
    base = dict(permutation="search", calib_samples=4, calib_seq_len=16, search=SEARCH)
    base.update(kw)
    return OptimizeConfig(**base)


def _run(tmp_path, **kw):
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(**kw.pop("cfg", {})), checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    return loaded, c


@pytest.mark.parametrize("objective", ["output", "diagonal", "relative"])
def test_search_is_valid_and_not_worse_than_hungarian(tmp_path, objective, monkeypatch):
    import permcompile.passes.search as search_mod

    off_diagonal, traces = [], []
    real = search_mod.learn_permutation

    def spy(consumers, *args, **kwargs):  # the objective reaches the search: diagonal Grams have no off-diagonal,
        for c in consumers:  # relative ones are means of unit-norm tokens' outer products (trace 1)
            off_diagonal.append(float((c.gram - torch.diag(torch.diagonal(c.gram))).abs().max()))
            traces.append(float(torch.trace(c.gram)))
        return real(consumers, *args, **kwargs)

    monkeypatch.setattr(search_mod, "learn_permutation", spy)
    loaded, c = _run(tmp_path, cfg={"search": dataclasses.replace(SEARCH, objective=objective)})
    assert off_diagonal and ((max(off_diagonal) == 0.0) == (objective == "diagonal"))
    assert all(abs(t - 1) < 1e-4 for t in traces) == (objective == "relative"), traces
    learned = [r for r in c.group_results if r.strategy == "search"]
    assert learned, "no group was searched"
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])
    improved = 0
    for r in learned:
        assert r.objective == objective and r.exchanges_kept >= 0, r
        assert r.error_after <= r.error_before + 1e-9
        improved += r.error_after < r.error_before
        assert r.note.startswith(f"{objective} error ") and "(hungarian)" in r.note  # the human summary
    assert improved > 0, "the search improved no group's output error"


def test_diagonal_objective_uses_the_calibration_statistics_not_a_gram_pass(tmp_path, monkeypatch):
    """diag(XᵀX) is what the Wanda statistics hold: no Gram pass, and the same permutations as with one."""
    import permcompile.passes.search as search_mod

    cfg = {"search": dataclasses.replace(SEARCH, objective="diagonal")}
    passes = []

    class CountingHooks(search_mod._GramHooks):
        def __init__(self, *a, **k):
            passes.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(search_mod, "_GramHooks", CountingHooks)
    _, fast = _run(tmp_path / "stats", cfg=cfg)
    assert passes == [] and any(r.strategy == "search" for r in fast.group_results)
    monkeypatch.setattr(search_mod, "_stat_grams_suffice", lambda *a: False)  # the Gram pass, as before
    _, slow = _run(tmp_path / "hooks", cfg=cfg)
    assert passes  # the forced run did take the Gram pass
    for g in fast.groups:
        assert torch.equal(fast.perms[g.name], slow.perms[g.name]), g.name
    notes = {r.name: r.note for r in slow.group_results}
    assert all(r.note == notes[r.name] for r in fast.group_results if r.strategy == "search")


def test_resume_after_interruption_gives_same_result(tmp_path, monkeypatch, capsys):
    _, full = _run(tmp_path / "full")

    import permcompile.passes.search as search_mod

    calls = {"n": 0}
    real = search_mod._search_block

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second block
        return real(*args, **kwargs)

    monkeypatch.setattr(search_mod, "_search_block", flaky)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        _run(tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "ckpt" / "search" / "search_state.json").read_text())
    assert len(state["done"]) == 1
    # what the CLI's error line adds: how much is saved and how to go on
    assert re.fullmatch(r"1 of \d+ searched blocks are checkpointed in .*ckpt/search: rerun the same command "
                        r"with --resume to continue from it", interrupted.value.resume_hint)
    monkeypatch.setattr(search_mod, "_search_block", real)
    _, resumed = _run(tmp_path / "resumed", resume=True, quiet=False)
    assert re.search(r"--resume: reused 1 of (\d+) searched blocks from .*search_state.json; \d+ left to search",
                     capsys.readouterr().err)
    for name in full.perms:  # same seed, same inputs: identical permutations (determinism and resume)
        assert torch.equal(full.perms[name], resumed.perms[name]), name


def test_resume_refuses_changed_inputs(tmp_path):
    _run(tmp_path)
    with pytest.raises(UsageError, match="different"):
        _run(tmp_path, resume=True, cfg={"seed": 1})


# ------------------------------------------------------------------------------------------ sequential
@pytest.mark.parametrize("residual", ["global", "per-layer"])
def test_sequential_masks_are_the_pipeline_masks(residual):
    """Masking in stored order with each group's permutation gives exactly the deployed (folded, masked) model
    (masks only: with ``update="obs"`` the deployed weights are also reconstructed)."""
    from permcompile.calib.stats import collect_input_stats
    from permcompile.passes.search import _SequentialMasks

    deployed = load_model(build_tiny("llama"))
    cfg = _cfg(permutation="hungarian", residual=residual, update="none")
    from permcompile.calib.data import load_calibration

    batches = load_calibration(cfg.calib, deployed, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    stats = collect_input_stats(deployed.model, batches, progress=False, forward_kwargs=deployed.forward_kwargs())
    c = compress_(deployed, cfg, stats=stats, batches=batches)  # stats are copied, ours stay in stored order

    plain = load_model(build_tiny("llama"))
    before = {k: v.detach().clone() for k, v in plain.model.named_parameters()}
    pruned = {i.param for i in c.linears if i.prune}
    seq = _SequentialMasks(plain.model, c.groups, c.perms, pruned, stats, "wanda", 2, 4)
    seq.mask_before("end", set())  # every block
    assert set(seq.saved) == pruned
    x = batches[0]["input_ids"]
    with torch.no_grad():
        a = deployed.model(input_ids=x).logits
        b = plain.model(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    seq.restore()
    for k, v in plain.model.named_parameters():
        assert torch.equal(v, before[k]), k


def test_sequential_learning_sees_pruned_inputs_and_leaves_the_model_dense(tmp_path, monkeypatch):
    import permcompile.passes.search as search_mod

    seen = {}
    real = search_mod._search_block

    def spy(block_groups, hooks, *args, **kwargs):
        for name, g in hooks.grams.items():
            seen.setdefault(name, g.clone())
        return real(block_groups, hooks, *args, **kwargs)

    monkeypatch.setattr(search_mod, "_search_block", spy)
    dense_grams = {}
    loaded = load_model(build_tiny("llama"))
    before = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    from permcompile.calib.data import load_calibration
    from permcompile.calib.stats import collect_input_stats
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears

    cfg = _cfg(search=dataclasses.replace(SEARCH, sequential=True))
    batches = load_calibration(cfg.calib, loaded, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    stats = collect_input_stats(loaded.model, batches, progress=False, forward_kwargs=loaded.forward_kwargs())
    captured = capture(loaded.model, loaded.example_inputs(), loaded.forward_kwargs())
    groups = analyze(captured)
    pruned = {i.param for i in select_linears(loaded.model, captured, groups, 4) if i.prune}
    for seq_flag in (False, True):
        seen.clear()
        c = dataclasses.replace(cfg, search=dataclasses.replace(SEARCH, sequential=seq_flag))
        perms, _ = search_mod.search_permutations(loaded, groups, stats, batches, c, pruned=pruned, quiet=True,
                                                  checkpoints=Checkpoints(root=tmp_path / f"s{seq_flag}"))
        for k, v in loaded.model.named_parameters():  # the search leaves the model dense
            assert torch.equal(v, before[k]), k
        if not seq_flag:
            dense_grams = dict(seen)
    # every block's inputs changed: later blocks read pruned blocks, and even block 0's o_proj/down_proj read
    # its already-decided (global residual group) v_proj and gate/up_proj pruned
    assert set(seen) == set(dense_grams) and any(k.startswith("model.layers.1.") for k in seen), sorted(seen)
    for k in seen:
        assert not torch.allclose(seen[k], dense_grams[k]), k


def test_warm_start_greedy(tmp_path):
    """--warm-start greedy: the residual group keeps greedy's permutation, the learned groups start from it."""
    loaded, c = _run(tmp_path, cfg={"search": dataclasses.replace(SEARCH, warm_start="greedy")})
    learned = [r for r in c.group_results if r.strategy == "search"]
    assert learned and all("(greedy) ->" in r.note for r in learned), [r.note for r in learned]
    _, heuristic = _run(tmp_path / "greedy", cfg={"permutation": "greedy"})
    res = [g for g in c.groups if g.kind == "residual"][0]
    assert torch.equal(c.perms[res.name], heuristic.perms[res.name])
    assert not torch.equal(c.perms[res.name], torch.arange(res.size)), "greedy left the identity: proves nothing"
    with pytest.raises(UsageError, match="warm_start"):
        SearchConfig(warm_start="random")


@pytest.mark.parametrize("name, expected", [("llama", "diagonal"), ("bert", "output"), ("vit", "output")])
def test_auto_objective_is_resolved_per_family(tmp_path, name, expected):
    """The default objective is "auto": the learned pass resolves it from the model family (the best measured:
    diagonal for causal LMs, output otherwise) and notes name the objective that was really used."""
    assert SearchConfig().objective == "auto"
    assert SearchConfig().resolve_objective("causal-lm") == "diagonal"
    assert SearchConfig().resolve_objective("encoder") == "output"
    assert SearchConfig(objective="relative").resolve_objective("causal-lm") == "relative"
    loaded = load_model(build_tiny(name))
    cfg = _cfg(search=SearchConfig(block_size=16, swap_trials=50))
    c = compress_(loaded, cfg, checkpoint_dir=str(tmp_path / "ckpt"))
    learned = [r for r in c.group_results if r.strategy == "search"]
    assert learned and all(r.objective == expected for r in learned), [r.objective for r in learned]
    assert all(r.note.startswith(expected + " error ") for r in learned), [r.note for r in learned]


def test_residual_exchanges_refine_the_global_residual_group(tmp_path):
    """residual_trials > 0: the global residual group is refined on every reader's diagonal error (never worse
    than its warm start), stays valid, and a resumed run reloads it from the checkpoint unchanged."""
    learn = dataclasses.replace(SEARCH, residual_trials=300)
    loaded, c = _run(tmp_path, cfg={"search": learn})
    res = [r for r in c.group_results if r.name in {g.name for g in c.groups if g.kind == "residual"}]
    assert res and all(r.strategy == "search" for r in res), [(r.name, r.strategy) for r in res]
    for r in res:
        assert r.objective == "diagonal" and r.error_after <= r.error_before + 1e-9, r
        assert r.error_after < r.error_before and r.exchanges_kept > 0, r  # it does move on a random model
        assert re.match(r"diagonal error over \d+ readers", r.note) and int(r.note.split()[3]) >= 4, r.note
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])
    _, plain = _run(tmp_path / "plain")
    moved = [g.name for g in c.groups if g.kind == "residual" and not torch.equal(c.perms[g.name], plain.perms[g.name])]
    assert moved
    _, again = _run(tmp_path, cfg={"search": learn}, resume=True)
    for g in c.groups:
        assert torch.equal(c.perms[g.name], again.perms[g.name])
    fields = ("objective", "error_before", "error_after", "exchanges_kept")
    resumed = {r.name: r for r in again.group_results}
    for r in c.group_results:  # the typed results come back from the checkpoint too
        assert [getattr(resumed[r.name], f) for f in fields] == [getattr(r, f) for f in fields], r.name
