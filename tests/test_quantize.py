"""--quantize fp8|int8: the math against ONNX's Q/DQ semantics, the pass, the Q/DQ graph, verify and bad input."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from permcompile.config import OptimizeConfig
from permcompile.errors import UsageError
from permcompile.math.quant import FP8_E4M3, INT8, fake_quant, tensor_scale, to_codes, weight_scales
from permcompile.quantization import QUANT_MODES, QuantizeConfig


# --- math -----------------------------------------------------------------------------------------
def _ort_qdq(x: np.ndarray, scale: float, fmt) -> np.ndarray:
    """ONNX Runtime's DequantizeLinear(QuantizeLinear(x)) with a per-tensor scale: the semantics we copy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if fmt.is_float:
        zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], bytes(1), raw=True)
    else:
        zp = numpy_helper.from_array(np.zeros((), np.int8), "zp")
    s = numpy_helper.from_array(np.array(scale, np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], [s, zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", [INT8, FP8_E4M3], ids=["int8", "fp8"])
def test_fake_quant_matches_onnxruntime_qdq(fmt):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 3
    scale = 0.01 if not fmt.is_float else 0.004
    # ties (half steps), saturation far beyond the range both ways, zeros and tiny values
    x[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1e6, -1e6, 0.0]) * scale
    got = fake_quant(x, scale, fmt).numpy()
    want = _ort_qdq(x.numpy(), scale, fmt)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


def test_weight_scales_cover_rows_and_keep_zeros():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -254.0, 0.0, 3.0]])
    s = weight_scales(w, INT8)
    assert s[0] == 1.0 and s[1] == pytest.approx(2.0)  # a zero row gets a usable scale; max|w| maps to 127
    q = to_codes(w, s.reshape(-1, 1), INT8)
    assert q.dtype == torch.int8 and int(q[1, 1]) == -127 and (q[w == 0] == 0).all()
    s16 = weight_scales(torch.randn(64, 32), INT8, torch.float16)
    assert torch.equal(s16, s16.half().float())  # exact in an fp16 graph
    w2 = torch.randn(64, 32)
    assert (to_codes(w2, weight_scales(w2, INT8, torch.float16).reshape(-1, 1), INT8).abs() <= 127).all()


def test_tensor_scale_refuses_zero_and_non_finite():
    assert tensor_scale(448.0, FP8_E4M3) == 1.0
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            tensor_scale(bad, INT8)


def test_obs_pass_quantizes_inside_the_mask():
    """GPTQ inside the N:M mask: the joint pass leaves every weight on its grid and N:M, and rounding as it goes
    (later columns absorb the rounding error) beats rounding the OBS result afterwards."""
    from permcompile.math.nm import is_nm
    from permcompile.math.obs import output_error, sparsegpt_nm_
    from permcompile.math.quant import snap_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
    h = x.T @ x / 512
    w_ref = torch.randn(48, 64, generator=gen)
    for fmt in (INT8, FP8_E4M3):
        scale = weight_scales(w_ref, fmt)
        w_after = w_ref.clone()
        sparsegpt_nm_(w_after, h, 2, 4)
        w_after = snap_rows(w_after, scale, fmt)
        w_joint = w_ref.clone()
        sparsegpt_nm_(w_joint, h, 2, 4, quantize=lambda col: fake_quant(col, scale, fmt))
        assert torch.equal(snap_rows(w_joint, scale, fmt), w_joint) and is_nm(w_joint, 2, 4)
        assert output_error(w_ref, w_joint, h) < output_error(w_ref, w_after, h)


