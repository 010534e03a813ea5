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
(If, Loop) are not sliced (:class:`NotSliceable`). A MatMul weight above half the budget (the vocabulary head)
runs as column pieces (:func:`split_wide_matmuls_`), and the weights are never read by this process: a
single-file graph's are referenced in place (``onnx_write.load_weightless``). What slicing bought at the 1B
block shape (``--update none``, benchmarks/results/memory_scaling_update_none_sliced.md): 16 layers peak at
3.75 GiB, against 6.29 GiB with the whole-graph session (memory_scaling_update_none_depth.md, where
verification set every depth's peak).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import UsageError
from .onnx_write import load_weightless
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


def plan_slices(graph, budget: int, pieces: Mapping[str, int] | None = None) -> list[list[int]]:
    """Node indices of each slice: consecutive nodes, a new slice once the weights read reach ``budget``
    (``pieces``: bytes of the weight pieces of :func:`split_wide_matmuls_`, which count as weights)."""
    from onnx import AttributeProto

    sizes = {i.name: _nbytes(i) for i in graph.initializer} | dict(pieces or {})
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


@dataclass(frozen=True)
class WeightPiece:
    """Columns ``[start, stop)`` of the ``[K, N]`` right-hand side of a MatMul, read from ``init``'s external data
    (``transposed``: ``init`` is ``[N, K]`` and the graph transposed it; the piece is its rows, transposed)."""
    init: str
    start: int
    stop: int
    transposed: bool
    shape: tuple[int, int]  # init's
    dtype: np.dtype
    location: str
    offset: int

    @property
    def nbytes(self) -> int:
        other = self.shape[1] if self.transposed else self.shape[0]
        return (self.stop - self.start) * other * self.dtype.itemsize

    def load(self, folder: Path) -> np.ndarray:
        from ..safepath import resolve_inside

        # the location comes from the graph (verify reads graphs somebody else made): never outside its folder
        data = np.memmap(resolve_inside(folder, self.location, "external data"), dtype=self.dtype, mode="r",
                         offset=self.offset, shape=self.shape)
        part = data[self.start:self.stop].T if self.transposed else data[:, self.start:self.stop]
        out = np.ascontiguousarray(part)
        del data
        return out


def split_wide_matmuls_(graph, limit: int) -> dict[str, WeightPiece]:
    """Cut each MatMul whose right-hand side is a 2-D external initializer of more than ``limit`` bytes (or
    ``Transpose(perm=[1, 0])`` of one that only this MatMul reads) into MatMuls on column pieces of at most
    ``limit`` bytes, joined by a Concat; returns the pieces by the input name they get.

    Why: the largest single weight of an LLM is its vocabulary head (Llama-3.2-1B: 128k x 2048, 0.5 GB in fp16),
    and the CPU provider casts an fp16 MatMul weight to fp32 whole (1 GB more); a tied head also goes through a
    Transpose whose output a slice would carry for every batch. As pieces, each in its own slice, the head costs
    one piece and its fp32 cast. Each output column is the same dot product as before (test_ort_slices.py)."""
    from onnx import helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    pieces: dict[str, WeightPiece] = {}
    nodes, dropped = [], set()
    for node in graph.node:
        found = _wide_rhs(node, inits, producer, readers, limit) if node.op_type == "MatMul" else None
        if found is None:
            nodes.append(node)
            continue
        init, transposed, transpose_node = found
        if transpose_node is not None:
            dropped.add(id(transpose_node))
        rows, cols = (int(d) for d in init.dims)
        n = rows if transposed else cols
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        per_column = (cols if transposed else rows) * dtype.itemsize
        step = max(1, limit // per_column)
        where = {e.key: e.value for e in init.external_data}
        outs = []
        for k, start in enumerate(range(0, n, step)):
            name = f"{init.name}__piece{k}"
            pieces[name] = WeightPiece(init.name, start, min(n, start + step), transposed, (rows, cols), dtype,
                                       where["location"], int(where.get("offset", 0)))
            outs.append(f"{node.output[0]}__piece{k}")
            nodes.append(helper.make_node("MatMul", [node.input[0], name], [outs[-1]], name=f"{node.name}__piece{k}"))
        nodes.append(helper.make_node("Concat", outs, [node.output[0]], name=f"{node.name}__concat", axis=-1))
    if pieces:
        kept = [n for n in nodes if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return pieces


# what numpy reads natively (a bf16 or 8-bit weight stays whole)
_PIECE_TYPES = {1, 10, 11}  # TensorProto FLOAT, FLOAT16, DOUBLE


def _wide_rhs(node, inits, producer, readers, limit):
    """``(initializer, transposed, transpose node or None)`` when ``node``'s right-hand side is a wide weight."""
    rhs, transposed, via = node.input[1], False, None
    if rhs not in inits and rhs in producer and producer[rhs].op_type == "Transpose" and readers.get(rhs) == 1:
        via = producer[rhs]
        perm = next((list(a.ints) for a in via.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            return None
        rhs, transposed = via.input[0], True
    init = inits.get(rhs)
    if (init is None or len(init.dims) != 2 or init.data_location != init.EXTERNAL or _nbytes(init) <= limit
            or init.data_type not in _PIECE_TYPES):
        return None
    return init, transposed, via


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
    model, folder = weightless_graph(onnx_path)
    pieces = split_wide_matmuls_(model.graph, limit=budget // 2)
    sizes = {name: piece.nbytes for name, piece in pieces.items()}
    return _run(model, slices=plan_slices(model.graph, budget, sizes), batches=batches, folder=folder,
                threads=threads, pieces=pieces)


def weightless_graph(onnx_path):
    """``(model, folder)``: the graph at ``onnx_path`` with every weight of 64 KiB or more left on disk as external
    data in ``folder`` (the graph's own: inline weights are referenced inside the ``.onnx`` file itself, see
    ``onnx_write.load_weightless``), so this process holds none of them and ONNX Runtime reads them from disk
    (:func:`external_session`)."""
    path = Path(onnx_path)
    return load_weightless(path), path.parent.resolve()


def external_session(model, folder: Path, threads: int | None = None):
    """A low-memory ONNX Runtime session of ``model`` (a small proto) whose external weights lie in ``folder``."""
    import onnxruntime as ort

    opts = session_options(low_memory=True, threads=threads)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(model, slices, batches, folder: Path, threads, pieces: Mapping[str, WeightPiece] | None = None
         ) -> list[list[np.ndarray]]:
    pieces = pieces or {}
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
        weights = {n: pieces[n].load(folder) for n in reads if n in pieces}  # fed as inputs, never carried
        sub = _slice_model(model, nodes, {n: weights[n] if n in weights else envs[0][n] for n in reads}, keep)
        session = external_session(sub, folder, threads)
        del sub
        for env in envs:
            values = session.run(keep, {n: weights[n] if n in weights else env[n] for n in reads})
            env.update(zip(keep, values))
            for name in [n for n in env if last_use.get(n, -1) <= k]:
                del env[name]
        del session, weights
        gc.collect()
    return [[env[name] for name in graph_outputs] for env in envs]


__all__ = ["NotSliceable", "WeightPiece", "external_session", "plan_slices", "run_sliced", "split_wide_matmuls_",
           "weightless_graph"]
