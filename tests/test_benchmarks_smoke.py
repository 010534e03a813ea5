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
    assert out["git"]["commit"] and "Commit `" in (tmp_path / "sparse_speed_dryrun_t.md").read_text()


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


def _austen_stand_in(folder: Path) -> Path:
    """A data folder with the file names the quality scripts read, filled with varied made-up prose."""
    import random

    rng = random.Random(0)
    words = ("the house was quiet and she walked to the window where the letter lay unopened while her "
             "sister spoke of the ball and the weather and of captain wentworth who had not called").split()
    folder.mkdir()
    for name in ("northanger_abbey.txt", "mansfield_park.txt", "sense_and_sensibility.txt", "persuasion.txt"):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(300)]
        (folder / name).write_text(" ".join(sentences), encoding="utf-8")
    return folder


def _run_script(args: list[str]) -> str:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_benchmarks_parse_search_settings_like_the_cli():
    """The quality scripts take ``--search KEY=VALUE`` through ``config.parse_search`` (the CLI's parser), in
    command-line order."""
    import argparse

    mod = _load("quality_encoder")
    ap = argparse.ArgumentParser()
    mod.add_search_arguments(ap)
    args = ap.parse_args(["--search", "steps=3", "--search", "objective=diagonal", "--search", "sequential=true",
                          "--search", "swap_trials=5", "--search", "swap_trials=9"])
    knobs = mod.search_config(args)
    assert (knobs.steps, knobs.objective, knobs.sequential, knobs.swap_trials) == (3, "diagonal", True, 9)
    assert mod.search_config(ap.parse_args([])) == mod.search_config(argparse.Namespace())
    with pytest.raises(SystemExit, match="swap_trials"):
        mod.search_config(ap.parse_args(["--search", "bogus=1"]))
    with pytest.raises(SystemExit):  # the per-knob flags are gone
        ap.parse_args(["--swap-trials", "5"])


def test_quality_lm_on_a_tiny_model_writes_its_table(tmp_path, tiny_dir):
    """quality_lm.py end to end on a tiny causal LM: every requested row, R, per-method peak memory, the
    learned settings and the command, written to --out-dir (not into benchmarks/results)."""
    data = _austen_stand_in(tmp_path / "data")
    out = tmp_path / "out"
    _run_script([str(BENCH / "quality_lm.py"), "--model", str(tiny_dir("llama")), "--data-dir", str(data),
                 "--calib-seeds", "0", "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "300",
                 "--context", "64", "--methods", "none", "hungarian", "search", "free", "--search", "swap_trials=50",
                 "--search", "residual_trials=50", "--out-dir", str(out), "--tag", "_smoke"])
    stem = f"quality_{tiny_dir('llama').name}_2of4_wanda_smoke"
    result = json.loads((out / f"{stem}.json").read_text())
    assert {r["method"] for r in result["rows"]} == {"dense", "unstructured", "none", "hungarian", "search", "free"}
    free = next(r for r in result["rows"] if r["method"] == "free")
    assert free["glue_ops"] == 7 * 2  # the oracle: one gather per pruned linear (7 per block, 2 blocks)
    for kind, d in free["dropped_energy"].items():  # Wanda: unstructured per row drops the least energy of any 50% mask
        assert d["unstructured"] <= d["free"] + 1e-9 and 0 < d["identity"] < 1, kind
    for r in result["rows"]:
        if r["method"] in ("none", "hungarian", "search", "free"):
            assert r["peak_rss_mb"] > 50 and r["ppl"] > 1 and "R" in r or r["method"] == "none"
    assert result["search"]["residual_trials"] == 50 and result["search"]["swap_trials"] == 50
    assert "search (calibration seeds 0): block_size=" in (out / f"{stem}.md").read_text()
    assert "free (an oracle" in (out / f"{stem}.md").read_text()
    assert "| down_proj |" in (out / f"{stem}.md").read_text()
    table = (out / f"{stem}.md").read_text()
    assert "| peak memory (MiB) |" in table and "Command: `python benchmarks/quality_lm.py" in table
    row = next(line for line in table.splitlines() if line.startswith("| search |"))
    assert row.count("|") == table.splitlines()[2].count("|")  # as many cells as the header