# --- configuration --------------------------------------------------------------------------------
def test_modes_are_registered_and_bad_configs_refused():
    assert QUANT_MODES.choices() == ("none", "fp8", "int8")
    assert OptimizeConfig(quantize="fp8").quantize == QuantizeConfig(mode="fp8")
    with pytest.raises(UsageError, match="--quantize int4"):
        OptimizeConfig(quantize="int4")
    with pytest.raises(UsageError, match="2:4"):
        OptimizeConfig(quantize="int8", sparsity="4:8")
    with pytest.raises(UsageError, match="pruning"):
        OptimizeConfig(quantize="fp8", prune=False)
    with pytest.raises(UsageError, match="smooth_alpha"):
        QuantizeConfig(mode="int8", smooth_alpha=2.0)
    with pytest.raises(UsageError, match="smooth_alpha"):
        QuantizeConfig(mode="int8", smooth_alpha="strong")
    # "auto" (the default): INT8's static per-tensor activations are smoothed, FP8's are not
    assert QuantizeConfig(mode="int8").smoothing() == 0.7 and QuantizeConfig(mode="fp8").smoothing() is None
    assert QuantizeConfig(mode="int8", smooth_alpha=None).smoothing() is None


# --- the whole pipeline on a tiny model -----------------------------------------------------------
def _optimize(tmp_path_factory, name: str, mode: str, **kw):
    from permcompile.pipeline import optimize
    from permcompile.testing.zoo import build_tiny

    out = tmp_path_factory.mktemp(f"q_{name}_{mode}") / "out"
    cfg = OptimizeConfig(quantize=mode, calib_samples=2, calib_seq_len=16, **kw)
    return optimize(build_tiny(name), out, cfg, quiet=True, prefetch_export=False)


@pytest.fixture(scope="module")
def int8_llama(tmp_path_factory):  # the default reconstruction: the OBS pass rounds as it prunes
    return _optimize(tmp_path_factory, "llama", "int8")


@pytest.fixture(scope="module")
def fp8_gpt2(tmp_path_factory):  # slow: its own pipeline run
    pytest.importorskip("transformers")  # GPT-2's Conv1D weights are stored [K, out]
    return _optimize(tmp_path_factory, "gpt2", "fp8", update="none", precision="fp16")


def test_int8_is_smoothed_by_default(int8_llama):
    smoothing = int8_llama.report["quantization"]["smoothing"]
    assert smoothing["alpha"] == 0.7 and smoothing["sites"], smoothing


@pytest.mark.parametrize("which", ["int8_llama", pytest.param("fp8_gpt2", marks=pytest.mark.slow)])
def test_quantized_output_passes_verify(which, request):
    import onnx

    from permcompile.export.verify import onnx_nm_report, verify_artifacts

    result = request.getfixturevalue(which)
    checks = {c.name: c for c in verify_artifacts(result.out_dir)}
    assert all(c.passed for c in checks.values()), [(c.name, c.detail) for c in checks.values() if not c.passed]
    assert {"quantization", "onnx_qdq", "onnx_nm", "hf_nm", "hf_quant", "onnxruntime_vs_torch"} <= set(checks)
    plan = json.loads((result.out_dir / "quantization.json").read_text())
    # the graph: 8-bit codes, N:M in the codes themselves, Q/DQ opset
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    want = onnx.TensorProto.INT8 if plan["mode"] == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    inits = {t.name: t for t in proto.graph.initializer}
    layers = result.report["pruned_layers"]
    assert len(plan["layers"]) == len(layers) > 0
    rows = {r.name: r for r in onnx_nm_report(proto, 2, 4)}
    for entry in layers:
        assert inits[entry["onnx_initializer"]].data_type == want
        assert rows[entry["onnx_initializer"]].is_nm and rows[entry["onnx_initializer"]].density <= 0.5
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 19
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= len(layers)
    # report: per-layer rounding error next to the pruning error; the Triton config asks for what the graph needs
    q = result.report["quantization"]
    assert q["joint"] == (result.report["config"]["update"] == "obs")
    for row in q["layers"]:  # rounded inside the OBS pass: its error is part of the layer's reconstruction error
        assert row["input_scale"] > 0
        assert row["rel_error_rounding"] is None if q["joint"] else 0 <= row["rel_error_rounding"] < 0.05
    config = (result.out_dir / "triton" / "model" / "config.pbtxt").read_text()
    assert 'trt_sparsity_enable' in config
    assert ('"INT8"' in config) == (plan["mode"] == "int8")


def _redigest(folder):
    """Refresh report.json's digests: verify must catch a bad scale by its content, not only by the hash."""
    from permcompile.export.digests import file_digests

    report = json.loads((folder / "report.json").read_text())
    report.pop("files")
    report["files"] = file_digests(folder)
    (folder / "report.json").write_text(json.dumps(report))


