"""ONNX Runtime slice by slice (export/ort_chunks.py): the whole graph's outputs (bit for bit in fp32; in fp16 up
to the rounding of values that cross a cut, which the CPU provider may otherwise keep in fp32 between its casts)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from permcompile.export import verify
from permcompile.export.ort_chunks import NotSliceable, plan_slices, run_sliced
from permcompile.export.verify import compare_ort_refs, ort_session, torch_outputs


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (2, 8), generator=gen)},
            {"input_ids": torch.randint(0, 128, (1, 5), generator=gen)}]


@pytest.fixture(scope="module")
def exported(tiny_llama_onnx):
    """conftest's tiny llama graphs: fp16 in one file, fp32 with external data (exported from ``_batches()[0]``)."""
    return tiny_llama_onnx


# a single file, and one with external data; each exports and runs the graph whole and sliced (~35 s)
@pytest.mark.parametrize("precision", [pytest.param("fp16", marks=pytest.mark.slow), "fp32"])
def test_sliced_run_equals_the_whole_graph(exported, precision):
    _, paths = exported
    path = paths[precision]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert len(plan_slices(graph, budget=32 << 10)) > 5  # many slices, not one
    feeds = [{k: v.numpy() for k, v in b.items()} for b in _batches()]
    session = ort_session(path)
    whole = [session.run(None, f) for f in feeds]
    sliced = run_sliced(path, feeds, budget=32 << 10)
    for w, s in zip(whole, sliced):
        assert len(w) == len(s)
        for a, b in zip(w, s):
            if precision == "fp32":
                assert np.array_equal(a, b)
            else:
                scale = float(np.abs(a.astype(np.float32)).max())
                assert float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) <= 5e-3 * scale
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["model.onnx"] + (["model.onnx.data"] if precision == "fp32" else []))  # nothing left beside the graph


def test_verification_slices_large_graphs(exported, monkeypatch):
    model, paths = exported
    batches = _batches()
    refs = torch_outputs(model, batches)
    whole = compare_ort_refs(paths["fp16"], batches, refs, "fp16")
    calls = []
    real = verify.ort_session
    monkeypatch.setattr(verify, "SLICE_ABOVE_BYTES", 0)
    monkeypatch.setattr(verify, "SLICE_BYTES", 64 << 10)
    monkeypatch.setattr(verify, "ort_session", lambda *a, **k: calls.append(a) or real(*a, **k))
    sliced = compare_ort_refs(paths["fp16"], batches, refs, "fp16")
    assert not calls and sliced.passed and whole.passed
    assert sliced.max_rel <= 2 * whole.max_rel + 1e-3  # fp16 rounding at the cuts, nothing more


def test_subgraphs_are_not_sliced(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(NotSliceable):
        plan_slices(graph, 1)


def test_single_file_weights_move_to_a_scratch_file_and_give_the_same_outputs(tmp_path):
    """A single-file graph's weights of 64 KiB and more are moved to a scratch file before slicing (so this process
    holds none of them): the slices must read them back at the right offsets, bit for bit."""
    from onnx import numpy_helper

    gen = np.random.default_rng(0)
    w1 = numpy_helper.from_array(gen.standard_normal((128, 256)).astype(np.float32), "w1")  # 128 KiB each
    w2 = numpy_helper.from_array(gen.standard_normal((256, 128)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])], [w1, w2])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = [{"x": gen.standard_normal((4, 128)).astype(np.float32)}]
    whole = ort_session(path).run(None, feeds[0])[0]
    assert len(plan_slices(onnx.load(str(path)).graph, budget=64 << 10)) > 1  # several slices
    sliced = run_sliced(path, feeds, budget=64 << 10)[0][0]
    assert np.array_equal(sliced, whole)
