"""Half-precision checkpoints keep their dtype: loaded as stored, checked in fp32, ``hf/`` written as they came.

A tiny random Llama saved in bf16 (and fp16) goes through the whole pipeline; the ONNX precision is resolved
from the checkpoint ("auto": fp16 for half checkpoints) and the Triton config never enables sparsity in FP32.
"""
from __future__ import annotations

import json

import pytest
import torch

from permcompile import OptimizeConfig, optimize
from permcompile.config import OptimizeConfig as Config
from permcompile.dtypes import fp32_compute, model_dtype
from permcompile.export.triton import parse_pbtxt, write_triton_repo
from permcompile.export.verify import raise_if_failed, verify_artifacts
from permcompile.models import load_model
from permcompile.testing.zoo import tiny_llama


@pytest.fixture(scope="module")
def half_dir(tmp_path_factory):
    """``half_dir(torch.bfloat16)``: a tiny Llama saved in that dtype (safetensors + config.json)."""
    cache = {}

    def make(dtype):
        if dtype not in cache:
            folder = tmp_path_factory.mktemp(f"llama_{str(dtype).replace('torch.', '')}")
            tiny_llama().to(dtype).save_pretrained(folder)
            cache[dtype] = folder
        return cache[dtype]

    return make


def _safetensors_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    return out