def _edit_onnx(folder, edit):
    import onnx

    proto = onnx.load(str(folder / "model.onnx"))
    edit({t.name: t for t in proto.graph.initializer})
    onnx.save(proto, str(folder / "model.onnx"))
    for copy in folder.glob("triton/*/*/model.onnx"):
        copy.unlink()
        shutil.copy(folder / "model.onnx", copy)
    _redigest(folder)


def _failed(folder):
    from permcompile.export.verify import verify_artifacts

    return {c.name for c in verify_artifacts(folder) if not c.passed}


def test_tampered_scale_fails_verify(int8_llama, tmp_path):
    from onnx import numpy_helper

    folder = tmp_path / "out"
    shutil.copytree(int8_llama.out_dir, folder)
    name = int8_llama.report["pruned_layers"][0]["onnx_initializer"] + "_scale"

    def double(inits):
        arr = numpy_helper.to_array(inits[name]).copy()
        arr[0] *= 2
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    _edit_onnx(folder, double)
    assert {"onnx_qdq", "onnxruntime_vs_torch"} <= _failed(folder)


def test_densified_quantized_weight_fails_verify(int8_llama, tmp_path):
    from onnx import numpy_helper

    folder = tmp_path / "out"
    shutil.copytree(int8_llama.out_dir, folder)
    name = int8_llama.report["pruned_layers"][1]["onnx_initializer"]

    def densify(inits):
        arr = numpy_helper.to_array(inits[name]).copy()
        arr[arr == 0] = 1
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    _edit_onnx(folder, densify)
    assert "onnx_nm" in _failed(folder)


