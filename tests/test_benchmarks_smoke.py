"""Smoke tests of the benchmark scripts (fast, CPU): they run, and write what they promise."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sparse_speed_dry_run_writes_json(tmp_path, keep_threads, capsys):
    mod = _load("sparse_speed")
    assert mod.main(["--dry-run", "--out-dir", str(tmp_path), "--tag", "_t"]) == 0
    out = json.loads((tmp_path / "sparse_speed_dryrun_t.json").read_text())
    assert out["dry_run"] is True and out["skipped"] is False
    assert "NOT" in out["env"]["backend"]  # labelled as not a sparse kernel
    assert out["shapes"] and all("error" not in r for r in out["shapes"])
    assert all(r["eager"]["speedup"] > 0 and r["max_rel_err"] < 1e-2 for r in out["shapes"])
    # every real SmolLM2 / 7B shape fits a semi-structured backend's layout
    assert out["layout"] and all(r["cusparselt"] or r["cutlass"] for r in out["layout"])
    m = out["model_forward"]
    assert m["swapped"] and m["points"] and m["points"][0]["max_rel_logit_diff"] < 1e-4
    assert any("tied" in s["reason"] or "dense" in s["reason"] for s in m["kept_dense"])  # lm_head stays dense
    assert "DRY RUN" in (tmp_path / "sparse_speed_dryrun_t.md").read_text()


def test_prune_2of4_is_nm():
    mod = _load("sparse_speed")
    w = torch.randn(8, 16)
    p = mod.prune_2of4(w)
    assert mod.is_nm(p) and not mod.is_nm(w)
    groups_w, groups_p = w.reshape(8, 4, 4).abs(), p.reshape(8, 4, 4).abs()
    # the kept pair is the two largest magnitudes of each group
    assert torch.allclose(groups_p.sum(-1), groups_w.topk(2, dim=-1).values.sum(-1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip path")
def test_sparse_speed_skips_without_cuda(tmp_path, capsys):
    mod = _load("sparse_speed")
    assert mod.main(["--out-dir", str(tmp_path)]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out
    out = json.loads((tmp_path / "sparse_speed.json").read_text())
    assert out["skipped"] is True and "CUDA" in out["reason"]


def test_plot_results_on_synthetic_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mod = _load("plot_results")
    src = tmp_path / "in"
    src.mkdir()
    rows = [{"method": "dense", "calib_seed": None, "ppl": 26.0}]
    for seed in (0, 1):
        rows += [{"method": "unstructured", "calib_seed": seed, "ppl": 60.0 + seed},
                 {"method": "none", "calib_seed": seed, "ppl": 900.0 + 10 * seed, "R": 0.0},
                 {"method": "hungarian", "calib_seed": seed, "ppl": 400.0 - seed, "R": 0.6 + 0.01 * seed}]
    (src / "quality_lm_synth.json").write_text(json.dumps(
        {"model": "synth", "sparsity": "2:4", "criterion": "wanda", "dense_ppl": 26.0, "rows": rows,
         "summary": {}, "command": "python benchmarks/quality_lm.py --synthetic"}))
    # an encoder/vision colleague's variant: other metric keys
    (src / "quality_enc_synth.json").write_text(json.dumps(
        {"model": "enc", "rows": [{"method": m, "seed": s, "cosine": c + 0.01 * s, "top1": t}
                                  for m, c, t in (("none", 0.6, 0.5), ("hungarian", 0.8, 0.7)) for s in (0, 1)]}))
    # summary-only and metric/value variants
    (src / "quality_sum_synth.json").write_text(json.dumps(
        {"summary": {"none": {"cosine_mean": 0.6, "cosine_sd": 0.02, "n": 3}, "learned": {"cosine_mean": 0.85}}}))
    (src / "quality_mv_synth.json").write_text(json.dumps(
        {"rows": [{"method": "none", "metric": "top1", "value": 0.4}, {"method": "greedy", "metric": "top1",
                                                                      "value": 0.55}]}))
    (src / "quality_bad.json").write_text("{not json")
    (src / "quality_empty.json").write_text(json.dumps({"rows": [{"method": "x", "note": "no metric"}]}))
    out = tmp_path / "out"
    assert mod.main(["--results-dir", str(src), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    for stem in ("quality_lm_synth", "quality_enc_synth", "quality_sum_synth", "quality_mv_synth"):
        png = out / f"{stem}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
    assert "skipped quality_bad.json" in text and "skipped quality_empty.json" in text
    table, _ = mod.extract(json.loads((src / "quality_lm_synth.json").read_text()))
    assert list(table) == ["ppl", "R"]
    mean, sd, n = table["ppl"]["hungarian"]
    assert mean == pytest.approx(399.5) and sd == pytest.approx(0.5) and n == 2