def test_quality_vision_digits_small_run(tmp_path):
    """quality_vision.py --part digits with a small training budget: rows, R and the peak-memory column."""
    pytest.importorskip("sklearn", reason="the digits benchmark needs scikit-learn (not a dev dependency)")
    out = tmp_path / "out"
    _run_script([str(BENCH / "quality_vision.py"), "--part", "digits", "--calib-seeds", "0", "--digits-epochs", "1",
                 "--methods", "none", "hungarian", "search", "--search", "swap_trials=50", "--out-dir", str(out),
                 "--tag", "_smoke"])
    result = json.loads((out / "quality_vit-digits_2of4_wanda_smoke.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert {"dense", "unstructured", "none", "hungarian", "search"} <= methods
    assert all(r["peak_rss_mb"] > 50 for r in result["rows"] if r["method"] in ("hungarian", "search"))
    table = (out / "quality_vit-digits_2of4_wanda_smoke.md").read_text()
    assert result["search"]["swap_trials"] == 50 and "swap_trials=50" in table
    table = (out / "quality_vit-digits_2of4_wanda_smoke.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert "peak memory (MiB)" in header
    row = next(line for line in table.splitlines() if line.startswith("| search |"))
    assert row.count("|") == header.count("|")


@pytest.mark.slow  # ~25 s; quality_lm's smoke run covers the shared helpers by default
def test_quality_encoder_on_a_tiny_model_folder(tmp_path, tiny_dir):
    """quality_encoder.py on a tiny BERT folder (a path, not a registry name): the results are named after the
    folder, every row is written and the table carries the peak-memory column and the learned settings."""
    data = _austen_stand_in(tmp_path / "data")
    out = tmp_path / "out"
    _run_script([str(BENCH / "quality_encoder.py"), "--model", str(tiny_dir("bert")), "--data-dir", str(data),
                 "--calib-seeds", "0", "--calib-samples", "8", "--eval-sentences", "40",
                 "--methods", "none", "hungarian", "search", "--search", "swap_trials=50", "--out-dir", str(out),
                 "--tag", "_smoke"])
    stem = f"quality_{tiny_dir('bert').name}_2of4_wanda_smoke"
    result = json.loads((out / f"{stem}.json").read_text())
    assert {r["method"] for r in result["rows"]} == {"dense", "unstructured", "none", "hungarian", "search"}
    table = (out / f"{stem}.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    row = next(line for line in table.splitlines() if line.startswith("| search |"))
    assert "peak memory (MiB)" in header and row.count("|") == header.count("|")
    assert "swap_trials=50" in table


@pytest.mark.slow  # ~20 s
def test_search_convergence_on_a_tiny_model(tmp_path, tiny_dir):
    """search_convergence.py on a tiny causal LM: every search lies between unstructured and the original order
    (Wanda: unstructured per row drops the least energy of any 50% mask), the table and the command are written."""
    data = _austen_stand_in(tmp_path / "data")
    out = tmp_path / "out"
    _run_script([str(BENCH / "search_convergence.py"), "--model", str(tiny_dir("llama")), "--data-dir", str(data),
                 "--linears", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj",
                 "--calib-samples", "4", "--calib-seq-len", "32", "--trials", "50", "200", "--out-dir", str(out)])
    stem = f"search_convergence_{tiny_dir('llama').name}_2of4_wanda"
    result = json.loads((out / f"{stem}.json").read_text())
    assert set(result["results"]) == {"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"}
    for r in result["results"].values():
        assert r["unstructured"] < r["original"]
        for s in r["searches"].values():
            assert r["unstructured"] - 1e-9 <= s["dropped"] <= r["original"] + 1e-9
        ex = r["searches"]
        assert ex["+30k exchanges"]["dropped"] <= ex["+1k exchanges"]["dropped"] <= ex["hungarian"]["dropped"] + 1e-12
    table = (out / f"{stem}.md").read_text()
    assert "| model.layers.0.mlp.up_proj |" in table and "Command: `python benchmarks/search_convergence.py" in table


def test_free_permutation_masks_prune_every_linear_to_n_m_in_its_own_order(tmp_path, tiny_dir):
    """The ceiling oracle really prunes: every pruned linear keeps exactly n of m per row (so some column order
    makes it N:M), and the energy its zeros drop is the ``free`` share it reports."""
    from permcompile.config import OptimizeConfig, Sparsity
    from permcompile.math.nm import is_nm

    enc = _load("quality_encoder")
    data = _austen_stand_in(tmp_path / "data")
    base = OptimizeConfig(calib=str(data), calib_samples=4, calib_seq_len=32)
    loaded, _, stats, _ = enc.text_calibration(str(tiny_dir("llama")), base)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    secs, glue, dropped, perms = enc.free_permutation_masks_(loaded, stats, Sparsity(2, 4), "wanda", trials=50)
    assert glue == 14 and secs > 0 and len(perms) == 14
    dropped_now, total = {}, {}
    for name, p in loaded.model.named_parameters():
        if p.dim() != 2 or "proj" not in name:
            continue
        w0 = before[name]
        zero = p.detach() == 0
        assert torch.equal(zero.sum(dim=1), torch.full((p.shape[0],), p.shape[1] // 2)), name
        assert is_nm(p.detach()[:, perms[name.rsplit(".", 1)[0]]], 2, 4), name  # N:M in its reported order
        assert torch.equal(p.detach()[~zero], w0[~zero])  # kept weights unchanged
        kind = name.split(".")[-2]
        e = w0.float().square() * stats[name.rsplit(".", 1)[0]].mean_sq
        dropped_now[kind] = dropped_now.get(kind, 0.0) + float(e[zero].sum())
        total[kind] = total.get(kind, 0.0) + float(e.sum())
    assert set(dropped_now) == set(dropped)
    for kind in dropped:
        assert abs(dropped_now[kind] / total[kind] - dropped[kind]["free"]) < 1e-5, kind


def _quality_json(folder: Path, stem: str, rows: list[dict], learn: dict | None) -> None:
    data = {"rows": rows, "summary": {}, "command": "python benchmarks/quality_lm.py --synthetic"}
    if learn is not None:
        data["learn"] = learn
    (folder / f"{stem}.json").write_text(json.dumps(data))


def test_results_overview_from_synthetic_tables(tmp_path, monkeypatch):
    import dataclasses

    from permcompile.config import SearchConfig

    mod = _load("make_results")
    today = dataclasses.asdict(SearchConfig())
    old = dict(today, steps=30, swap_trials=0)

    def rows(method, rs):
        return [{"method": method, "calib_seed": i, "ppl": 100.0, "R": r} for i, r in enumerate(rs)]

    # three seeds of hungarian in one table, two in another: the overview takes the three-seed one
    _quality_json(tmp_path, "quality_toy_2of4_wanda", rows("none", [0, 0, 0]) + rows("hungarian", [0.2, 0.4, 0.6]),
                  None)
    _quality_json(tmp_path, "quality_toy_2of4_wanda_two", rows("hungarian", [0.9, 0.9]), None)
    # learned with older settings is left out; learned with today's defaults is used
    # (more seeds than today's: it would win if it were not filtered out)
    _quality_json(tmp_path, "quality_toy_2of4_wanda_old", rows("learned", [0.99, 0.99, 0.99]), old)
    _quality_json(tmp_path, "quality_toy_2of4_wanda_today", rows("learned", [0.1, 0.3]), today)
    # a per-layer table from before the residual refinement existed, objective spelled out: today's defaults for
    # learned/per-layer (no global residual group to refine; "auto" is "diagonal" for a causal LM), not for learned
    older = {k: v for k, v in today.items() if k not in ("residual_trials", "amp")}
    older["objective"] = "diagonal"
    _quality_json(tmp_path, "quality_toy_2of4_wanda_pl", rows("learned/per-layer", [0.5, 0.7]) +
                  rows("learned", [0.9, 0.9, 0.9]), older)
    # an encoder-style table (its own primary R), a smoke table (skipped) and a broken file (skipped)
    _quality_json(tmp_path, "quality_enc_4of8_ria", [{"method": "greedy", "calib_seed": 0, "R_mean_cosine": 0.5}],
                  None)
    _quality_json(tmp_path, "quality_toy_2of4_ria_smoke", rows("hungarian", [0.7]), None)
    (tmp_path / "quality_toy_4of8_wanda.json").write_text("{not json")
    # a newer one-seed learned table with today's defaults: learned cells take the newest table (the learned pass
    # changes between sessions); heuristics keep the table with the most seeds ("_two" is newer but has 2)
    _quality_json(tmp_path, "quality_toy_2of4_wanda_zlatest", rows("learned", [0.05]), today)
    # names: these tables record no commit, so they predate the rename (learned = the exchange search, today
    # `search`; e2e = the end-to-end method, today `learned`); a table from code with today's names keeps them
    _quality_json(tmp_path, "quality_toy_2of4_wanda_e2e", rows("e2e", [0.3, 0.5]), None)
    (tmp_path / "quality_enc_2of4_wanda_new.json").write_text(json.dumps(
        {"rows": [{"method": "learned", "calib_seed": 0, "R_mean_cosine": 0.7}], "commit": "NEW", "command": "x"}))
    monkeypatch.setattr(mod, "_has_rename", lambda data, cwd: data.get("commit") == "NEW")
    order = ["quality_toy_2of4_wanda", "quality_toy_2of4_wanda_old", "quality_toy_2of4_wanda_today",
             "quality_toy_2of4_wanda_pl", "quality_toy_2of4_wanda_two", "quality_toy_2of4_wanda_zlatest",
             "quality_toy_2of4_wanda_e2e"]
    monkeypatch.setattr(mod, "_recorded_at", lambda path: float(order.index(path.stem)) if path.stem in order
                        else 0.0)
    text = mod.overview(tmp_path)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| toy") or
             line.startswith("| enc")}
    assert set(lines) == {"| toy (perplexity)", "| enc (mean cosine)"}  # smoke and broken files are not rows
    enc_rows = [line for line in text.splitlines() if line.startswith("| enc (mean cosine)")]
    assert any("0.700 ± 0.000 (1)" in line and "| 2:4 |" in line for line in enc_rows)  # today's `learned`
    toy = lines["| toy (perplexity)"]
    cells = [c.strip() for c in toy.split("|")[1:-1]]
    header = [c.strip() for c in text.splitlines()[2].split("|")[1:-1]]
    got = dict(zip(header, cells))
    assert got["hungarian"] == "0.400 ± 0.200 (3)"
    assert got["search"] == "0.050 ± 0.000 (1)"
    assert got["learned"] == "0.400 ± 0.141 (2)"  # the old table's e2e rows
    assert got["greedy"] == "—" and got["N:M"] == "2:4" and got["criterion"] == "wanda"
    assert got["search/per-layer"] == "0.600 ± 0.141 (2)"
    assert "toy_2of4_wanda_zlatest" in got["from"] and "_old" not in got["from"] and "_two" not in got["from"]
    assert "0.500 ± 0.000 (1)" in lines["| enc (mean cosine)"]
    assert mod.overview(tmp_path / "nothing") == ""
    # docs/FINDINGS.md's copy sits between markers and is replaced whole; without markers nothing is written
    findings = tmp_path / "FINDINGS.md"
    findings.write_text(f"intro\n{mod.BEGIN}\nstale table\n{mod.END}\nafter\n")
    assert mod.update_findings(text, findings)
    new = findings.read_text()
    assert "stale table" not in new and "0.400 ± 0.200 (3)" in new and new.endswith(f"{mod.END}\nafter\n")
    assert new.count("### Overview") == 1 and new.startswith(f"intro\n{mod.BEGIN}\n### Overview")
    findings.write_text("no markers\n")
    assert not mod.update_findings(text, findings) and findings.read_text() == "no markers\n"
    assert not mod.update_findings(text, tmp_path / "missing.md")


def test_findings_holds_the_overview_markers():
    """make_results.py writes its overview into docs/FINDINGS.md; the README stays short (issue 20)."""
    mod = _load("make_results")
    text = mod.FINDINGS.read_text()
    assert 0 <= text.find(mod.BEGIN) < text.find(mod.END)


def test_benchmark_scripts_reject_bad_methods_in_one_line(capsys):
    mod = _load("quality_encoder")
    from permcompile.errors import UsageError

    mod.check_methods(["none", "learned/per-layer"])
    mod.check_methods(["free"], extra=("free",))
    with pytest.raises(UsageError, match="unknown method.*bogus"):
        mod.check_methods(["none", "bogus"])

    def bad_main():
        raise UsageError("model path nosuch does not exist")

    with pytest.raises(SystemExit) as exc:
        mod.run_main(bad_main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: model path nosuch does not exist\n"


def test_results_index_by_question_and_archive(tmp_path):
    """RESULTS.md opens with an index by question; every table is listed, results/archive/ is not read."""
    mod = _load("make_results")
    for stem in ("quality_smollm2_2of4_wanda", "quality_minilm_2of4_wanda_taskloss", "sparse_speed",
                 "pipeline_cost_x", "brand_new_table", "quality_smollm2_2of4_wanda_smoke"):
        (tmp_path / f"{stem}.md").write_text("| a |\n")
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "quality_old_2of4_wanda.md").write_text("| old |\n")
    stems = [md.stem for md in mod._section_files(tmp_path)]
    assert "quality_old_2of4_wanda" not in stems and "quality_smollm2_2of4_wanda_smoke" not in stems
    index = mod.index_by_question(stems)
    lines = index.splitlines()
    assert lines[0] == "## Index by question"
    by_question = {line.split("**")[1]: line for line in lines if "**" in line}
    assert "(#quality_smollm2_2of4_wanda)" in by_question["SmolLM2-135M (perplexity, KL to dense)"]
    assert "(#quality_minilm_2of4_wanda_taskloss)" in next(v for k, v in by_question.items()
                                                             if k.startswith("Which learned-strategy"))
    assert "(#sparse_speed)" in by_question["How fast is 2:4 on a GPU (sparse kernels vs dense)?"]
    assert "(#brand_new_table)" in by_question["Other tables"]  # a table no question names is still listed
    assert "#overview-gap-recovered-r-per-model" in lines[2]
    assert mod._anchor(mod.OVERVIEW_TITLE) == "overview-gap-recovered-r-per-model-pattern-and-criterion-mean--sd-" \
                                               "over-calibration-seeds-n"


def test_results_record_the_commit_and_the_command(tmp_path, capsys):
    """Every writer stores provenance (issue 20): quality_encoder.write_results serves the quality scripts."""
    mod = _load("quality_encoder")
    mod.write_results("t", {"command": "python benchmarks/quality_encoder.py --methods none"}, ["| t |"], tmp_path)
    data = json.loads((tmp_path / "t.json").read_text())
    assert len(data["git"]["commit"]) == 40 and isinstance(data["git"]["modified"], list)
    md = (tmp_path / "t.md").read_text()
    assert f"Commit `{data['git']['commit'][:12]}`" in md
    assert md.rstrip().endswith("Command: `python benchmarks/quality_encoder.py --methods none`")


def test_result_writer_refuses_a_result_without_commit_or_command(tmp_path):
    """benchmarks/provenance.write_result is the one writer of result files: no commit ("" or "unknown") or no
    command, no file."""
    mod = _load("provenance")
    good = {"command": "python benchmarks/x.py", "git": {"commit": "abc123", "modified": []}}
    assert json.loads(mod.write_result(tmp_path / "a.json", good).read_text()) == good
    assert mod.write_result(tmp_path / "a.md", "table\n", {"command": "c", "commit": "abc"}).read_text() == "table\n"
    for bad, why in [({"command": "c", "git": {"commit": ""}}, "no commit"),
                     ({"command": "c", "git": {"commit": "unknown"}}, "no commit"),
                     ({"command": "c"}, "no commit"), ({"command": " ", "commit": "abc"}, "no command"),
                     ({"git": {"commit": "abc"}}, "no command")]:
        with pytest.raises(mod.MissingProvenance, match=why):
            mod.write_result(tmp_path / "b.json", bad)
        with pytest.raises(mod.MissingProvenance, match=why):
            mod.write_result(tmp_path / "b.md", "table\n", bad)
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b.md").exists()


def test_every_tracked_benchmark_writes_results_through_write_result():
    """No script writes a JSON result itself (the path that let results go out without a commit)."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "benchmarks/*.py"], cwd=BENCH.parent, capture_output=True,
                             text=True).stdout.split()
    offenders = [f"{name}:{i}" for name in tracked if not name.endswith("provenance.py")
                 for i, line in enumerate((BENCH.parent / name).read_text().splitlines(), 1)
                 if "write_text(json.dumps" in line]
    assert not offenders, offenders


@pytest.mark.parametrize("peer", [False, True], ids=["no-llmcompressor", "peer-rows"])
def test_quality_quant_peer_rows_skip_line_and_ratios(tmp_path, monkeypatch, capsys, peer):
    """quality_quant --peer-python: one skip line when that Python cannot import llmcompressor (no peer row);
    otherwise each quantized row's ratio to the llm-compressor row of its precision. optimize, evaluate and the
    peer worker are replaced by stand-ins: no model runs, no peer venv is needed."""
    import sys

    mod = _load("quality_quant")
    import peer_llmcompressor  # benchmarks/ is on sys.path once a benchmark script is loaded

    import permcompile.evaluate
    import permcompile.pipeline

    class Result:
        report = {"checks": [{"passed": True}]}

    ours = {"24_0": 10.0, "24_fp8_0": 10.5, "24_int8_0": 11.0}
    monkeypatch.setattr(permcompile.pipeline, "optimize", lambda model, out, cfg, quiet: Result())
    monkeypatch.setattr(permcompile.evaluate, "evaluate", lambda out, data, **kw: {
        "metric": "perplexity", "ppl": ours[Path(out).name], "tokens": 7, "seconds": 0.1})
    peer_ppl = {"llmc sparsegpt+fp8": 12.0, "llmc sparsegpt+w8a8": 13.0}

    def fake_peer_rows(args, names, seed, work):
        assert peer, "peer rows asked for although llmcompressor is missing"
        return [{"row": n, "seed": seed, "a:ppl": peer_ppl[n], "a:tokens": 7, "nm_share": 1.0,
                 "input_quant_logit_change": 0.01, "static_input_scales": 3} for n in names]

    monkeypatch.setattr(mod, "peer_rows", fake_peer_rows)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    if peer:
        monkeypatch.setattr(peer_llmcompressor, "_peer_available", lambda python: None)
    monkeypatch.setattr(sys, "argv", ["quality_quant.py", "--model", "m", "--seeds", "0", "--rows", "2:4",
                                      "2:4+fp8", "2:4+int8", "--data", "a.txt",
                                      "--peer-python", str(tmp_path / "no-python")])
    mod.main()
    skip_lines = [line for line in capsys.readouterr().err.splitlines() if "llm-compressor rows skipped" in line]
    rows = {r["row"]: r for r in json.loads((tmp_path / "quality_quant_m.json").read_text())["rows"]}
    md = (tmp_path / "quality_quant_m.md").read_text()
    assert rows["2:4+fp8"]["a:ppl / 2:4"] == pytest.approx(1.05) and "| 2:4+fp8 | ort |" in md
    if not peer:
        assert skip_lines == [f"llm-compressor rows skipped: {tmp_path / 'no-python'} does not exist"]
        assert not any(name.startswith("llmc") for name in rows) and "llmc sparsegpt" not in md
        return
    assert not skip_lines
    assert rows["2:4+fp8"]["a:ppl / llmc"] == pytest.approx(10.5 / 12.0)
    assert rows["2:4+int8"]["a:ppl / llmc"] == pytest.approx(11.0 / 13.0)
    assert "a:ppl / llmc" not in rows["2:4"]
    assert "| llmc sparsegpt+fp8 | torch | 12 ± 0 |" in md and "2:4 share 1.0000" in md


@pytest.mark.slow  # ~15-30 s (two pipeline builds); the diagonal's own test below runs by default
def test_quant_ablation_on_a_tiny_model(tmp_path, tiny_dir):
    """quant_ablation.py on a tiny causal LM: a row per requested quantizer kind and alpha for the build and its
    random-permutation control, each with its ratio to the same build's 2:4, and the table with the command."""
    data = _austen_stand_in(tmp_path / "data")
    out = tmp_path / "out"
    _load("quant_ablation").main(
        ["--model", str(tiny_dir("llama")), "--seeds", "0", "--control", "--data", str(data / "persuasion.txt"),
         "--max-tokens", "200", "--context", "64", "--calib-samples", "4", "--calib-seq-len", "32",
         "--formats", "int8", "--kinds", "down", "all", "--alphas", "none", "0.7", "--out-dir", str(out)])
    stem = f"quant_ablation_{tiny_dir('llama').name}"
    result = json.loads((out / f"{stem}.json").read_text())
    labels = ["2:4", "int8 inputs: down", "int8 inputs: all", "int8 down, alpha none", "int8 down, alpha 0.7"]
    for perm in ("hungarian", "random"):
        rows = [r for r in result["rows"] if r["permutation"] == perm]
        assert [r["row"] for r in rows] == labels
        assert all(r["persuasion"] > 1 for r in rows)
        assert all(r["persuasion / 2:4"] == r["persuasion"] / rows[0]["persuasion"] for r in rows[1:])
    table = (out / f"{stem}.md").read_text()
    assert "| random | int8 down, alpha 0.7 |" in table and "Command: `python benchmarks/quant_ablation.py" in table


def test_quant_ablation_dense_rows(tmp_path, tiny_dir):
    """``--dense``: no 2:4 build; the base row is the unpruned model, then per format its inputs, its rounded weights
    and both, each with its ratio to the dense row; weights rounded to 8 bits score differently from float ones."""
    data = _austen_stand_in(tmp_path / "data")
    out = tmp_path / "out"
    _load("quant_ablation").main(
        ["--model", str(tiny_dir("llama")), "--seeds", "0", "--dense", "--tag", "dense",
         "--data", str(data / "persuasion.txt"), "--max-tokens", "200", "--context", "64", "--calib-samples", "4",
         "--calib-seq-len", "32", "--formats", "int8", "--kinds", "all", "--alphas", "--out-dir", str(out)])
    stem = f"quant_ablation_{tiny_dir('llama').name}_dense"
    rows = json.loads((out / f"{stem}.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["dense", "int8 inputs: all", "int8 weights", "int8 weights + inputs: all"]
    assert all(r["permutation"] == "dense" for r in rows)
    assert all(r["persuasion / dense"] == r["persuasion"] / rows[0]["persuasion"] for r in rows[1:])
    assert rows[2]["persuasion"] != rows[0]["persuasion"]
    assert "| dense | int8 weights + inputs: all |" in (out / f"{stem}.md").read_text()


def test_quant_ablation_rounded_weights_are_restored():
    """``rounded_weights``: inside, every named weight is on its INT8 per-row grid; on exit, exactly what it was."""
    from permcompile.math.quant import INT8, weight_scales
    from permcompile.testing.zoo import build_tiny

    mod = _load("quant_ablation")
    net = build_tiny("llama").eval()
    names = [n for n, _ in net.named_modules() if n.endswith("_proj")]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with mod.rounded_weights(net, names, INT8):
        for n in names:
            w = net.get_submodule(n).weight.float()
            codes = w / weight_scales(w, INT8).unsqueeze(1)
            assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_quant_ablation_diagonal_keeps_the_function_and_is_undone():
    """The post-hoc SmoothQuant diagonal: with the inputs left in float, the model computes what it computed up to
    INT8 weight rounding; on exit every weight is exactly what it was."""
    from permcompile.testing.zoo import build_tiny

    mod = _load("quant_ablation")
    net = build_tiny("llama").eval()
    downs = [n for n, _ in net.named_modules() if n.endswith("down_proj")]
    amax = {n: torch.rand(net.get_submodule(n).in_features) + 0.1 for n in downs}
    x = {"input_ids": torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        y = net(**x).logits
        with mod.smoothed_down(net, downs, amax, 0.7) as scales:
            assert set(scales) == set(downs) and all(s > 0 for s in scales.values())
            y_s = net(**x).logits
    assert float((y_s - y).norm() / y.norm()) < 0.02  # INT8 weight rounding only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
