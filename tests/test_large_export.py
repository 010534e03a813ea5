"""Models whose weights pass the external-data limit (2 GB): the whole optimize -> verify path.

The limit is lowered so that a tiny model crosses it; everything downstream (hf/, model.onnx + .data,
the Triton repository, verify) must treat the result as a real large model would be treated.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from permcompile import OptimizeConfig, optimize
from permcompile.export import onnx as onnx_export
from permcompile.export.verify import raise_if_failed, verify_artifacts


@pytest.fixture
def large(monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)


def _config(**kw) -> OptimizeConfig:
    return OptimizeConfig(permutation="hungarian", calib_samples=2, calib_seq_len=16, **kw)


def _check_large_output(result, out, prefetch: bool) -> None:
    """``result``'s output, written to ``out`` (the same folder or a copy): external data everywhere, every check
    passed, the Triton folder standing on its own."""
    import onnx
    import onnxruntime as ort

    assert result.report["onnx"]["prefetched"] is prefetch
    assert result.report["onnx"]["external_data"]
    assert all(c["passed"] for c in result.report["checks"]), result.report["checks"]
    data = out / "model.onnx.data"
    triton_dir = out / "triton" / "model" / "1"
    assert data.is_file() and (triton_dir / "model.onnx.data").is_file()
    # every loader accepts both copies: the Triton folder must stand on its own (no shared hard link)
    for folder in (result.out_dir, result.out_dir / "triton" / "model" / "1"):
        assert os.stat(folder / "model.onnx.data").st_nlink == 1
    for folder in (out, triton_dir):
        proto = onnx.load(str(folder / "model.onnx"))
        assert proto.graph.initializer
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        ids = torch.randint(0, 128, (1, 5)).numpy()
        assert sess.run(None, {"input_ids": ids})[0].shape[:2] == (1, 5)
    raise_if_failed(verify_artifacts(out))
    # and verify catches a Triton copy that onnx.load would refuse (the old hard link)
    (triton_dir / "model.onnx.data").unlink()
    os.link(data, triton_dir / "model.onnx.data")
    failed = {c.name: c.detail for c in verify_artifacts(out) if not c.passed}
    # the detail is onnx's own reason, cut at 200 characters: it names the data file's full path first, so the
    # words "hard link" fall past the cut under a long temporary folder (an xdist worker's, say)
    with pytest.raises(Exception, match="hard link") as refused:
        onnx.load(str(out / "model.onnx"))
    detail = failed.get("onnx_load", "")
    assert detail.startswith("model.onnx: "), failed
    assert str(refused.value).startswith(detail.removeprefix("model.onnx: ")), failed


def test_external_data_model_optimizes_and_verifies(hungarian_llama, tmp_path):
    """The graph traced ahead in a forked child, weights bound after compression: conftest's ``hungarian_llama``
    (the external-data limit lowered for its run), checked on a copy of its output."""
    out = tmp_path / "out"
    shutil.copytree(hungarian_llama.out_dir, out)
    _check_large_output(hungarian_llama, out, prefetch=True)


@pytest.mark.slow  # a full run (~15 s); the route traced after compression is every other run's (single file)
def test_external_data_model_optimizes_and_verifies_traced_after_compression(large, tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = optimize(str(tiny_dir("llama")), out, _config(), quiet=True, prefetch_export=False)
    _check_large_output(result, out, prefetch=False)


def test_triton_repo_gets_its_own_external_data(tmp_path):
    """The unit behind the end-to-end test: the .data file is copied (one link each), the graph may be linked."""
    import onnx
    from torch import nn

    from permcompile.export.onnx import export_onnx
    from permcompile.export.triton import write_triton_repo

    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    info = export_onnx(mlp, {"x": torch.randn(4, 16)}, tmp_path / "m.onnx", "fp32", external_data=True)
    assert info.external_data
    repo = write_triton_repo(tmp_path / "triton", "m", onnx_path=info.path, sparse=False, precision="fp32")
    copied = repo.model_file.with_name("m.onnx.data")
    assert copied.is_file() and os.stat(copied).st_nlink == 1 and os.stat(tmp_path / "m.onnx.data").st_nlink == 1
    onnx.load(str(repo.model_file))  # would raise "potential hardlink attack" on a linked .data
