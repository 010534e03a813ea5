"""Export path: ONNX export (fp32 / fp16), N:M checks in the graph, ONNX Runtime vs torch, OUT-folder
verification with tamper detection, Triton repositories and the (absent) TensorRT backend."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from permcompile.errors import MissingDependencyError, PermcompileError, UsageError, VerificationError
from permcompile.export.digests import file_digests
from permcompile.export.onnx import OnnxExportError, convert_to_fp16, export_onnx, onnx_io_specs
from permcompile.export.onnx_graph import onnx_initializer_for_param
from permcompile.export.triton import parse_pbtxt, triton_dtype, validate_triton_config, write_triton_repo
from permcompile.export.verify import (
    Check,
    compare_ort_torch,
    format_checks,
    onnx_nm_report,
    raise_if_failed,
    verify_artifacts,
)
from permcompile.math.nm import nm_mask
from permcompile.testing.zoo import tiny_gpt2, tiny_llama

N, M = 2, 4


def _prune_decoder(model: nn.Module) -> dict[str, str]:
    """2:4 magnitude mask along K on every decoder linear (not the LM head); returns param -> module."""
    pruned = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = type(module).__name__
            if name.endswith("lm_head") or kind not in ("Linear", "Conv1D"):
                continue
            w = module.weight
            if kind == "Conv1D":  # [K, out]
                w.copy_(w * nm_mask(w.abs().t(), N, M).t())
            else:  # [out, K]
                w.copy_(w * nm_mask(w.abs(), N, M))
            pruned[f"{name}.weight"] = name
    return pruned


def _text_batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = tiny_llama()
    pruned = _prune_decoder(model)
    folder = tmp_path_factory.mktemp("llama")
    return model, pruned, export_onnx(model, _text_batch(2, 8), folder / "fp32.onnx", "fp32")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model = tiny_gpt2()
    pruned = _prune_decoder(model)
    info = export_onnx(model, _text_batch(2, 8), tmp_path_factory.mktemp("gpt2") / "model.onnx", "fp16")
    return model, pruned, info


# ------------------------------------------------------------------------------------------------ ONNX
def test_llama_export_names_and_nm(llama):
    model, pruned, info = llama
    assert info.opset >= 18 and info.input_names == ["input_ids", "attention_mask"]
    assert info.output_name == "logits" and info.outputs[0].dtype == "float32"
    assert info.inputs[0].shape == ("batch", "seq") and info.outputs[0].shape == ("batch", "seq", 128)
    assert not info.external_data and not (info.path.parent / "fp32.onnx.data").exists()
    # every pruned weight is an initializer named after its torch FQN, stored [K, N] for MatMul
    assert set(pruned) <= set(info.initializer_map)
    assert all(info.initializer_map[p] == p for p in pruned)
    rows = {r.name: r for r in onnx_nm_report(info.path, N, M)}
    proto = onnx.load(str(info.path))
    for param in pruned:
        row = rows[param]
        assert row.op == "MatMul" and row.k_axis == 0 and row.k == model.get_parameter(param).shape[1]
        assert row.is_nm and row.violations == 0 and row.density == pytest.approx(0.5)
        assert row.param == param
        assert onnx_initializer_for_param(proto, param) == param
    # the dense LM head (tied to the embedding) is found too and is not 2:4
    head = [r for r in rows.values() if r.param == "lm_head.weight"]
    assert len(head) == 1 and not head[0].is_nm and head[0].violations > 0


def test_tampered_initializer_is_detected(llama, tmp_path):
    _, pruned, info = llama
    proto = onnx.load(str(info.path))
    target = "model.layers.1.mlp.down_proj.weight"
    init = next(i for i in proto.graph.initializer if i.name == target)
    arr = numpy_helper.to_array(init).copy()  # [K, N]: K is axis 0
    col = arr[0:4, 5]
    zero = int(np.flatnonzero(col == 0)[0])
    arr[zero, 5] = 0.125  # that group of 4 along K now holds 3 nonzeros
    init.CopyFrom(numpy_helper.from_array(arr, target))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    rows = {r.name: r for r in onnx_nm_report(bad, N, M)}
    assert not rows[target].is_nm and rows[target].violations == 1
    assert all(rows[p].is_nm for p in pruned if p != target)


def test_ort_matches_torch_fp32_with_other_shapes(llama):
    model, _, info = llama
    # exported with batch 2 / seq 8: run other batch sizes and lengths through the dynamic axes
    result = compare_ort_torch(model, info.path, [_text_batch(1, 5, 1), _text_batch(3, 19, 2)], precision="fp32")
    assert result.passed, result.as_check().detail
    assert result.max_rel < 1e-4 and result.cosine > 0.999999


def test_convert_to_fp16_fallback(llama, tmp_path):
    model, pruned, info = llama
    proto = convert_to_fp16(onnx.load(str(info.path)))
    onnx.checker.check_model(proto)
    path = tmp_path / "converted.onnx"
    onnx.save(proto, str(path))
    assert all(r.is_nm for r in onnx_nm_report(path, N, M) if r.name in pruned)
    result = compare_ort_torch(model, path, [_text_batch(2, 9, 5)], precision="fp16")
    assert result.passed, result.as_check().detail


def test_gpt2_fp16_conv1d_gemm(gpt2):
    model, pruned, info = gpt2
    assert info.fp16_method == "half" and info.output_name == "logits" and info.outputs[0].dtype == "float16"
    proto = onnx.load(str(info.path))
    dtypes = {i.name: i.data_type for i in proto.graph.initializer}
    rows = {r.name: r for r in onnx_nm_report(proto, N, M)}
    for param in pruned:  # Conv1D -> Gemm(transB=0) on the [K, out] parameter itself, named after it
        name = info.initializer_map[param]
        assert name == param and dtypes[name] == onnx.TensorProto.FLOAT16
        row = rows[name]
        assert row.op == "Gemm" and row.k_axis == 0 and row.shape == tuple(model.get_parameter(param).shape)
        assert row.is_nm and row.dtype == "float16"
        assert onnx_initializer_for_param(proto, param) == name
    assert not rows[info.initializer_map["lm_head.weight"]].is_nm
    batches = [_text_batch(1, 5, 3), _text_batch(3, 11, 6)]  # exported with (2, 8)
    result = compare_ort_torch(model, info.path, batches, precision="fp16")
    assert result.passed and result.max_rel < 2e-2, result.as_check().detail
    strict = compare_ort_torch(model, info.path, batches[:1], precision="fp16", tol=1e-7)
    assert not strict.passed  # the tolerance is really applied


def test_mlp_gemm_transb_and_external_data(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        mlp[0].weight.mul_(nm_mask(mlp[0].weight.abs(), N, M))
    info = export_onnx(mlp, {"x": torch.randn(4, 16)}, tmp_path / "mlp.onnx", "fp32", external_data=True)
    assert info.external_data and (tmp_path / "mlp.onnx.data").exists()
    assert info.dynamic_axes == {"x": {0: "batch"}} and info.inputs[0].shape == ("batch", 16)
    rows = {r.name: r for r in onnx_nm_report(info.path, N, M)}
    first = rows[info.initializer_map["0.weight"]]
    assert first.op == "Gemm" and first.k_axis == 1 and first.k == 16 and first.is_nm  # [N, K], transB=1
    assert not rows[info.initializer_map["2.weight"]].is_nm
    result = compare_ort_torch(mlp, info.path, [{"x": torch.randn(7, 16)}], precision="fp32")
    assert result.passed, result.as_check().detail


def test_export_errors_are_one_line(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom\nsecond line")

    with pytest.raises(OnnxExportError) as err:
        export_onnx(Broken(), {"x": torch.randn(2, 4)}, tmp_path / "b.onnx")
    assert "boom" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, PermcompileError)
    with pytest.raises(UsageError):
        export_onnx(nn.Linear(4, 4), {"x": torch.randn(2, 4)}, tmp_path / "b.onnx", precision="fp8")


# ------------------------------------------------------------------------------------------------ OUT folder
def _write_out(out, model, pruned, onnx_path, info):
    out.mkdir()
    model.save_pretrained(out / "hf", safe_serialization=True)
    shutil.copyfile(onnx_path, out / "model.onnx")
    report = {
        "sparsity": f"{N}:{M}", "precision": info.precision, "family": "llama", "auto_class": "AutoModelForCausalLM",
        "input_names": info.input_names,
        "pruned_layers": [{"module": mod, "param": p, "onnx_initializer": info.initializer_map.get(p)}
                          for p, mod in pruned.items()],
    }
    report["files"] = file_digests(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def test_verify_artifacts_and_tampering(llama, tmp_path):
    model, pruned, info = llama
    out = tmp_path / "out"
    report = _write_out(out, model, pruned, info.path, info)
    checks = verify_artifacts(out)
    assert all(c.passed for c in checks), format_checks(checks)
    assert {c.name for c in checks} >= {"integrity", "onnx_nm", "hf_nm", "onnxruntime_vs_torch"}
    raise_if_failed(checks)

    # densify one group of a pruned weight in the ONNX graph
    proto = onnx.load(str(out / "model.onnx"))
    target = "model.layers.0.mlp.up_proj.weight"
    init = next(i for i in proto.graph.initializer if i.name == target)
    arr = numpy_helper.to_array(init).copy()
    arr[0:4, 0] = 0.5
    init.CopyFrom(numpy_helper.from_array(arr, target))
    onnx.save(proto, str(out / "model.onnx"))
    failed = {c.name for c in verify_artifacts(out) if not c.passed}
    assert failed == {"integrity", "onnx_nm", "onnxruntime_vs_torch"}, failed

    # ... even when the attacker also refreshes the digests, N:M and numerics still catch it
    report["files"] = file_digests(out)
    (out / "report.json").write_text(json.dumps(report))
    checks = verify_artifacts(out)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"onnx_nm", "onnxruntime_vs_torch"}, format_checks(checks)
    with pytest.raises(VerificationError) as err:
        raise_if_failed(checks)
    assert "onnx_nm" in str(err.value) and target in str(err.value) and "\n" not in str(err.value)


def test_verify_detects_dense_hf_weight_and_bad_folders(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    model, pruned, info = llama
    out = tmp_path / "out"
    report = _write_out(out, model, pruned, info.path, info)
    st = out / "hf" / "model.safetensors"
    state = load_file(str(st))
    target = "model.layers.1.self_attn.o_proj.weight"
    state[target][:, 0:4] = 0.25  # [out, K]: dense groups along K
    save_file(state, str(st), metadata={"format": "pt"})
    report["files"] = file_digests(out)
    (out / "report.json").write_text(json.dumps(report))
    checks = verify_artifacts(out)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"hf_nm", "onnxruntime_vs_torch"}, format_checks(checks)
    assert target in next(c.detail for c in checks if c.name == "hf_nm")

    # an extra, unrecorded file in hf/ is tampering too; no digests at all cannot be trusted
    (out / "hf" / "extra.safetensors").write_bytes(b"x")
    assert not next(c for c in verify_artifacts(out) if c.name == "integrity").passed
    del report["files"]
    (out / "report.json").write_text(json.dumps(report))
    assert not next(c for c in verify_artifacts(out) if c.name == "integrity").passed
    with pytest.raises(UsageError):
        verify_artifacts(tmp_path / "nowhere")


def test_format_and_raise():
    checks = [Check("a", True, "fine", 0.0), Check("b", False, "broken", 1.0)]
    table = format_checks(checks)
    assert "FAIL" in table and "1/2 checks passed" in table
    with pytest.raises(VerificationError, match="1 of 2 checks failed: b: broken"):
        raise_if_failed(checks)
    raise_if_failed(checks[:1])


# ------------------------------------------------------------------------------------------------ Triton
def test_triton_onnx_repo(gpt2, tmp_path):
    _, _, info = gpt2
    profiles = {"input_ids": ((1, 1), (1, 128), (8, 512)), "attention_mask": ((1, 1), (1, 128), (8, 512))}
    repo = write_triton_repo(tmp_path / "repo", "tiny_gpt2", onnx_path=info.path, precision="fp16",
                             profiles=profiles)
    assert repo.model_file == tmp_path / "repo" / "tiny_gpt2" / "1" / "model.onnx" and repo.model_file.exists()
    cfg = parse_pbtxt(repo.config_path.read_text())
    assert validate_triton_config(cfg) == []
    assert cfg["platform"] == ["onnxruntime_onnx"] and cfg["max_batch_size"] == [0]
    assert [i["name"][0] for i in cfg["input"]] == ["input_ids", "attention_mask"]
    assert cfg["input"][0]["data_type"] == ["TYPE_INT64"] and cfg["input"][0]["dims"] == [-1, -1]
    assert cfg["output"][0]["data_type"] == ["TYPE_FP16"] and cfg["output"][0]["dims"] == [-1, -1, 128]
    acc = cfg["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0]
    assert acc["name"] == ["tensorrt"]
    params = {p["key"][0]: p["value"][0] for p in acc["parameters"]}
    assert params["precision_mode"] == "FP16" and params["trt_sparsity_enable"] == "1"
    assert params["trt_profile_max_shapes"] == "input_ids:8x512,attention_mask:8x512"


def test_triton_plan_repo(tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"\x00fake")
    repo = write_triton_repo(tmp_path / "repo", "enc", plan_path=plan, max_batch_size=8,
                             inputs=[("input_ids", "int64", [-1, -1]), ("attention_mask", torch.int64, [-1, -1])],
                             outputs=[("last_hidden_state", np.float16, [-1, -1, 64])])
    cfg = parse_pbtxt(repo.config)
    assert validate_triton_config(cfg) == [] and (tmp_path / "repo" / "enc" / "1" / "model.plan").exists()
    assert cfg["platform"] == ["tensorrt_plan"] and cfg["max_batch_size"] == [8] and "optimization" not in cfg
    assert cfg["input"][1]["dims"] == [-1] and cfg["output"][0]["dims"] == [-1, 64]  # batch dim dropped
    assert triton_dtype("float32") == "TYPE_FP32" and triton_dtype(torch.bfloat16) == "TYPE_BF16"
    with pytest.raises(UsageError):
        write_triton_repo(tmp_path / "repo", "x", plan_path=plan)  # a plan needs explicit I/O
    with pytest.raises(UsageError):
        write_triton_repo(tmp_path / "repo", "bad/name", plan_path=plan, inputs=[], outputs=[])
    assert validate_triton_config("name: \"x\" platform: \"tensorrt_plan\" input [ { name: \"a\" ")  # malformed


def test_onnx_io_specs_after_fp16(gpt2):
    _, _, info = gpt2
    inputs, outputs = onnx_io_specs(info.path)
    assert [(s.name, s.dtype) for s in inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    assert outputs[0].dims() == [-1, -1, 128]


# ------------------------------------------------------------------------------------------------ TensorRT
def test_tensorrt_missing_is_explained(gpt2, tmp_path):
    from permcompile.export import tensorrt as pc_trt

    assert pc_trt.parse_sparse_layers([
        "[I] (Sparsity) Layers eligible for sparse math: node_linear, node_linear_1",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: node_linear_1",
    ]) == (["node_linear_1"], ["node_linear", "node_linear_1"])
    profiles = pc_trt.default_profiles(gpt2[2].path, max_batch=4, max_seq=256)
    assert profiles["input_ids"] == ((1, 1), (1, 128), (4, 256))
    if pc_trt.tensorrt_available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(MissingDependencyError) as err:
        pc_trt.build_engine(gpt2[2].path, tmp_path / "m.plan", "fp16")
    message = str(err.value)
    assert ("TensorRT is not installed" in message and "pip install tensorrt" in message) or "GPU" in message
    assert "\n" not in message and err.value.exit_code == 2


def test_export_onnx_public_names_stay_importable_after_the_split():
    """export/onnx.py runs the export; its concerns live in sibling modules, its public names stay here."""
    import permcompile.export.onnx as onnx_export
    from permcompile import errors
    from permcompile.export import onnx_fp16, onnx_graph, onnx_prefetch, onnx_trace, onnx_write

    for name in onnx_export.__all__:
        assert hasattr(onnx_export, name), name
    assert onnx_export.OnnxExportError is errors.OnnxExportError
    assert onnx_export.convert_to_fp16 is onnx_fp16.convert_to_fp16
    assert onnx_export.iter_weight_uses is onnx_graph.iter_weight_uses
    assert onnx_export.GraphPrefetch is onnx_prefetch.GraphPrefetch
    assert onnx_export.ExportWrapper is onnx_trace.ExportWrapper
    assert onnx_export.write_model_streaming is onnx_write.write_model_streaming
