"""Mask + reconstruct (passes/reconstruct.py) on tiny models: N:M in stored order, closer to dense than masks alone."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from permcompile.config import OptimizeConfig, ReconstructConfig
from permcompile.math.nm import is_nm
from permcompile.models import wrap_module
from permcompile.calib.blocks import find_blocks
from permcompile.passes.checkpoint import Checkpoints
from permcompile.passes.reconstruct import reconstruct_
from permcompile.passes.sparsify import weight_kout
from permcompile.pipeline import _main_output, compress_
from permcompile.testing.zoo import build_tiny


def _compress(net, **kw):
    loaded = wrap_module(copy.deepcopy(net))
    c = compress_(loaded, OptimizeConfig(**{"calib_samples": 8, "calib_seq_len": 32, **kw}), quiet=True)
    return loaded, c


def _output_error(loaded, dense, batches) -> float:
    err = 0.0
    with torch.no_grad():
        for b in batches:
            y, ref = _main_output(loaded.model, b, loaded), _main_output(dense, b, loaded)
            err += float((y - ref).square().sum() / ref.square().sum())
    return err


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
def test_reconstruction_is_nm_and_closer_to_dense(arch):
    net = build_tiny(arch).eval()
    masked, c0 = _compress(net, permutation="hungarian", update="none")
    recon, c1 = _compress(net, permutation="hungarian", update="obs")
    pruned = [i for i in c1.linears if i.prune]
    assert pruned
    for info in pruned:  # post-condition in stored (permuted) order, Conv1D ([K, out]) included
        assert is_nm(weight_kout(recon.model, info), 2, 4), info.module
    for rec in c1.mask_result.layers:
        r = rec["reconstruction"]
        if r["shrink"] is None:  # the held-out check kept the mask alone: its error, not more
            assert r["heldout"]["choice"] == "mask" and r["rel_error_reconstructed"] == r["rel_error_mask_only"]
        else:
            assert r["rel_error_reconstructed"] < r["rel_error_mask_only"], rec["module"]
    # the same permutations were folded: reconstruction is what differs, and the model moved less
    assert {k: v.tolist() for k, v in c0.perms.items()} == {k: v.tolist() for k, v in c1.perms.items()}
    assert _output_error(recon, net, c1.batches) < _output_error(masked, net, c0.batches)


def test_dense_layers_untouched_and_blocks_found():
    net = build_tiny("llama").eval()
    loaded, c = _compress(net, permutation="none", update="obs")
    dense = [i for i in c.linears if not i.prune]
    assert dense  # the LM head stays dense
    for info in dense:
        torch.testing.assert_close(loaded.model.get_parameter(info.param), net.get_parameter(info.param))
    blocks = find_blocks(loaded.model, {i.module for i in c.linears if i.prune})
    assert blocks == [f"model.layers.{i}" for i in range(len(net.model.layers))]


def test_block_streaming_equals_one_pass_over_the_whole_model():
    """The hidden states carried from block to block are what the model itself feeds the next block: pruning
    one block per call (each call embeds afresh through the already pruned blocks) gives the same weights."""
    from permcompile.calib.data import load_calibration
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears

    net = build_tiny("llama").eval()
    loaded = wrap_module(copy.deepcopy(net))
    captured = capture(loaded.model, loaded.example_inputs(), loaded.forward_kwargs())
    linears = select_linears(loaded.model, captured, analyze(captured), 4)
    batches = load_calibration(None, loaded, 4, 16, 0)
    reconstruct_(loaded.model, linears, batches, "wanda", 2, 4, forward_kwargs=loaded.forward_kwargs())

    slow = wrap_module(copy.deepcopy(net))
    for b in range(len(net.model.layers)):
        only = [i if i.module.startswith(f"model.layers.{b}.") else dataclasses.replace(i, prune=False)
                for i in linears]
        # no blocks besides this one have pruned linears: reconstruct_ handles it alone, with full forwards
        reconstruct_(slow.model, only, batches, "wanda", 2, 4, forward_kwargs=slow.forward_kwargs())
    for info in linears:
        torch.testing.assert_close(loaded.model.get_parameter(info.param), slow.model.get_parameter(info.param),
                                   rtol=2e-4, atol=2e-5)


def test_padded_tokens_do_not_count():
    """A batch padded with garbage tokens reconstructs exactly like the same batch without the padding."""
    net = build_tiny("bert").eval()
    loaded = wrap_module(copy.deepcopy(net))
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears

    captured = capture(loaded.model, loaded.example_inputs(), loaded.forward_kwargs())
    linears = select_linears(loaded.model, captured, analyze(captured), 4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (2, 12), generator=gen)
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    padded_ids = torch.cat([ids, torch.randint(5, 90, (2, 5), generator=gen)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], 1)
    padded = [{"input_ids": padded_ids, "attention_mask": mask}]
    a, b = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    # 24 tokens for K=64: a rank-deficient Hessian, where the refit's steps amplify the rounding differences of
    # the two forwards; the OBS pass alone shows whether padding leaked in
    cfg = ReconstructConfig(refit_iters=0)
    reconstruct_(a, linears, plain, "wanda", 2, 4, config=cfg)
    reconstruct_(b, linears, padded, "wanda", 2, 4, config=cfg)
    for info in linears:
        if info.prune:
            torch.testing.assert_close(a.get_parameter(info.param), b.get_parameter(info.param), rtol=1e-3,
                                       atol=1e-4)


def test_criterion_mask_and_refit_options():
    net = build_tiny("llama").eval()
    _, obs = _compress(net, permutation="none")
    _, crit = _compress(net, permutation="none", reconstruct=ReconstructConfig(mask="criterion"))
    _, refit = _compress(net, permutation="none", reconstruct=ReconstructConfig(refit_iters=30))
    for a, b, c in zip(obs.mask_result.layers, crit.mask_result.layers, refit.mask_result.layers):
        assert b["reconstruction"]["rel_error_reconstructed"] <= b["reconstruction"]["rel_error_mask_only"]
        # same mask as obs, then least squares: never worse on the calibration data
        assert c["reconstruction"]["rel_error_reconstructed"] <= a["reconstruction"]["rel_error_reconstructed"] * 1.001


def test_per_layer_glue_keeps_its_post_conditions():
    """With --residual per-layer the glued readers are reconstructed in their gathered (stored) order."""
    net = build_tiny("llama").eval()
    loaded, c = _compress(net, permutation="hungarian", residual="per-layer")
    assert c.fold_report.glue_ops > 0
    for info in c.linears:
        if info.prune:
            assert is_nm(weight_kout(loaded.model, info), 2, 4)


def _llama_and_batches():
    from permcompile.calib.data import load_calibration

    loaded = wrap_module(build_tiny("llama").eval())
    return loaded, load_calibration(None, loaded, 4, 16, 0)


def test_obs_stats_are_the_inverse_hessian_diagonal():
    """The search statistics of --update obs: norm_j = 1/sqrt([H⁻¹]_jj) of the dense model's own inputs."""
    from permcompile.calib.blocks import model_hessians, obs_stats
    from permcompile.math.obs import dampen

    loaded, batches = _llama_and_batches()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    stats = obs_stats(loaded.model, batches, names, damp=0.01, forward_kwargs=loaded.forward_kwargs())
    direct = model_hessians(loaded.model, batches, names, forward_kwargs=loaded.forward_kwargs())
    for name in names:
        inv = torch.linalg.inv(dampen(direct[name].hessian(), 0.01).double()).diagonal()
        torch.testing.assert_close(stats[name].norm.double(), inv.rsqrt(), rtol=1e-3, atol=0)


