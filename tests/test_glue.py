"""Per-layer residual permutations (glue): split into reading sites, gathers that keep the function,
an ONNX graph with exactly one Gather per site, and a plain hf/ checkpoint that needs no gather."""
from __future__ import annotations

import json

import pytest
import torch

from permcompile.capture import capture
from permcompile.config import OptimizeConfig
from permcompile.errors import UsageError
from permcompile.export.verify import verify_artifacts
from permcompile.passes.coupling import analyze
from permcompile.passes.fold import fold_, random_permutation
from permcompile.passes.sparsify import select_linears
from permcompile.passes.glue import GatherInput, glue_records, split_residual, standard_form
from permcompile.testing.zoo import build_tiny

from test_coupling import _inputs, _out


def _split(arch):
    model = build_tiny(arch)
    kw, fwd = _inputs(model)
    captured = capture(model, kw, fwd)
    groups = analyze(captured)
    pruned = {i.param for i in select_linears(model, captured, groups, 4) if i.prune}
    return model, groups, split_residual(groups, model, pruned), pruned


def test_llama_sites_are_attention_and_mlp_of_each_layer():
    model, before, after, pruned = _split("llama")
    res = next(g for g in before if g.kind == "residual")
    sites = [g for g in after if g.glue]
    names = sorted(g.name for g in sites)
    layers = model.config.num_hidden_layers
    assert names == sorted([f"residual@model.layers.{i}.self_attn" for i in range(layers)]
                           + [f"residual@model.layers.{i}.mlp" for i in range(layers)])
    for g in sites:
        assert g.kind == "residual-site" and g.size == res.size and not g.fixed and g.blocks is None
        assert not g.producers and not g.passengers
        mods = sorted(c.module.rsplit(".", 1)[1] for c in g.consumers)
        assert mods in (["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]), mods
    # every reader moved to exactly one site; the residual group keeps its writers and passengers
    moved = [c.param for g in sites for c in g.consumers]
    assert len(moved) == len(set(moved)) == 5 * layers
    new_res = next(g for g in after if g.kind == "residual")
    assert {m.param for m in new_res.members} == {m.param for m in res.members} - set(moved)
    assert new_res.producers == res.producers and new_res.passengers == res.passengers
    assert new_res.pinned and any(p.op == "per-layer" for p in new_res.pins)
    # the other groups are untouched
    assert [g for g in after if g.kind not in ("residual", "residual-site")] == \
        [g for g in before if g.kind != "residual"]


def test_tied_and_unpruned_readers_stay_in_the_residual_group():
    model, _, after, pruned = _split("llama")
    res = next(g for g in after if g.kind == "residual")
    assert any(c.module == "lm_head" for c in res.consumers)  # tied to the embedding: never glued
    after2 = split_residual(analyze(capture(model, *_inputs(model))), model, set())
    assert not any(g.glue for g in after2), "nothing pruned: nothing to split"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert", "vit", "dinov2"])
def test_random_site_permutations_keep_the_function(arch):
    model, _, groups, _ = _split(arch)
    sites = [g for g in groups if g.glue]
    assert sites, "no reading site found"
    gen = torch.Generator().manual_seed(5)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    refs = []
    for s in (3, 4):
        kw, fwd = _inputs(model, batch=3, seq=11, seed=s)
        refs.append((kw, fwd, _out(model, kw, fwd)))
    report = fold_(model, groups, perms)
    assert report.glue_ops == len(sites)
    for kw, fwd, ref in refs:
        err = float((_out(model, kw, fwd) - ref).abs().max() / ref.abs().max())
        assert err <= 1e-5, err
    # the glued readers' weights really moved (otherwise the check above proves nothing)
    records = glue_records(model, groups, perms)
    assert len(records) == sum(len(g.consumers) for g in sites)
    assert any(r["index"] != sorted(r["index"]) for r in records)


def test_standard_form_is_the_same_function_without_gathers_and_is_restored():
    model, _, groups, _ = _split("llama")
    gen = torch.Generator().manual_seed(1)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    kw, fwd = _inputs(model, batch=2, seq=9, seed=2)
    ref = _out(model, kw, fwd)
    fold_(model, groups, perms)
    records = glue_records(model, groups, perms)
    deployed = {k: v.clone() for k, v in model.state_dict().items()}
    plain = build_tiny("llama")  # no hooks
    with standard_form(model, records):
        plain.load_state_dict(model.state_dict())
    assert torch.allclose(_out(plain, kw, fwd), ref, atol=1e-5, rtol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, deployed[k]), k
    with pytest.raises(RuntimeError):
        with standard_form(model, records):
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, deployed[k]), f"{k} not restored after an error"


def test_gather_memo_shares_one_gather_between_siblings_only_for_the_same_tensor():
    idx = torch.tensor([2, 0, 1])
    memo = {}
    hooks = [GatherInput(idx, memo, 3) for _ in range(3)]
    x = torch.arange(6.0).reshape(2, 3)
    y0 = hooks[0](None, (x,))[0]
    y1 = hooks[1](None, (x,))[0]
    assert y1 is y0 and torch.equal(y0, x[:, idx])
    y2 = hooks[2](None, (x,))[0]
    assert y2 is y0 and memo == {}, "the memo is dropped once every reader took it"
    other = x + 1
    z0 = hooks[0](None, (x,))[0]
    z1 = hooks[1](None, (other,))[0]
    assert torch.equal(z1, other[:, idx]) and z1 is not z0


def _gathers(path):
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type == "Gather" for n in proto.graph.node)


