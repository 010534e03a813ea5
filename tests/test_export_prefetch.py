"""Fast export paths: the graph traced ahead of time in a forked process (weights bound afterwards) and
the streaming ONNX writer. Each must give the same model as the plain export."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from permcompile.export import onnx_write
from permcompile.export.onnx import GraphPrefetch, export_onnx
from permcompile.export.verify import compare_ort_torch
from permcompile.testing.zoo import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")


def _batch(batch=2, seq=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=gen)}


def _change_weights_(model, seed=1):
    """What compression does: rewrite weights in place (permute rows, zero half), never the structure."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=gen) > 0.5).add_(0.01 * torch.randn(p.shape, generator=gen))
            if p.dim() == 2:
                p.copy_(p[torch.randperm(p.shape[0], generator=gen)])


def _initializers(path):
    proto = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


# both slow (a fork, two exports and ORT each): by default conftest's hungarian_llama checks the binding through
# the pipeline (its weights change after the fork; a stale binding fails onnx_nm and onnxruntime_vs_torch) and
# test_dtype's consuming export runs a prefetched fp16 graph
@pytest.mark.slow
@pytest.mark.parametrize("builder,precision", [(tiny_llama, "fp32"), (tiny_gpt2, "fp16")])
def test_prefetched_graph_binds_the_final_weights(tmp_path, builder, precision):
    model = builder()
    fwd = {"use_cache": False}
    prefetch = GraphPrefetch(model, _batch(), precision, fwd, workdir=tmp_path / "trace")
    _change_weights_(model)  # after the fork: the child traced the old weights
    fast = export_onnx(model, _batch(), tmp_path / "fast.onnx", precision, fwd, prefetched=prefetch)
    assert fast.prefetched and not any("traced again" in w for w in fast.warnings), fast.warnings
    plain = export_onnx(model, _batch(), tmp_path / "plain.onnx", precision, fwd)
    assert not plain.prefetched
    a, b = _initializers(tmp_path / "fast.onnx"), _initializers(tmp_path / "plain.onnx")
    assert fast.initializer_map == plain.initializer_map
    for param, name in fast.initializer_map.items():
        np.testing.assert_array_equal(a[name], b[plain.initializer_map[param]])
    cmp = compare_ort_torch(model, tmp_path / "fast.onnx", [_batch(1, 5, seed=3), _batch(3, 11, seed=4)], fwd,
                            precision=precision)
    assert cmp.passed, cmp


@pytest.mark.slow  # ~40 s
def test_prefetch_falls_back_when_the_structure_changed(tmp_path):
    """A graph prefetched from another model must not be used: the export traces again and says so."""
    other = tiny_llama(seed=0)
    prefetch = GraphPrefetch(other, _batch(), "fp32", {"use_cache": False}, workdir=tmp_path / "trace")
    model = tiny_gpt2()
    info = export_onnx(model, _batch(), tmp_path / "m.onnx", "fp32", {"use_cache": False}, prefetched=prefetch)
    assert not info.prefetched
    assert any("traced again" in w for w in info.warnings), info.warnings
    assert compare_ort_torch(model, tmp_path / "m.onnx", [_batch(2, 6)], {"use_cache": False}).passed


def test_prefetch_reports_a_failed_child(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, input_ids):
            if input_ids.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return input_ids.float() * 2
            return input_ids.float()

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    prefetch = GraphPrefetch(Broken(), {"input_ids": torch.ones(2, 4, dtype=torch.long)}, "fp32",
                             workdir=tmp_path / "trace")
    traced, note = prefetch.take(model, ["input_ids"], "fp32", "auto", "fast", None)
    assert traced is None and "prefetch failed" in note
    assert prefetch.process is None  # joined, and torch's thread count restored


def test_prefetch_cancel_kills_the_child_and_restores_threads(tmp_path):
    threads = torch.get_num_threads()
    prefetch = GraphPrefetch(tiny_llama(), _batch(), "fp32", {"use_cache": False}, workdir=tmp_path / "trace")
    prefetch.cancel()
    assert prefetch.process is None
    assert torch.get_num_threads() == threads


def test_the_parent_gets_its_threads_back_when_the_trace_ends(tmp_path):
    """The child's core returns to the parent when the child exits (SIGCHLD), not only at export: compression
    after a short trace used to run on one thread fewer throughout. SIGCHLD's handler is put back afterwards."""
    import signal
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers of the test run have one thread each
    try:
        prefetch = GraphPrefetch(tiny_llama(), _batch(), "fp32", {"use_cache": False}, workdir=tmp_path / "trace")
        assert torch.get_num_threads() == 1 and signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL
        deadline = time.monotonic() + 120
        while torch.get_num_threads() != 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert torch.get_num_threads() == 2, "the trace child ended but the parent kept one thread"
        assert prefetch.process.exitcode == 0 and signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL
        traced, note = prefetch.take(tiny_llama(), ["input_ids"], "fp32", "auto", "fast", None)
        assert traced is not None and note is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # ~20 s
def test_streaming_writer_gives_the_same_model(tmp_path, monkeypatch):
    """Large initializers written outside protobuf read back identical, and ONNX Runtime agrees."""
    monkeypatch.setattr(onnx_write, "_BIG_PAYLOAD", 1024)  # stream every weight of the tiny model
    model = tiny_llama()
    info = export_onnx(model, _batch(), tmp_path / "m.onnx", "fp32", {"use_cache": False})
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    state = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head
    streamed = 0
    for param, name in info.initializer_map.items():
        arr = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name))
        ref = state[param].detach().numpy()
        assert np.array_equal(arr, ref) or np.array_equal(arr, ref.T)
        streamed += arr.nbytes >= 1024
    assert streamed > 5
    assert compare_ort_torch(model, tmp_path / "m.onnx", [_batch(2, 9)], {"use_cache": False}).passed


def test_optimize_with_prefetch_passes_its_checks(hungarian_llama):
    res = hungarian_llama  # conftest: tiny llama, hungarian, prefetch_export=True
    assert res.report["onnx"]["prefetched"] is True
    assert all(c["passed"] for c in res.report["checks"])
    assert "prefetch_wait" in res.report["onnx"]["stages"]