def _onnx_codes(folder, report) -> dict:
    """param -> the 8-bit codes of its ONNX initializer, [out, K] (torch)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    out = {}
    for entry in report["pruned_layers"]:
        codes = torch.from_numpy(numpy_helper.to_array(inits[entry["onnx_initializer"]]).copy())
        axis = report["quantization"]["onnx"][entry["param"]]["channel_axis"]
        out[entry["param"]] = codes if axis == 0 else codes.t()
    return out


def test_hf_is_a_compressed_tensors_checkpoint_of_the_onnx_codes(int8_llama):
    """hf/ stores the ONNX graph's codes and scales (compressed-tensors int-quantized); transformers loads it and
    computes what verify's reference computes (the decompressed hf/ model through the plan's fake quantization)."""
    from safetensors.torch import load_file

    from permcompile.export.checks import DEFAULT_TOLERANCE
    from permcompile.export.hf_compressed import load_decompressed
    from permcompile.export.verify import _safetensors_reader
    from permcompile.models import load_model
    from permcompile.passes.quantize import QuantPlan, fake_quant_model, quant_tolerance

    folder, report = int8_llama.out_dir, int8_llama.report
    assert report["quantization"]["hf"]["format"] == "compressed-tensors"
    config = json.loads((folder / "hf" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    stored = load_file(str(folder / "hf" / "model.safetensors"))
    plan = QuantPlan.read(folder)
    for param, codes in _onnx_codes(folder, report).items():
        assert stored[param].dtype == torch.int8 and torch.equal(stored[param], codes), param
    for name, lp in plan.layers.items():
        assert torch.equal(stored[f"{name}.weight_scale"].reshape(-1), lp.weight_scale)
        assert float(stored[f"{name}.input_scale"]) == lp.input_scale

    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder / "hf"), local_files_only=True).eval()
    reference = load_decompressed(folder / "hf", AutoModelForCausalLM, *_safetensors_reader(folder / "hf")).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fake_quant_model(reference, plan):
        ref = reference(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    tol = quant_tolerance(plan, "fp32", DEFAULT_TOLERANCE["fp32"])
    assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
    # permcompile's own loader (evaluate's torch backend) runs it as transformers does, quantized inputs included
    with torch.no_grad():
        assert torch.equal(load_model(folder / "hf").model(input_ids=ids).logits, got)


def _edit_hf(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    _redigest(folder)


def test_tampered_hf_checkpoint_fails_verify(int8_llama, tmp_path):
    """A doubled weight scale in hf/ fails hf_quant; a densified code matrix fails hf_nm (N:M on the codes)."""
    layers = int8_llama.report["pruned_layers"]
    scale_key = layers[0]["param"].removesuffix(".weight") + ".weight_scale"

    def double(tensors):
        tensors[scale_key] = tensors[scale_key] * 2

    def densify(tensors):
        codes = tensors[layers[1]["param"]]
        codes[codes == 0] = 1

    for name, edit, check in (("scale", double, "hf_quant"), ("dense", densify, "hf_nm")):
        folder = tmp_path / name
        shutil.copytree(int8_llama.out_dir, folder)
        _edit_hf(folder, edit)
        assert check in _failed(folder), name


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_bad_scale_in_plan_fails_verify(int8_llama, tmp_path, value):
    folder = tmp_path / "out"
    shutil.copytree(int8_llama.out_dir, folder)
    plan = json.loads((folder / "quantization.json").read_text())
    plan["layers"][0]["input_scale"] = value
    (folder / "quantization.json").write_text(json.dumps(plan))
    _redigest(folder)
    assert "quantization" in _failed(folder)


def test_all_zero_activations_refused():
    """A layer whose calibration inputs are all zero has no activation scale: one clear error naming it. (The
    quantize step runs inside compress_, before the output folder is created, so nothing is written.)"""
    from torch import nn

    from permcompile.passes.quantize import QuantRequest, quantize_
    from permcompile.passes.sparsify import LinearInfo
    from permcompile.testing.zoo import build_tiny

    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.zero_()  # gate/up of block 1 read only zeros
    infos = [LinearInfo(n, n + ".weight", 1, tuple(m.weight.shape)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and ".layers." in n]
    batch = {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))}
    request = QuantRequest(model, infos, [batch], QuantizeConfig(mode="int8"))
    with pytest.raises(UsageError, match=r"layers\.1\.mlp\.(gate|up)_proj are all zero"):
        quantize_(request, "int8")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("nan"))
    with pytest.raises(UsageError, match="not finite"):
        quantize_(QuantRequest(model, infos, [batch], QuantizeConfig(mode="fp8")), "fp8")


# --- command line ---------------------------------------------------------------------------------
def test_cli_quantize_reaches_the_config(monkeypatch, tmp_path, tiny_dir):
    from types import SimpleNamespace

    from click.testing import CliRunner

    import permcompile.pipeline as pipeline
    from permcompile.cli import main

    seen = {}

    def fake(model, out, config, **kwargs):
        seen["config"] = config
        return SimpleNamespace(report={"model": model, "sparsity": str(config.sparsity),
                                       "permutation": config.permutation, "criterion": config.criterion})

    monkeypatch.setattr(pipeline, "optimize", fake)
    runner = CliRunner()
    args = ["optimize", str(tiny_dir("llama")), "--out", str(tmp_path / "o"), "--quantize", "fp8"]
    result = runner.invoke(main, args)
    assert seen and seen["config"].quantize.mode == "fp8", result.output
    assert "--quantize [none|fp8|int8]" in runner.invoke(main, ["optimize", "--help"]).output


def test_cli_summary_names_the_quantization(int8_llama, capsys):
    from permcompile.cli import _print_summary

    _print_summary(int8_llama.report)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("quantized"))
    assert "int8" in line and f"{len(int8_llama.report['pruned_layers'])} layers" in line
    assert "inside the OBS pass" in line


def test_cli_refuses_a_pattern_tensorrt_cannot_run_in_one_line(tmp_path, tiny_dir):
    from click.testing import CliRunner

    from permcompile.cli import main

    result = CliRunner().invoke(main, ["optimize", str(tiny_dir("llama")), "--out", str(tmp_path / "o"),
                                       "--quantize", "int8", "--sparsity", "4:8"])
    assert result.exit_code != 0
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "2:4" in lines[0], result.output
    assert not list(tmp_path.iterdir())


# --- TensorRT builder path (TensorRT cannot be installed here: a stand-in module records what is asked) -------
def _stub_tensorrt(version: str, strongly_typed_flag: bool, precision_flags: bool, log: dict):
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class ILogger:
        class Severity:
            VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

        def __init__(self):
            pass

    creation = {"EXPLICIT_BATCH": 0}
    if strongly_typed_flag:
        creation["STRONGLY_TYPED"] = 1
    flags = {"SPARSE_WEIGHTS": 10}
    if precision_flags:
        flags.update(FP16=11, INT8=12, FP8=13)

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, flag):
            log.setdefault("flags", []).append({v: k for k, v in flags.items()}[flag])

        def add_optimization_profile(self, p):
            pass

    class Profile:
        def set_shape(self, *a):
            pass

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, f):
            log["network_flags"] = f
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(ILogger.Severity.INFO, "TRT inference plan picked sparse implementation for layers: mm_0")
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            log["parsed"] = path
            return True

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED=0)
    return trt


@pytest.mark.parametrize("version, typed_flag, precision_flags, want_typed, want_flags", [
    ("11.0.0", False, False, True, ["SPARSE_WEIGHTS"]),  # always strongly typed: no precision flag exists
    ("10.8.0", True, True, True, ["SPARSE_WEIGHTS"]),  # asked to be strongly typed
    ("9.2.0", False, True, False, ["SPARSE_WEIGHTS", "INT8"]),  # weakly typed: the flag enables Q/DQ layers
])
def test_tensorrt_builder_for_a_quantized_graph(int8_llama, tmp_path, monkeypatch, version, typed_flag,
                                                precision_flags, want_typed, want_flags):
    import sys

    from permcompile.export import tensorrt as pc_trt

    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _stub_tensorrt(version, typed_flag, precision_flags, log))
    monkeypatch.setattr(pc_trt, "_require_gpu", lambda: None)
    info = pc_trt.build_engine(int8_llama.out_dir / "model.onnx", tmp_path / "m.plan", "fp32",
                               {"input_ids": ((1, 1), (1, 8), (2, 16))}, quantize="int8")
    assert info.strongly_typed is want_typed and log["flags"] == want_flags
    assert bool(log["network_flags"] & 2) == (typed_flag and want_typed)
    assert info.sparse_layers == ["mm_0"] and info.quantize == "int8" and not info.warnings
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a: (8, 0))
    with pytest.raises(UsageError, match="FP8"):  # an A100 has no FP8: one clear error before any build
        pc_trt.build_engine(int8_llama.out_dir / "model.onnx", tmp_path / "m8.plan", "fp32", {}, quantize="fp8")


# --- SmoothQuant diagonals ---------------------------------------------------------------------------
def _smoothed(name: str, alpha, outliers: bool = True):
    from permcompile.models import load_model
    from permcompile.passes.quantize import fake_quant_model
    from permcompile.pipeline import compress_
    from permcompile.testing.zoo import build_tiny

    net = build_tiny(name)
    if outliers:  # a few input channels 30x larger than the rest, as in LLMs
        with torch.no_grad():
            for layer in net.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[:4] *= 30
    x = {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))}
    cfg = OptimizeConfig(quantize=QuantizeConfig(mode="int8", smooth_alpha=alpha), calib_samples=4,
                         calib_seq_len=32, update="none", permutation="none")
    c = compress_(load_model(net), cfg)
    with torch.no_grad():
        with fake_quant_model(net, c.quant_plan):
            y = net(**x)[0]
        y_float_inputs = net(**x)[0]
    return c.quant_plan, float((y - y_float_inputs).norm() / y_float_inputs.norm())


def test_smoothing_folds_into_norms_v_and_up_and_reduces_activation_error():
    plan, err = _smoothed("llama", 0.5)
    kinds = {s["kind"] for s in plan.smoothing["sites"]}
    assert kinds == {"norm", "attention", "mlp"} and not plan.smoothing["skipped"]
    assert plan.smoothing["check_rel_err"] <= 1e-4  # the fold check of permutations
    _, err_plain = _smoothed("llama", None)
    assert err < 0.9 * err_plain  # INT8 input rounding hurts less once the outliers moved into the weights


def test_smoothing_skips_what_a_diagonal_cannot_pass():
    """GPT-2's MLP writer sits before a GELU: its diagonal would change the function and is undone."""
    from permcompile.models import load_model
    from permcompile.pipeline import compress_
    from permcompile.testing.zoo import build_tiny

    cfg = OptimizeConfig(quantize=QuantizeConfig(mode="int8", smooth_alpha=0.5), calib_samples=2,
                         calib_seq_len=16, update="none", permutation="none")
    plan = compress_(load_model(build_tiny("gpt2")), cfg).quant_plan
    assert {s["kind"] for s in plan.smoothing["sites"]} == {"norm", "attention"}
    assert [s["kind"] for s in plan.smoothing["skipped"]] == ["mlp:0"]
    assert plan.smoothing["check_rel_err"] <= 1e-4