def _trt_params(config_text: str) -> dict[str, str]:
    cfg = parse_pbtxt(config_text)
    acc = cfg["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0]
    return {p["key"][0]: p["value"][0] for p in acc.get("parameters", [])}


def _config(**kw) -> OptimizeConfig:
    return OptimizeConfig(permutation="hungarian", calib_samples=2, calib_seq_len=16, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoint_loads_as_stored(half_dir, tiny_dir, dtype):
    assert model_dtype(load_model(str(half_dir(dtype))).model) == dtype
    assert model_dtype(load_model(str(tiny_dir("llama"))).model) == torch.float32


def test_fp32_compute_is_the_fp32_function_of_the_stored_weights(half_dir):
    import copy

    model = load_model(str(half_dir(torch.bfloat16))).model
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        upcast = copy.deepcopy(model).float()(input_ids=ids).logits
        with fp32_compute(model):
            ours = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    assert ours.dtype == torch.float32 and model_dtype(model) == torch.bfloat16
    torch.testing.assert_close(ours, upcast, rtol=1e-5, atol=1e-5)
    # and that is a real difference: bf16 arithmetic is ~1e-2 away, more than the fold check allows
    assert float((plain.float() - upcast).abs().max() / upcast.abs().max()) > 1e-3


def test_fp32_compute_slices_large_weights(half_dir, monkeypatch):
    """Large half weights are upcast a slice of rows at a time (an LM head would need a 1 GB fp32 copy):
    the same numbers as upcasting the whole weight."""
    import copy

    from permcompile import dtypes

    model = load_model(str(half_dir(torch.bfloat16))).model
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    real = dtypes._chunked_linear
    monkeypatch.setattr(dtypes, "_chunked_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dtypes, "CHUNK_ELEMENTS", 1000)  # every linear of the tiny model, in slices of 15 rows
    with torch.no_grad():
        upcast = copy.deepcopy(model).float()(input_ids=ids).logits
        with fp32_compute(model):
            ours = model(input_ids=ids).logits
    assert calls  # the sliced path ran
    torch.testing.assert_close(ours, upcast, rtol=1e-5, atol=1e-5)


def test_resolve_precision():
    assert Config().precision == "auto"
    assert Config().resolve_precision(torch.bfloat16) == "fp16"
    assert Config().resolve_precision("float16") == "fp16"
    assert Config().resolve_precision(torch.float32) == "fp32"
    assert Config(precision="fp32").resolve_precision(torch.bfloat16) == "fp32"


def test_bf16_checkpoint_compiles_in_its_dtype(bf16_llama_plan):
    import onnx

    result, plan, _ = bf16_llama_plan  # conftest: a bf16 tiny llama, hungarian, to a .plan (stand-in TensorRT)
    out = plan.with_suffix("")
    report = result.report
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert report["checkpoint_dtype"] == "bfloat16" and report["precision"] == "fp16"  # "auto" resolved
    assert report["fold"]["max_rel_err"] < 1e-4  # checked in fp32, not at bf16 rounding
    assert _safetensors_dtypes(out / "hf") == {"BF16"}
    assert json.loads((out / "hf" / "config.json").read_text()).get("dtype") == "bfloat16"
    proto = onnx.load(str(out / "model.onnx"))
    weights = {i.name: i.data_type for i in proto.graph.initializer if len(i.dims) == 2}
    assert weights and set(weights.values()) == {onnx.TensorProto.FLOAT16}
    params = _trt_params((out / "triton" / "model" / "config.pbtxt").read_text())
    assert params["precision_mode"] == "FP16" and params["trt_sparsity_enable"] == "1"
    assert report["triton"]["sparsity"] is True
    raise_if_failed(verify_artifacts(out))


@pytest.mark.slow  # a full optimize (~25 s); test_bf16_checkpoint_compiles_in_its_dtype covers bf16 by default
def test_bf16_checkpoint_with_fp32_onnx(half_dir, tmp_path):
    """An explicit fp32 export of a bf16 model: the graph is fp32, hf/ stays bf16, Triton leaves sparsity off."""
    import onnx

    out = tmp_path / "out"
    result = optimize(str(half_dir(torch.bfloat16)), out, _config(precision="fp32"), quiet=True,
                      prefetch_export=False)
    report = result.report
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert _safetensors_dtypes(out / "hf") == {"BF16"}
    proto = onnx.load(str(out / "model.onnx"))
    assert {i.data_type for i in proto.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT}
    text = (out / "triton" / "model" / "config.pbtxt").read_text()
    params = _trt_params(text)
    assert params["precision_mode"] == "FP32" and "trt_sparsity_enable" not in params
    assert "FP32" in report["triton"]["notes"][0] and report["triton"]["sparsity"] is False


@pytest.mark.slow  # a full optimize (~20 s); the bf16 case covers half precision by default
def test_fp16_checkpoint_compiles_in_its_dtype(half_dir, tmp_path):
    out = tmp_path / "out"
    result = optimize(str(half_dir(torch.float16)), out, _config(), quiet=True, prefetch_export=False)
    assert all(c["passed"] for c in result.report["checks"]), result.report["checks"]
    assert result.report["precision"] == "fp16" and _safetensors_dtypes(out / "hf") == {"F16"}


def test_triton_never_pairs_sparsity_with_fp32(tmp_path):
    from torch import nn

    from permcompile.export.onnx import export_onnx

    info = export_onnx(nn.Linear(16, 8), {"x": torch.randn(2, 16)}, tmp_path / "m.onnx", "fp32")
    fp32 = write_triton_repo(tmp_path / "a", "m", onnx_path=info.path, sparse=True, precision="fp32")
    assert "trt_sparsity_enable" not in _trt_params(fp32.config) and fp32.notes
    assert "# trt_sparsity_enable is off" in fp32.config  # the config says why
    fp16 = write_triton_repo(tmp_path / "b", "m", onnx_path=info.path, sparse=True, precision="fp16")
    assert _trt_params(fp16.config)["trt_sparsity_enable"] == "1" and not fp16.notes


# two exports of a half-precision model per case (30-45 s each): one case by default
@pytest.mark.parametrize("prefetch", [pytest.param(False, marks=pytest.mark.slow), True])
def test_consuming_export_writes_the_same_graph(half_dir, tmp_path, prefetch):
    """``export_onnx(consume=True)`` casts the bf16 model's own parameters (no copy) and writes the same
    weights as the copying export; without it the model is left as it was."""
    import onnx
    from onnx import numpy_helper

    from permcompile.export.onnx import GraphPrefetch, export_onnx

    loaded = load_model(str(half_dir(torch.bfloat16)))
    model, inputs = loaded.model, loaded.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for consume in (False, True):
        pre = GraphPrefetch(model, inputs, "fp16", workdir=tmp_path / f"trace{consume}") if prefetch else None
        try:
            export_onnx(model, inputs, tmp_path / f"{consume}.onnx", "fp16", prefetched=pre, consume=consume)
        finally:
            if pre is not None:
                pre.cancel()
        paths[consume] = tmp_path / f"{consume}.onnx"
        if not consume:  # the copying export leaves the model in bf16, untouched
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model_dtype(model) == torch.float16  # consumed: cast in place

    def weights(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    a, b = weights(paths[False]), weights(paths[True])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow  # two full optimize runs (~50 s)
def test_optimize_releases_the_model_it_loaded_but_not_one_passed_in(half_dir, tmp_path, monkeypatch):
    from permcompile import pipeline

    released = []
    real = pipeline._release_weights_
    monkeypatch.setattr(pipeline, "_release_weights_", lambda net: (released.append(net), real(net)))
    result = optimize(str(half_dir(torch.bfloat16)), tmp_path / "a", _config(), quiet=True, prefetch_export=False)
    assert all(c["passed"] for c in result.report["checks"])
    assert len(released) == 1 and all(p.is_meta for p in released[0].parameters())
    steps = result.report["peak_memory_gib"]
    assert set(steps) >= {"load", "calibrate", "export", "verify"} and all(v > 0 for v in steps.values())

    module = load_model(str(half_dir(torch.bfloat16))).model
    result = optimize(module, tmp_path / "b", _config(), quiet=True, prefetch_export=False)
    assert all(c["passed"] for c in result.report["checks"]) and len(released) == 1
    # a module passed in stays usable (load_model runs it in fp32): the export cast a copy, nothing was freed
    assert model_dtype(module) == torch.float32 and not any(p.is_meta for p in module.parameters())