@pytest.fixture(scope="module")
def glued(tiny_dir, tmp_path_factory, hungarian_llama):
    """``(per-layer run, global run)``: the same model, strategy and calibration; the global run is conftest's
    ``hungarian_llama`` (shared with test_export_prefetch.py)."""
    from permcompile.pipeline import optimize

    work = tmp_path_factory.mktemp("glue")
    # prefetch asked for: per-layer must refuse it (test_per_layer_never_binds_weights_...), the output is the same
    per_layer = optimize(str(tiny_dir("llama")), work / "per_layer",
                         OptimizeConfig(permutation="hungarian", residual="per-layer", calib_samples=4,
                                        calib_seq_len=32), quiet=True, prefetch_export=True)
    return per_layer, hungarian_llama


def test_optimize_per_layer_passes_every_check_with_one_gather_per_site(glued):
    per_layer, plain = glued
    rep = per_layer.report
    assert all(c["passed"] for c in rep["checks"]), rep["checks"]
    assert {c["name"] for c in rep["checks"]} >= {"onnx_nm", "hf_nm", "onnxruntime_vs_torch"}
    sites = [g for g in rep["groups"] if g["kind"] == "residual-site"]
    assert sites and all(g["strategy"] == "hungarian" for g in sites)
    assert rep["glue_ops"] == len(sites) == 4 and plain.report["glue_ops"] == 0
    assert rep["config"]["residual"] == "per-layer"
    cost = rep["glue_cost"]
    assert cost["ops"] == 4 and cost["elements_per_token"] == 4 * 64 and 0 < cost["ratio"] < 0.1
    assert plain.report["glue_cost"]["ops"] == 0 and plain.report["glue_cost"]["elements_per_token"] == 0
    assert _gathers(per_layer.out_dir / "model.onnx") == _gathers(plain.out_dir / "model.onnx") + rep["glue_ops"]
    # per-site permutations keep more importance than the one model-wide permutation
    kept = lambda r: sum(g["kept_chosen"] for g in r["groups"] if g["kind"].startswith("residual"))  # noqa: E731
    kept_id = lambda r: sum(g["kept_identity"] for g in r["groups"] if g["kind"].startswith("residual"))  # noqa: E731
    assert kept(rep) - kept_id(rep) > 0


def test_hf_checkpoint_is_plain_and_nm_only_in_glue_order(glued):
    from safetensors.torch import load_file

    per_layer, _ = glued
    rep = per_layer.report
    tensors = load_file(str(per_layer.out_dir / "hf" / "model.safetensors"))
    rec = rep["glue"][0]
    w = tensors[rec["param"]]
    as_saved = w.reshape(w.shape[0], -1, 4).ne(0).sum(-1).max()
    in_glue_order = w.index_select(1, torch.tensor(rec["index"])).reshape(w.shape[0], -1, 4).ne(0).sum(-1).max()
    assert int(in_glue_order) <= 2 and int(as_saved) > 2, "hf/ is saved in the model's own order"