def test_sliced_verification_runs_the_qdq_graph(int8_llama, tmp_path):
    """Graphs above 512 MB are verified slice by slice (export/ort_chunks.py): the Q/DQ graph, its weights inline or
    in external data, slices to the same outputs as the whole graph."""
    import onnx

    from permcompile.export.ort_chunks import run_sliced
    from permcompile.export.verify import ort_session

    path = int8_llama.out_dir / "model.onnx"
    external = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    session = ort_session(path)
    gen = np.random.default_rng(0)
    feeds = {i.name: (gen.integers(0, 100, (2, 12)) if i.name == "input_ids" else np.ones((2, 12))).astype(np.int64)
             for i in session.get_inputs()}
    whole = session.run(None, feeds)[0]
    for p in (path, external):
        sliced = run_sliced(p, [feeds], budget=24_000)[0][0]  # a few layers per slice
        np.testing.assert_array_equal(sliced, whole)


def test_each_weight_is_dequantized_right_before_its_reader(int8_llama):
    """Sliced verification (export/ort_chunks.py) carries a value from one slice to the next: a weight's
    DequantizeLinear at the top of the graph would make it carry every dequantized weight through the whole run."""
    import onnx

    proto = onnx.load(str(int8_llama.out_dir / "model.onnx"), load_external_data=False)
    codes = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    nodes = list(proto.graph.node)
    placed = 0
    for i, node in enumerate(nodes):
        if node.op_type == "DequantizeLinear" and node.input[0] in codes:
            reader = next(j for j in range(i + 1, len(nodes)) if node.output[0] in nodes[j].input)
            assert reader - i <= 3, (node.name, nodes[reader].name)  # at most the activation's Q/DQ pair between
            placed += 1
    assert placed == len(int8_llama.report["pruned_layers"])


