"""Run an ONNX graph with ONNX Runtime one slice of nodes at a time, so verification never holds all weights twice.

Why: ONNX Runtime's CPU provider has no fp16 MatMul on x86; it inserts a Cast to fp32 before each one, and the
casts of weights (inputs that are initializers) all run before the first layer. Measured on a 2-layer
Llama-3.2-1B-shaped fp16 graph (0.72 GiB of weights, ``ORT_DISABLE_ALL``): session 0.77 GiB, 2.24 GiB while
running: every weight held in fp16 and in fp32 at once, 1.5× the model's fp32 bytes for the check alone.

How: the nodes, in the file's (topological) order, are cut into slices whose weights add up to about
``budget`` bytes; each slice becomes its own small model (its nodes, the initializers they read, its inputs
typed from the arrays that reach it), is run on every batch, and is released before the next is built. Values
that later slices read are carried over; the others are dropped. The same nodes run with the same kernels on
the same (unoptimised) graph: an fp32 graph gives the whole graph's outputs bit for bit; in an fp16 graph a
value crossing a cut is rounded to fp16, as the graph declares it, where the whole-graph CPU run may keep it
in fp32 between two inserted casts (tests/test_ort_slices.py bounds the difference). Graphs with subgraphs
(If, Loop) are not sliced (:class:`NotSliceable`). What it bought at the 1B block shape (``--update none``,
benchmarks/results/memory_scaling_update_none_sliced.md): 16 layers peak at 3.75 GiB, against 6.29 GiB with
the whole-graph session (memory_scaling_update_none_depth.md, where verification set every depth's peak).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import UsageError
from .onnx_write import point_external
from .ort_session import session_options


class NotSliceable(Exception):
    """The graph cannot be run slice by slice (a node holds a subgraph): run it whole."""


def _nbytes(init) -> int:
    from onnx import helper

    count = 1
    for d in init.dims:
        count *= int(d)
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    except Exception:  # noqa: BLE001 - an exotic dtype: its raw bytes, or nothing
        return len(init.raw_data)


def plan_slices(graph, budget: int) -> list[list[int]]:
    """Node indices of each slice: consecutive nodes, a new slice once the weights read reach ``budget``."""
    from onnx import AttributeProto

    sizes = {i.name: _nbytes(i) for i in graph.initializer}
    slices: list[list[int]] = [[]]
    used: set[str] = set()
    weight = 0
    for index, node in enumerate(graph.node):
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise NotSliceable(f"node {node.name or node.op_type} holds a subgraph")
        new = [n for n in node.input if n in sizes and n not in used]
        extra = sum(sizes[n] for n in new)
        if slices[-1] and weight + extra > budget:
            slices.append([])
            used, weight = set(), 0
            new = [n for n in node.input if n in sizes]
            extra = sum(sizes[n] for n in set(new))
        slices[-1].append(index)
        used.update(new)
        weight += extra
    return [s for s in slices if s]


def _slice_model(model, nodes: list, inputs: dict[str, np.ndarray], outputs: list[str]):
    import onnx
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    needed = {n for node in nodes for n in node.input if n in inits}
    sub = helper.make_graph(
        nodes, "slice",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), None)
         for name, arr in inputs.items()],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [inits[n] for n in sorted(needed)])
    out = helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _typed_feeds(graph, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` in the graph's input dtypes (e.g. int64 token ids)."""
    from onnx import helper

    feeds = {}
    for inp in graph.input:
        if inp.name not in batch:
            raise UsageError(f"ONNX input {inp.name!r} is missing from the comparison batch ({', '.join(batch)})")
        arr = np.asarray(batch[inp.name])
        want = np.dtype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        feeds[inp.name] = arr.astype(want) if arr.dtype != want else arr
    return feeds