def test_verify_catches_a_wrong_glue_index(glued, tmp_path):
    import shutil

    per_layer, _ = glued
    copy = tmp_path / "out"
    shutil.copytree(per_layer.out_dir, copy)
    report = json.loads((copy / "report.json").read_text())
    report["glue"][0]["index"] = list(range(len(report["glue"][0]["index"])))
    (copy / "report.json").write_text(json.dumps(report))
    checks = {c.name: c for c in verify_artifacts(copy)}
    assert not checks["hf_nm"].passed and report["glue"][0]["param"] in checks["hf_nm"].detail


@pytest.mark.slow  # a full optimize with the learned loop (~40 s); test_learned.py runs it per-layer by default
def test_learned_per_layer_runs_and_keeps_its_checks(tiny_dir, tmp_path):
    from permcompile.pipeline import optimize

    res = optimize(str(tiny_dir("llama")), tmp_path / "out",
                   OptimizeConfig(permutation="search", residual="per-layer", calib_samples=4, calib_seq_len=32),
                   quiet=True, checkpoint_dir=str(tmp_path / "ckpt"))
    assert all(c["passed"] for c in res.report["checks"])
    sites = [g for g in res.report["groups"] if g["kind"] == "residual-site"]
    assert sites and all(g["strategy"] == "search" for g in sites)


def test_bad_residual_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="residual"):
        OptimizeConfig(residual="bogus")


@pytest.mark.parametrize("arch", ["bert", pytest.param("gpt2", marks=pytest.mark.slow)])  # each a full CLI run
def test_cli_per_layer_then_verify(tiny_dir, tmp_path, arch):
    from test_cli import CALIB, describe, invoke

    out = tmp_path / "out"
    result = invoke(["optimize", tiny_dir(arch), "--out", out, "--quiet", *CALIB, "--residual", "per-layer"])
    assert result.exit_code == 0, describe(result)
    report = json.loads((out / "report.json").read_text())
    assert report["glue_ops"] == 2 * 2 and f"glue ops: {report['glue_ops']}" in result.stdout
    checked = invoke(["verify", out])
    assert checked.exit_code == 0, describe(checked)


def test_per_layer_never_binds_weights_into_a_graph_traced_before_the_gathers(glued):
    res, _ = glued  # optimized with prefetch_export=True
    assert res.report["onnx"]["prefetched"] is False
    assert all(c["passed"] for c in res.report["checks"])
    assert _gathers(res.out_dir / "model.onnx") >= res.report["glue_ops"] == 4


def test_inspect_shows_the_reading_sites(tiny_dir):
    from test_cli import describe, invoke

    result = invoke(["inspect", tiny_dir("llama"), "--residual", "per-layer"])
    assert result.exit_code == 0, describe(result)
    assert result.stdout.count("residual-site") == 4 and "residual@model.layers.1.mlp" in result.stdout
    bad = invoke(["inspect", tiny_dir("llama"), "--residual", "bogus"])
    assert bad.exit_code == 2 and "--residual" in bad.stderr


def test_per_layer_without_any_site_warns(monkeypatch):
    """A model whose residual stream is not a permutable group gets a warning, not a silent no-op."""
    import permcompile.passes.glue as glue_mod
    from permcompile.config import OptimizeConfig
    from permcompile.models import load_model
    from permcompile.pipeline import compress_
    from permcompile.testing.zoo import build_tiny

    monkeypatch.setattr(glue_mod, "split_residual", lambda groups, model, pruned: [
        g for g in groups if g.kind != "residual"])
    loaded = load_model(build_tiny("llama"))
    with pytest.warns(UserWarning, match="no permutable residual-stream group"):
        compress_(loaded, OptimizeConfig(residual="per-layer", calib_samples=2, calib_seq_len=16))
