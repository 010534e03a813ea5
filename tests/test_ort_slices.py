"""ONNX Runtime slice by slice (export/ort_chunks.py): the whole graph's outputs (bit for bit in fp32; in fp16 up
to the rounding of values that cross a cut, which the CPU provider may otherwise keep in fp32 between its casts)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from permcompile.export import verify
from permcompile.export.ort_chunks import NotSliceable, plan_slices, run_sliced, weightless_graph
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


def test_single_file_weights_are_read_in_place_and_give_the_same_outputs(tmp_path):
    """A single-file graph's weights of 64 KiB and more become references to their bytes inside the .onnx file
    (this process reads none of them): the slices must read them at the right offsets, bit for bit; the smaller
    ones and every other field stay as they were."""
    from onnx import numpy_helper

    gen = np.random.default_rng(0)
    w1 = numpy_helper.from_array(gen.standard_normal((128, 256)).astype(np.float32), "w1")  # 128 KiB each
    w2 = numpy_helper.from_array(gen.standard_normal((256, 128)).astype(np.float32), "w2")
    b = numpy_helper.from_array(gen.standard_normal(128).astype(np.float32), "b")  # small: stays inline
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])], [w1, w2, b])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = [{"x": gen.standard_normal((4, 128)).astype(np.float32)}]
    whole = ort_session(path).run(None, feeds[0])[0]
    assert len(plan_slices(onnx.load(str(path)).graph, budget=64 << 10)) > 1  # several slices
    sliced = run_sliced(path, feeds, budget=64 << 10)[0][0]
    assert np.array_equal(sliced, whole)
    light, folder = weightless_graph(path)
    full = onnx.load(str(path))
    assert folder == tmp_path.resolve() and [i.name for i in light.graph.initializer] == ["w1", "w2", "b"]
    assert [i.data_location for i in light.graph.initializer] == [TensorProto.EXTERNAL] * 2 + [TensorProto.DEFAULT]
    onnx.load_external_data_for_model(light, str(tmp_path))
    for init in light.graph.initializer:
        init.ClearField("data_location")  # set to DEFAULT by the loader, absent in the file: the same tensor
    assert light == full


class _TwoHeads(torch.nn.Module):
    """A tied head (Transpose of the embedding in the graph) and an untied one ([K, N] initializer)."""

    def __init__(self, vocab=1000, dim=64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.tied = torch.nn.Linear(dim, vocab, bias=False)
        self.tied.weight = self.emb.weight
        self.untied = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        h = torch.tanh(self.emb(input_ids))
        return self.tied(h) + 0.5 * self.untied(h)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_wide_heads_run_in_column_pieces_with_the_same_outputs(tmp_path, precision):
    """A MatMul weight above half the slice budget runs as column pieces, each in its own slice (the tied head's
    Transpose folded into its pieces): fp32 outputs bit for bit, fp16 within the cut rounding."""
    from permcompile.export.onnx import export_onnx
    from permcompile.export.ort_chunks import split_wide_matmuls_

    torch.manual_seed(0)
    model = _TwoHeads().eval()
    ids = {"input_ids": torch.randint(0, 1000, (2, 8))}
    path = tmp_path / "model.onnx"
    export_onnx(model, ids, path, precision)
    budget = 64 << 10 if precision == "fp16" else 128 << 10  # pieces of at most 32 / 64 KiB: 4 per head
    proto, _ = weightless_graph(path)
    ops = [n.op_type for n in proto.graph.node]
    pieces = split_wide_matmuls_(proto.graph, limit=budget // 2)
    assert len(pieces) == 8 and {p.transposed for p in pieces.values()} == {True, False}
    assert all(p.nbytes <= budget // 2 for p in pieces.values())
    # the head's Transpose is gone; the embedding's Gather still reads the same initializer
    assert ops.count("Transpose") - [n.op_type for n in proto.graph.node].count("Transpose") == 1
    assert len(plan_slices(proto.graph, budget, {k: p.nbytes for k, p in pieces.items()})) >= 4
    feeds = [{"input_ids": ids["input_ids"].numpy()}, {"input_ids": np.arange(5)[None] * 97}]
    session = ort_session(path)
    whole = [session.run(None, f)[0] for f in feeds]
    sliced = [o[0] for o in run_sliced(path, feeds, budget=budget)]
    for a, b in zip(whole, sliced):
        assert a.shape == b.shape
        if precision == "fp32":
            assert np.array_equal(a, b)
        else:
            assert float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) <= 5e-3 * float(np.abs(a).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_weight_piece_never_reads_outside_the_graph_folder(tmp_path):
    from permcompile.export.ort_chunks import WeightPiece
    from permcompile.safepath import UnsafePathError

    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    (tmp_path / "graph").mkdir()
    piece = WeightPiece("w", 0, 2, False, (4, 4), np.dtype(np.float32), "../secret.bin", 0)
    with pytest.raises(UnsafePathError):
        piece.load(tmp_path / "graph")
    assert WeightPiece("w", 0, 2, False, (4, 4), np.dtype(np.float32), "secret.bin", 0).load(tmp_path).shape == (4, 2)