def run_sliced(onnx_path, batches: Sequence[Mapping[str, np.ndarray]], budget: int = 256 << 20,
               threads: int | None = None) -> list[list[np.ndarray]]:
    """The graph's outputs on each of ``batches`` (arrays by input name, cast to the inputs' dtypes), computed
    slice by slice (see the module docstring). Raises :class:`NotSliceable` for graphs it cannot slice."""
    with weightless_graph(onnx_path) as (model, folder):
        return _run(model, slices=plan_slices(model.graph, budget), batches=batches, folder=folder,
                    threads=threads)


@contextmanager
def weightless_graph(onnx_path):
    """``(model, folder)``: the graph at ``onnx_path`` with every weight of 64 KiB or more left on disk as external
    data in ``folder`` (the graph's own for a graph with external data, else a scratch folder removed on exit), so
    this process holds none of them and ONNX Runtime reads them from disk (:func:`external_session`)."""
    import tempfile

    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)  # external weights stay on disk until a session reads them
    with tempfile.TemporaryDirectory(prefix="permcompile-weights-") as scratch:
        if _has_external(model.graph):
            folder = path.parent.resolve()
        else:
            folder = _externalize_(model.graph, Path(scratch))
            # cleared fields keep their memory in the message's arena: a fresh parse of the now small graph
            # lets the old message (and the weights' bytes) go
            small = onnx.ModelProto()
            small.ParseFromString(model.SerializeToString())
            model = None
            gc.collect()
            model = small
        yield model, folder


def external_session(model, folder: Path, threads: int | None = None):
    """A low-memory ONNX Runtime session of ``model`` (a small proto) whose external weights lie in ``folder``."""
    import onnxruntime as ort

    opts = session_options(low_memory=True, threads=threads)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def _has_external(graph) -> bool:
    return any(i.data_location == i.EXTERNAL for i in graph.initializer)


def _externalize_(graph, folder: Path, min_bytes: int = 1 << 16) -> Path:
    """Write every inline initializer of at least ``min_bytes`` to ``folder/weights.bin`` and leave an external
    reference in its place (the in-memory bytes are released). Returns ``folder``."""
    offset = 0
    with open(folder / "weights.bin", "wb") as f:
        for init in graph.initializer:
            if init.data_location == init.EXTERNAL or not init.raw_data or len(init.raw_data) < min_bytes:
                continue
            data = init.raw_data
            f.write(data)
            init.ClearField("raw_data")
            point_external(init, "weights.bin", offset, len(data))
            offset += len(data)
            del data
    return folder


def _run(model, slices, batches, folder: Path, threads) -> list[list[np.ndarray]]:
    graph = model.graph
    graph_outputs = [o.name for o in graph.output]
    # the last slice that reads each value: after it, the value is dropped
    last_use: dict[str, int] = {}
    for k, idx in enumerate(slices):
        for i in idx:
            for name in graph.node[i].input:
                if name:
                    last_use[name] = k
    for name in graph_outputs:
        last_use[name] = len(slices)
    initializers = {i.name for i in graph.initializer}
    envs = [_typed_feeds(graph, b) for b in batches]
    for k, idx in enumerate(slices):
        nodes = [graph.node[i] for i in idx]
        produced = [o for node in nodes for o in node.output if o]
        made = set(produced)
        reads = []
        for node in nodes:
            for name in node.input:
                if name and name not in initializers and name not in made and name not in reads:
                    reads.append(name)
        keep = [o for o in produced if last_use.get(o, -1) > k]
        sub = _slice_model(model, nodes, {n: envs[0][n] for n in reads}, keep)
        session = external_session(sub, folder, threads)
        del sub
        for env in envs:
            values = session.run(keep, {n: env[n] for n in reads})
            env.update(zip(keep, values))
            for name in [n for n in env if last_use.get(n, -1) <= k]:
                del env[name]
        del session
        gc.collect()
    return [[env[name] for name in graph_outputs] for env in envs]


__all__ = ["NotSliceable", "external_session", "plan_slices", "run_sliced", "weightless_graph"]