def test_obs_search_objective_gives_valid_permutations():
    net = build_tiny("llama").eval()
    plain, c0 = _compress(net, permutation="hungarian")
    obs, c1 = _compress(net, permutation="hungarian", reconstruct=ReconstructConfig(search="obs"))
    assert "OBS statistics" in c1.timings and "OBS statistics" not in c0.timings
    moved = [g for g in c1.groups if not torch.equal(c1.perms[g.name], c0.perms[g.name])]
    assert moved  # a different objective: some group chose another order
    for info in c1.linears:
        if info.prune:
            assert is_nm(weight_kout(obs.model, info), 2, 4)


def test_siblings_share_one_hessian_product_correctly():
    """q/k/v read one tensor: their Hessians come from one product and equal each one's own XᵀX."""
    from permcompile.calib.blocks import model_hessians

    loaded, batches = _llama_and_batches()
    names = [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"] + ["model.layers.0.self_attn.o_proj"]
    seen: dict = {n: [] for n in names}
    handles = [loaded.model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    acc = model_hessians(loaded.model, batches, names, forward_kwargs=loaded.forward_kwargs())
    for h in handles:
        h.remove()
    for n in names:
        x = torch.cat(seen[n]).double()
        torch.testing.assert_close(acc[n].xtx.double(), x.T @ x, rtol=1e-4, atol=1e-4)
        assert acc[n].count == x.shape[0]


def _setup_llama():
    from permcompile.calib.data import load_calibration
    from permcompile.capture import capture
    from permcompile.passes.coupling import analyze
    from permcompile.passes.sparsify import select_linears

    net = build_tiny("llama").eval()
    loaded = wrap_module(copy.deepcopy(net))
    captured = capture(loaded.model, loaded.example_inputs(), loaded.forward_kwargs())
    linears = select_linears(loaded.model, captured, analyze(captured), 4)
    return net, linears, load_calibration(None, loaded, 4, 16, 0)


def test_interrupted_reconstruction_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import permcompile.passes.reconstruct as rec

    net, linears, batches = _setup_llama()
    whole = copy.deepcopy(net)
    rec.reconstruct_(whole, linears, batches, "wanda", 2, 4)

    first = copy.deepcopy(net)
    real = rec._reconstruct_linear
    calls = {"n": 0}

    def dies_in_block_1(model, info, *a, **k):
        if info.module.startswith("model.layers.1."):
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(model, info, *a, **k)

    monkeypatch.setattr(rec, "_reconstruct_linear", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt) as info:
        rec.reconstruct_(first, linears, batches, "wanda", 2, 4, checkpoints=Checkpoints(root=tmp_path))
    assert "1 reconstructed blocks are checkpointed" in info.value.resume_hint
    monkeypatch.setattr(rec, "_reconstruct_linear", real)
    assert calls["n"] > 0 and (tmp_path / "reconstruct" / "progress.json").is_file()

    resumed = copy.deepcopy(net)  # a fresh process: dense weights, the checkpoint restores block 0
    result = rec.reconstruct_(resumed, linears, batches, "wanda", 2, 4,
                              checkpoints=Checkpoints(root=tmp_path, resume=True))
    for info in linears:
        assert torch.equal(resumed.get_parameter(info.param), whole.get_parameter(info.param)), info.param
    assert len(result.layers) == sum(i.prune for i in linears)
    assert all("reconstruction" in x for x in result.layers)


def test_resume_refuses_a_bad_or_foreign_checkpoint(tmp_path, capsys):
    import permcompile.passes.reconstruct as rec
    from permcompile.errors import UsageError

    net, linears, batches = _setup_llama()
    fresh = copy.deepcopy(net)  # nothing saved yet (interrupted earlier): --resume starts the pass afresh, said once
    rec.reconstruct_(fresh, linears, batches, "wanda", 2, 4,
                     checkpoints=Checkpoints(root=tmp_path / "none", resume=True, quiet=False))
    assert is_nm(weight_kout(fresh, linears[0]), 2, 4)
    note = [line for line in capsys.readouterr().err.splitlines() if "--resume" in line]
    assert note == [f"[permcompile] --resume: no reconstruct checkpoint in {tmp_path / 'none' / 'reconstruct'}; the "
                    "reconstruct pass starts from the beginning"], note
    rec.reconstruct_(copy.deepcopy(net), linears, batches, "wanda", 2, 4, checkpoints=Checkpoints(root=tmp_path))
    resume = Checkpoints(root=tmp_path, resume=True)
    with pytest.raises(UsageError, match="different model, calibration data or configuration"):
        rec.reconstruct_(copy.deepcopy(net), linears, batches, "ria", 2, 4, checkpoints=resume)
    (tmp_path / "reconstruct" / "progress.json").write_text('{"digest": "x", "do')
    with pytest.raises(UsageError, match="truncated or corrupt"):
        rec.reconstruct_(copy.deepcopy(net), linears, batches, "wanda", 2, 4, checkpoints=resume)


def test_every_strategy_has_one_handler_and_the_step_checks_validity(monkeypatch):
    from permcompile.passes.permute import STRATEGIES, PermuteRequest, permute

    assert STRATEGIES.choices() == ("none", "random", "greedy", "hungarian", "search", "learned")
    assert all(callable(STRATEGIES.get(name).handler) for name in STRATEGIES)
    net = build_tiny("llama").eval()
    loaded, c = _compress(net, permutation="hungarian", update="none")
    bad = {g.name: torch.arange(g.size).flip(0) for g in c.groups}  # moves pinned elements and splits heads
    entry = STRATEGIES.get("hungarian")
    monkeypatch.setitem(STRATEGIES._entries, "hungarian",
                        dataclasses.replace(entry, handler=lambda req: (dict(bad), [])))
    with pytest.raises(RuntimeError, match="invalid permutation"):
        permute(PermuteRequest(loaded, c.groups, c.stats, c.batches, OptimizeConfig(permutation="hungarian"),
                               c.linears, {i.param for i in c.linears if i.prune}))


def test_heldout_check_fits_without_one_kind_of_text_and_records_the_choice():
    """The embedded set's batches come from three kinds of text: each block fits without one of them, scores
    the update on it, and keeps the least shrinkage that beats the mask alone there (or the mask)."""
    from permcompile.calib.data import load_calibration
    from permcompile.passes.reconstruct import heldout_batches

    net = build_tiny("llama").eval()
    loaded = wrap_module(copy.deepcopy(net))
    batches = load_calibration(None, loaded, 12, 32, 0, batch_size=4)
    pick = heldout_batches(batches, "auto")
    kinds = sorted(set(batches.sources))
    assert [{batches.sources[i] for i in pick(b)} for b in range(3)] == [{k} for k in kinds]
    assert heldout_batches(batches, "none") is None
    _, c = _compress(net, permutation="hungarian", update="obs", calib_samples=12)
    for rec in c.mask_result.layers:
        held = rec["reconstruction"]["heldout"]
        assert held["tokens"] > 0 and held["choice"] in held["tried"]
        assert held["rel_error_reconstructed"] <= held["rel_error_mask_only"]
    # without the check: the plain update everywhere, never the mask alone
    cfg = ReconstructConfig(heldout="none")
    _, plain = _compress(net, permutation="hungarian", update="obs", reconstruct=cfg)
    assert all(r["reconstruction"]["shrink"] == 0.0 and "heldout" not in r["reconstruction"]
               for r in plain.mask_result.layers)


def test_one_text_holds_out_a_quarter_of_the_batches_in_turn():
    from permcompile.calib.data import CalibrationBatches
    from permcompile.passes.reconstruct import heldout_batches

    batches = CalibrationBatches([{}] * 8)
    batches.sources, batches.documents = ["a.txt"] * 8, 1
    pick = heldout_batches(batches, "auto")
    assert [sorted(pick(b)) for b in range(5)] == [[0, 4], [1, 5], [2, 6], [3, 7], [0, 4]]
    share = batches.share(1, 2)  # a second process's share: the same global choice
    assert [sorted(share.positions[i] for i in heldout_batches(share, "auto")(b)) for b in range(4)] == [
        [], [1, 5], [], [3, 7]]
    assert heldout_batches(CalibrationBatches([{}]), "auto") is None


def test_pipeline_warns_when_the_weight_update_is_fitted_on_one_text(tmp_path):
    from permcompile.calib.text import default_text

    path = tmp_path / "one.txt"
    path.write_text(default_text())
    net = build_tiny("llama").eval()
    with pytest.warns(UserWarning, match="single text: 33% of the weight update's fit comes from the embedded"):
        _compress(net, permutation="none", calib=str(path))
    with pytest.warns(UserWarning, match="single text: the weight update fits its kind of text"):
        _compress(net, permutation="none", calib=str(path), reconstruct=ReconstructConfig(reference_share=0))
    import warnings

    with warnings.catch_warnings():  # masks only: nothing is fitted, nothing to warn about
        warnings.simplefilter("error")
        _compress(net, permutation="none", calib=str(path), update="none")


def test_one_text_is_checked_on_the_embedded_set_and_never_fitted_on_it(tmp_path):
    """``reference_share=0``: a single calibration text cannot show how its update does on other kinds of text,
    so the held-out check scores it on reference batches of the embedded mixed set, which never enter the fitted
    Hessians."""
    import warnings

    from permcompile.calib.text import default_text

    path = tmp_path / "one.txt"
    path.write_text(default_text())
    net = build_tiny("llama").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-text warning (its own test above)
        _, c = _compress(net, permutation="none", calib=str(path), calib_samples=8, calib_seq_len=32,
                         reconstruct=ReconstructConfig(reference_share=0))
        _, plain = _compress(net, permutation="none", calib=str(path), calib_samples=8, calib_seq_len=32,
                             reconstruct=ReconstructConfig(heldout="none", reference_share=0))
    assert set(c.calibration["reconstruction_checked_only"]) == {"prose", "docs", "code"}
    assert list(c.calibration["reconstruction_fit"]) == ["one.txt"]
    for rec, base in zip(c.mask_result.layers, plain.mask_result.layers):
        r = rec["reconstruction"]
        assert r["tokens"] == base["reconstruction"]["tokens"] == 8 * 32  # the reference never fitted on
        assert r["heldout"]["tokens"] > 0 and r["heldout"]["choice"] in r["heldout"]["tried"]
        first_block = ".layers.0." in rec["module"]  # later blocks see inputs the earlier choices shaped
        if first_block and r["heldout"]["choice"] == "shrink=0":  # the plain update kept: as without the check
            assert r["rel_error_reconstructed"] == pytest.approx(base["reconstruction"]["rel_error_reconstructed"],
                                                                 rel=1e-4)


def test_one_text_is_topped_up_with_the_embedded_set_and_each_kind_held_out_in_turn(tmp_path, capsys):
    """By default a single text's fit also takes ``reference_share`` of its samples from the embedded mixed set,
    labelled by kind: the blocks hold out the user's text and each embedded kind in turn."""
    import warnings

    from permcompile.calib.text import default_text

    path = tmp_path / "one.txt"
    path.write_text(default_text())
    net = build_tiny("llama").eval()
    cfg = ReconstructConfig()
    extra = cfg.reference_samples(8)
    assert extra == round(8 * cfg.reference_share / (1 - cfg.reference_share)) >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-text warning (its own test above)
        _, c = _compress(net, permutation="none", calib=str(path), calib_samples=8, calib_seq_len=32)
        _, plain = _compress(net, permutation="none", calib=str(path), calib_samples=8, calib_seq_len=32,
                             reconstruct=ReconstructConfig(heldout="none"))
    for rec, base in zip(c.mask_result.layers, plain.mask_result.layers):
        # the embedded samples are fitted on, with or without the check
        assert rec["reconstruction"]["tokens"] == base["reconstruction"]["tokens"] == (8 + extra) * 32
        held = rec["reconstruction"]["heldout"]
        assert 0 < held["tokens"] < (8 + extra) * 32 and held["choice"] in held["tried"]
    # report.json says what the update was fitted on
    assert list(c.calibration["batches"]) == ["one.txt"]
    assert set(c.calibration["reconstruction_fit"]) == {"one.txt", "prose", "docs", "code"}
    assert "reconstruction_checked_only" not in c.calibration
    from permcompile.cli import _print_summary

    _print_summary({"model": "tiny", "sparsity": "2:4", "permutation": "none", "criterion": "wanda",
                    "pruned_layers": c.mask_result.layers, "calibration": c.calibration})
    line = next(x for x in capsys.readouterr().out.splitlines() if "embedded mixed set" in x)
    assert all(f"of {kind}" in line for kind in ("prose", "docs", "code")) and "one.txt" not in line
    assert set(c.calibration["reconstruction_fit_embedded"]) == {"prose", "docs", "code"}
    # a user's file named like an embedded kind: the embedded batches are told apart by position, not by name
    from permcompile.calib.data import CalibrationBatches, with_reference
    from permcompile.pipeline import _calibration_summary

    mine = CalibrationBatches([{}] * 2)
    mine.sources, mine.documents = ["prose"] * 2, 1
    embedded = CalibrationBatches([{}] * 3)
    embedded.sources = ["prose", "docs", "code"]
    summary = _calibration_summary(mine, with_reference(mine, embedded, fit=True))
    assert summary["reconstruction_fit"] == {"prose": 3, "docs": 1, "code": 1}
    assert summary["reconstruction_fit_embedded"] == {"prose": 1, "docs": 1, "code": 1}
    _print_summary({"model": "tiny", "sparsity": "2:4", "permutation": "none", "criterion": "wanda",
                    "pruned_layers": c.mask_result.layers, "calibration": summary})
    line = next(x for x in capsys.readouterr().out.splitlines() if "embedded mixed set" in x)
    assert "1 batches of prose" in line
    # the blocks hold out one kind each, in turn: the user's text is one of the kinds
    from permcompile.calib.data import CalibrationBatches, with_reference
    from permcompile.passes.reconstruct import heldout_batches

    user = CalibrationBatches([{}] * 3)
    user.sources, user.documents = ["one.txt"] * 3, 1
    ref = CalibrationBatches([{}] * 3)
    ref.sources = ["code", "docs", "prose"]
    both = with_reference(user, ref, fit=True)
    assert both.reference == [] and both.documents is None
    pick = heldout_batches(both, "auto")
    assert [pick(b) for b in range(4)] == [{3}, {4}, {0, 1, 2}, {5}]