def test_quant_speed_dry_run_and_skip_without_cuda(tmp_path, capsys):
    """benchmarks/quant_speed.py (gpu_check.sh step 5): its dry run builds every case on the CPU; without CUDA
    the real run says so and exits 0."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("quant_speed", bench / "quant_speed.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main(["--dry-run", "--tokens", "1", "--out-dir", str(tmp_path)]) == 0
        out = json.loads((tmp_path / "quant_speed_dryrun.json").read_text())
        assert out["dry_run"] and len(out["rows"]) == 4
        assert all("median_ms" in row[case] for row in out["rows"] for case in mod.CASES)
        assert "DRY RUN" in (tmp_path / "quant_speed_dryrun.md").read_text()
        if not torch.cuda.is_available():
            assert mod.main(["--out-dir", str(tmp_path)]) == 0
            assert json.loads((tmp_path / "quant_speed.json").read_text())["skipped"] is True
            assert "skipped: no CUDA device" in capsys.readouterr().out
    finally:
        sys.path.remove(str(bench))


def test_resume_reuses_a_reconstruction_checkpoint_only_with_the_same_quantization(tmp_path, monkeypatch):
    """The OBS pass rounds as it prunes with --quantize, so its checkpoint depends on the quantization: a resume
    with another --quantize (or none) refuses it, and a resume with the same one restores the finished blocks'
    grids too (the scales the weights are on), to the result of an uninterrupted run."""
    import copy

    import permcompile.passes.reconstruct as rec
    from permcompile.passes.checkpoint import Checkpoints
    from permcompile.passes.quantize import JointQuant
    from test_reconstruct import _setup_llama

    net, linears, batches = _setup_llama()

    def joint(mode="int8"):
        return JointQuant.from_config(QuantizeConfig(mode=mode), "fp32")

    whole, quant = copy.deepcopy(net), joint()
    rec.reconstruct_(whole, linears, batches, "wanda", 2, 4, quantize=quant)
    real = rec._reconstruct_linear

    def dies_in_block_1(model, info, *a, **k):
        if info.module.startswith("model.layers.1."):
            raise KeyboardInterrupt
        return real(model, info, *a, **k)

    monkeypatch.setattr(rec, "_reconstruct_linear", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        rec.reconstruct_(copy.deepcopy(net), linears, batches, "wanda", 2, 4, quantize=joint(),
                         checkpoints=Checkpoints(root=tmp_path))
    monkeypatch.setattr(rec, "_reconstruct_linear", real)
    resume = Checkpoints(root=tmp_path, resume=True)
    for other in (None, joint("fp8")):
        with pytest.raises(UsageError, match="different model, calibration data or configuration"):
            rec.reconstruct_(copy.deepcopy(net), linears, batches, "wanda", 2, 4, quantize=other, checkpoints=resume)
    resumed, again = copy.deepcopy(net), joint()
    result = rec.reconstruct_(resumed, linears, batches, "wanda", 2, 4, quantize=again, checkpoints=resume)
    pruned = [i for i in linears if i.prune]
    assert set(result.weight_scales) == set(quant.scales) == {i.module for i in pruned}
    for info in pruned:
        assert torch.equal(result.weight_scales[info.module], quant.scales[info.module]), info.module
        assert torch.equal(resumed.get_parameter(info.param), whole.get_parameter(info.param)), info.param


def test_qdq_rewrite_is_the_same_wherever_the_weights_are(tmp_path):
    """The Q/DQ rewrite runs inside the export, one weight at a time, whether a weight sits in the proto, in a
    payload streamed on write, or in external data: the same codes and the same ONNX Runtime outputs."""
    import onnx
    from onnx import numpy_helper
    from torch import nn

    from permcompile.export.onnx import export_onnx
    from permcompile.export.verify import ort_session
    from permcompile.math.quant import snap_rows
    from permcompile.passes.quantize import LayerPlan, QuantPlan

    torch.manual_seed(0)
    # 128x256 weights are streamed payloads (>= 64 KiB); the 16x128 one stays in the proto
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    x = {"x": torch.randn(4, 128)}

    def plan_for(precision):
        plan = QuantPlan("int8", precision)
        sdt = torch.float16 if precision == "fp16" else torch.float32
        for i in (0, 2, 4):
            w = model[i].weight
            scale = weight_scales(w.detach(), INT8, sdt)
            with torch.no_grad():
                w.copy_(snap_rows(w.detach(), scale, INT8))
            plan.layers[str(i)] = LayerPlan(str(i), f"{i}.weight", 1, scale, float(tensor_scale(8.0, INT8, sdt)),
                                            8.0)
        return plan

    def export(name, precision, **kw):
        path = tmp_path / name / "model.onnx"
        info = export_onnx(model, x, path, precision, quant_plan=plan_for(precision), **kw)
        assert set(info.quantized) == {"0.weight", "2.weight", "4.weight"}
        proto = onnx.load(str(path))
        codes = {p: numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == r["initializer"]))
                 for p, r in info.quantized.items()}
        session = ort_session(path)
        want = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        out = session.run(None, {"x": x["x"].numpy().astype(want)})[0]
        return path, codes, out

    inline, inline_codes, inline_out = export("inline", "fp32")
    ext, ext_codes, ext_out = export("external", "fp32", external_data=True)
    for p, c in inline_codes.items():
        assert c.dtype == np.int8 and np.array_equal(c, ext_codes[p]), p
    np.testing.assert_array_equal(inline_out, ext_out)
    # external data now holds codes (1 byte a weight) plus the biases, and no temporary file is left
    n_weights = sum(model[i].weight.numel() for i in (0, 2, 4))
    assert (ext.parent / "model.onnx.data").stat().st_size < 2 * n_weights
    assert sorted(f.name for f in ext.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    # the teacher-forced check reads the weights from disk in both layouts (inline ones via a scratch file it
    # removes): the same graph outputs and the same forced references
    from permcompile.export.qdq_compare import forced_compare

    plan = plan_for("fp32")  # the weights the fp32 graphs hold (already on this grid: unchanged)
    results = [forced_compare(p, model, plan, {}, [x], None, "fp32") for p in (inline, ext)]
    for r in results:
        assert r.passed and "teacher-forced at 3/3" in r.detail, r.detail
    assert results[0].detail == results[1].detail and results[0].max_abs == results[1].max_abs
    assert sorted(f.name for f in ext.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert sorted(f.name for f in inline.parent.iterdir()) == ["model.onnx"]
    # verify's graph checks read a single-file graph's weights in place, the file hard-linked as Triton's copy is
    # (onnx's external-data reader refuses such a file): the same N:M rows and the same Q/DQ check as the whole graph
    from permcompile.export.onnx_write import load_weightless, tensor_array
    from permcompile.export.verify import onnx_nm_report
    from permcompile.export.verify_quant import qdq_check

    (inline.parent / "triton").mkdir()
    os.link(inline, inline.parent / "triton" / "model.onnx")
    light, whole = load_weightless(inline, min_bytes=1024), onnx.load(str(inline))  # the codes are 2-32 KiB
    assert sum(i.data_location == onnx.TensorProto.EXTERNAL for i in light.graph.initializer) >= 3
    assert (onnx_nm_report(light, 2, 4, base_dir=inline.parent, graph_file=inline)
            == onnx_nm_report(whole, 2, 4))
    checks = [qdq_check(g, inline.parent, plan, {}, graph_file=inline) for g in (light, whole)]
    assert checks[0] == checks[1] and checks[0].passed, checks
    bad = next(i for i in light.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    for entry in bad.external_data:
        if entry.key == "offset":
            entry.value = str(inline.stat().st_size - 10)
    with pytest.raises(ValueError, match="outside model.onnx"):
        tensor_array(bad, inline.parent, inline)
    # fp16: the half export streams its weights, the converter rewrites an in-memory graph
    _, half_codes, half_out = export("half", "fp16", fp16_method="half")
    _, conv_codes, conv_out = export("convert", "fp16", fp16_method="convert")
    for p, c in half_codes.items():
        assert np.array_equal(c, conv_codes[p]), p
    np.testing.assert_allclose(half_out.astype(np.float32), conv_out.astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(half_out.astype(np.float32), inline_out, atol=5e-2, rtol=5e-2)


def test_a_failed_qdq_rewrite_leaves_no_half_written_data_file(tmp_path):
    """A weight off its grid stops the rewrite of an external-data graph after the first weight was already
    coded into the new data file: one clear error, the half-written file removed, the old data file intact."""
    from torch import nn

    from permcompile.errors import OnnxExportError
    from permcompile.export.onnx import export_onnx
    from permcompile.math.quant import snap_rows
    from permcompile.passes.quantize import LayerPlan, QuantPlan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    plan = QuantPlan("int8", "fp32")
    for i in (0, 2):
        w = model[i].weight
        scale = weight_scales(w.detach(), INT8, torch.float32)
        with torch.no_grad():
            w.copy_(snap_rows(w.detach(), scale, INT8))
        plan.layers[str(i)] = LayerPlan(str(i), f"{i}.weight", 1, scale, float(tensor_scale(8.0, INT8)), 8.0)
    with torch.no_grad():
        model[2].weight[0, :4] += 0.3 * plan.layers["2"].weight_scale[0]  # off the grid: the second weight fails
    path = tmp_path / "out" / "model.onnx"
    with pytest.raises(OnnxExportError, match=r"2\.weight: \d+ weights are not on their quantization grid"):
        export_onnx(model, {"x": torch.randn(4, 128)}, path, "fp32", quant_plan=plan, external_data=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    # the old data file still holds the float weights (4 bytes each), untouched by the coding of the first
    assert (path.parent / "model.onnx.data").stat().st_size >= 4 * (128 * 256 * 2)
