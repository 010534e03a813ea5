"""The TensorRT step of optimize() around a stand-in builder (TensorRT itself cannot run here)."""
from __future__ import annotations

import json

from permcompile.export.triton import parse_pbtxt
from permcompile.export.verify import verify_artifacts


def test_plan_output_writes_engine_report_and_triton_plan(bf16_llama_plan):
    res, plan, calls = bf16_llama_plan  # conftest: a bf16 tiny llama to engine.plan, the builder a stand-in
    folder = plan.with_suffix("")
    assert res.engine_path == plan and plan.read_bytes() == b"not a real engine"
    assert calls["precision"] == "fp16" and calls["sparse"] is True
    assert calls["profiles"]["input_ids"] == ((1, 1), (1, 16), (8, 32))
    report = json.loads((folder / "report.json").read_text())
    assert report["tensorrt"]["sparse_layers"] == ["stand-in"]
    cfg = parse_pbtxt((folder / "triton" / "model_trt" / "config.pbtxt").read_text())
    assert "tensorrt_plan" in json.dumps(cfg)
    assert all(c.passed for c in verify_artifacts(folder)), "report digests must cover new files"
