"""The TensorRT step of optimize() around a stand-in builder (TensorRT itself cannot run here)."""
from __future__ import annotations

import json

from permcompile.config import OptimizeConfig
from permcompile.export import tensorrt as trt_mod
from permcompile.export.triton import parse_pbtxt
from permcompile.export.verify import verify_artifacts
from permcompile.pipeline import optimize


def test_plan_output_writes_engine_report_and_triton_plan(tiny_dir, tmp_path, monkeypatch):
    calls = {}

    def fake_build(onnx_path, plan_path, precision, profiles, sparse=True):
        calls.update(onnx=str(onnx_path), precision=precision, profiles=profiles, sparse=sparse)
        with open(plan_path, "wb") as fh:
            fh.write(b"not a real engine")
        return {"sparse_layers": ["stand-in"], "plan": str(plan_path)}

    monkeypatch.setattr(trt_mod, "build_engine", fake_build)
    plan = tmp_path / "engine.plan"
    res = optimize(str(tiny_dir("llama")), plan, OptimizeConfig(calib_samples=2, calib_seq_len=16,
                                                                   precision="fp16", permutation="none"),
                   quiet=True, seq_range=(1, 16, 32))
    assert res.engine_path == plan and plan.read_bytes() == b"not a real engine"
    assert calls["precision"] == "fp16" and calls["sparse"] is True
    assert calls["profiles"]["input_ids"] == ((1, 1), (1, 16), (8, 32))
    report = json.loads((tmp_path / "engine" / "report.json").read_text())
    assert report["tensorrt"]["sparse_layers"] == ["stand-in"]
    cfg = parse_pbtxt((tmp_path / "engine" / "triton" / "model_trt" / "config.pbtxt").read_text())
    assert "tensorrt_plan" in json.dumps(cfg)
    assert all(c.passed for c in verify_artifacts(tmp_path / "engine")), "report digests must cover new files"
