"""Explicit quantization of an exported graph: Q/DQ around every quantized MatMul/Gemm.

Why a rewrite of the exported graph instead of tracing fake-quant ops: TensorRT (and ONNX Runtime) recognise
quantized layers by the ``QuantizeLinear``/``DequantizeLinear`` pattern with constant scales, and the weights
must be stored as 8-bit codes for the engine to take them as such. ``export_onnx(quant_plan=...)`` runs
:func:`rewrite_qdq` after naming the initializers and before writing the file, one weight at a time, so the
export holds no second copy of the weights. For each layer of a :class:`QuantPlan`:

* its float weight initializer (found by parameter FQN, ``export/onnx_names.py``) becomes an INT8 /
  FLOAT8E4M3FN initializer of the same name and orientation holding the codes (2:4 zeros are code 0), plus
  ``<name>_scale`` ([out], the graph's float type) and ``<name>_zero_point`` ([out] zeros);
  ``DequantizeLinear(axis = output-channel axis)`` feeds what the weight fed before;
* the op's activation input goes through ``QuantizeLinear → DequantizeLinear`` with the layer's static
  per-tensor scale (one pair per activation and scale, shared by siblings such as q/k/v).

The codes are recovered from the exported float values (the quantize pass left every weight at exactly
``code × scale``) and checked: a value off the grid is a bug, not something to round away. The default opset
becomes at least 19 (FP8 types in Q/DQ).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import OnnxExportError
from ..math.quant import from_codes, to_codes
from .onnx_graph import iter_weight_uses, onnx_initializer_for_param
from .onnx_write import _stream_key, point_external

QDQ_OPSET = 19
_META_KEY = "permcompile.quantization"


def _float_type(init) -> int:
    import onnx

    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise OnnxExportError(f"{init.name}: cannot quantize a {onnx.TensorProto.DataType.Name(init.data_type)} "
                              "weight (fp32 or fp16 expected)")
    return init.data_type


def _np_float(data_type: int):
    import onnx

    return np.float16 if data_type == onnx.TensorProto.FLOAT16 else np.float32


def _codes_tensor(name: str, codes: torch.Tensor, fmt):
    import onnx

    if fmt.is_float:
        raw = codes.contiguous().view(torch.uint8).numpy().tobytes()
        return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, list(codes.shape), raw, raw=True)
    return onnx.numpy_helper.from_array(codes.contiguous().numpy(), name)


def _zero_point(name: str, size: int | None, fmt):
    import onnx

    dims = [] if size is None else [size]
    n = 1 if size is None else size
    if fmt.is_float:
        return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, dims, bytes(n), raw=True)
    return onnx.numpy_helper.from_array(np.zeros(dims, dtype=np.int8), name)


def weight_codes(arr: np.ndarray, k_axis: int, scale: torch.Tensor, fmt, name: str = "") -> torch.Tensor:
    """The codes of a stored 2-D weight ``arr`` (K along ``k_axis``) on per-output-channel ``scale``, in the
    stored orientation. Raises when a value is off the grid by more than half-precision rounding of the export
    (a wrong code is at least one grid step away: ≥ 1/127 of the value for INT8, ≥ 1/16 for FP8)."""
    w = torch.from_numpy(np.array(arr, dtype=np.float32))
    wk = w if k_axis == 1 else w.t()
    if wk.shape[0] != scale.numel():
        raise OnnxExportError(f"{name}: {wk.shape[0]} output channels but {scale.numel()} scales")
    s = scale.float().reshape(-1, 1)
    q = to_codes(wk, s, fmt)
    dq = from_codes(q, s)
    off = (dq - wk).abs() > torch.maximum(dq.abs(), s.expand_as(dq)) * 2.0 ** -8
    if bool(off.any()):
        raise OnnxExportError(f"{name}: {int(off.sum())} weights are not on their quantization grid (max error "
                              f"{float((dq - wk).abs().max()):.3g}); the quantize pass did not run on this weight")
    return q if k_axis == 1 else q.t()


def _codes_array(codes: torch.Tensor) -> np.ndarray:
    """The bytes ONNX stores for ``codes``: int8 as is, float8 as its uint8 bit patterns."""
    codes = codes.contiguous()
    return (codes.view(torch.uint8) if codes.dtype.is_floating_point else codes).numpy()


def _code_type(fmt) -> int:
    import onnx

    return onnx.TensorProto.FLOAT8E4M3FN if fmt.is_float else onnx.TensorProto.INT8


_COPY_CHUNK = 64 << 20


class _InitializerData:
    """Reads a float initializer and swaps in its codes wherever its bytes live, without a second copy of
    the weights in memory (the rewrite runs inside the export, next to the model):

    * in the proto (``raw_data``): read and replaced there;
    * a payload streamed by :func:`~permcompile.export.onnx_write.write_model_streaming`: the payload
      becomes a function computing the codes, called as the file is written;
    * an external data file under ``folder``: read at its offset, the codes appended to a new data file;
      :meth:`close` copies the other external tensors after them and puts the new file in place.
    """

    def __init__(self, proto, payloads=None, folder: Path | None = None):
        self.proto = proto
        self.payloads = payloads if payloads is not None else {}
        self.folder = None if folder is None else Path(folder)
        self._out = None  # (final path, temporary path, open file) once an external tensor is rewritten
        self._written: set[str] = set()

    @staticmethod
    def _external(init) -> dict[str, str]:
        return {e.key: e.value for e in init.external_data} if init.data_location == init.EXTERNAL else {}

    def read(self, init) -> np.ndarray:
        from onnx import numpy_helper

        key = _stream_key(init)
        if key is not None:
            return np.asarray(self.payloads[key]).reshape(tuple(init.dims))
        ext = self._external(init)
        if not ext:
            return numpy_helper.to_array(init)
        if self.folder is None:
            raise OnnxExportError(f"{init.name}: its data is in an external file but no folder was given")
        count = int(np.prod(init.dims))
        arr = np.fromfile(self.folder / ext["location"], dtype=_np_float(init.data_type), count=count,
                          offset=int(ext.get("offset", 0)))
        if arr.size != count:
            raise OnnxExportError(f"{init.name}: its external data file {ext['location']} is truncated")
        return arr.reshape(tuple(init.dims))

    def replace(self, init, codes_of: Callable[[], torch.Tensor], fmt) -> None:
        """Make ``init`` hold ``codes_of()`` (same shape and orientation) as INT8 / FLOAT8E4M3FN codes."""
        key = _stream_key(init)
        if key is not None:
            self.payloads[key] = lambda: _codes_array(codes_of())
            init.data_type = _code_type(fmt)
        elif self._external(init):
            raw = _codes_array(codes_of())
            final, _, f = self._open(init)
            offset = f.tell()
            f.write(memoryview(raw.reshape(-1)).cast("B"))
            init.data_type = _code_type(fmt)
            point_external(init, final.name, offset, raw.nbytes)
            self._written.add(init.name)
        else:
            init.CopyFrom(_codes_tensor(init.name, codes_of(), fmt))

    def _open(self, init):
        if self._out is None:
            final = self.folder / self._external(init)["location"]
            tmp = final.with_name(final.name + ".qdq")
            self._out = (final, tmp, open(tmp, "wb"))
        return self._out

    def discard(self) -> None:
        """Drop a half-written data file (the rewrite failed)."""
        if self._out is not None:
            _, tmp, f = self._out
            self._out = None
            f.close()
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Copy the external tensors not rewritten into the new data file and put it in place of the old."""
        if self._out is None:
            return
        final, tmp, f = self._out
        self._out = None
        old = set()
        try:
            with f:
                for init in self.proto.graph.initializer:
                    ext = self._external(init)
                    if not ext or init.name in self._written:
                        continue
                    old.add(ext["location"])
                    offset, length = int(ext.get("offset", 0)), int(ext["length"])
                    start = f.tell()
                    with open(self.folder / ext["location"], "rb") as src:
                        src.seek(offset)
                        left = length
                        while left:
                            chunk = src.read(min(left, _COPY_CHUNK))
                            if not chunk:
                                raise OnnxExportError(f"{init.name}: its external data file is truncated")
                            f.write(chunk)
                            left -= len(chunk)
                    point_external(init, final.name, start, length)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(final)
        for name in old - {final.name}:
            (self.folder / name).unlink(missing_ok=True)


def rewrite_qdq(proto, plan, initializer_map: dict | None = None, payloads: dict | None = None,
                folder: str | Path | None = None) -> dict:
    """Rewrite ``proto`` in place per ``plan``; returns ``{param: {"initializer", "nodes", "channel_axis"}}``
    for every quantized weight. The weights may be in the proto, in ``payloads`` (streamed on write, see
    ``export/onnx_write.py``) or in external data files under ``folder`` (rewritten here)."""
    import onnx
    from onnx import helper, numpy_helper

    fmt = plan.fmt
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, list] = {}
    for use in iter_weight_uses(proto):
        uses.setdefault(use.init, []).append(use)
    out: dict[str, dict] = {}
    new_inits = []
    dq_nodes: dict[str, object] = {}  # weight initializer -> its DequantizeLinear
    renamed: dict[str, str] = {}
    act_for_node: dict[str, tuple[str, float, int]] = {}  # consumer node -> (activation, scale, float type)
    data = _InitializerData(proto, payloads, folder)
    try:
        for name, lp in plan.layers.items():
            init_name = (initializer_map or {}).get(lp.param) or onnx_initializer_for_param(proto, lp.param)
            if init_name is None or init_name not in inits or init_name not in uses:
                raise OnnxExportError(f"{lp.param}: no MatMul/Gemm weight initializer found in the graph to quantize")
            init = inits[init_name]
            if len(init.dims) != 2:
                raise OnnxExportError(f"{init_name}: a {len(init.dims)}-D weight cannot be quantized per channel")
            k_axes = {u.k_axis for u in uses[init_name]}
            if len(k_axes) != 1:
                raise OnnxExportError(f"{init_name}: used with different reduction axes")
            k_axis = k_axes.pop()
            ftype = _float_type(init)
            # streamed payloads are coded (and checked) as the file is written: no codes held for all layers
            data.replace(init, lambda arr=data.read(init), k=k_axis, s=lp.weight_scale, n=init_name:
                         weight_codes(arr, k, s, fmt, n), fmt)
            channel_axis = 1 - k_axis
            scale_name, zp_name, dq_out = f"{init_name}_scale", f"{init_name}_zero_point", f"{init_name}_dequantized"
            new_inits.append(numpy_helper.from_array(lp.weight_scale.numpy().astype(_np_float(ftype)), scale_name))
            new_inits.append(_zero_point(zp_name, lp.weight_scale.numpy().size, fmt))
            dq_nodes[init_name] = helper.make_node("DequantizeLinear", [init_name, scale_name, zp_name], [dq_out],
                                                   name=f"{init_name}_DequantizeLinear", axis=channel_axis)
            renamed[init_name] = dq_out
            for u in uses[init_name]:
                act_for_node[u.node] = (lp.input_scale, ftype)
            out[lp.param] = {"initializer": init_name, "nodes": sorted(u.node for u in uses[init_name]),
                             "channel_axis": channel_axis}
    except BaseException:
        data.discard()
        raise
    data.close()
    graph.initializer.extend(new_inits)

    nodes = list(graph.node)
    pairs: dict[tuple[str, float], str] = {}
    # each weight's DequantizeLinear goes right before its first reader, not at the top: a graph run slice by slice
    # (export/ort_chunks.py) would otherwise carry every dequantized weight from the first slice to the last
    rebuilt = []
    for node in nodes:
        for i, x in enumerate(node.input):
            if x in renamed:
                if x in dq_nodes:
                    rebuilt.append(dq_nodes.pop(x))
                node.input[i] = renamed[x]
        if node.name in act_for_node:
            scale, ftype = act_for_node[node.name]
            x = node.input[0]
            key = (x, scale)
            if key not in pairs:
                tag = f"{x}_q{len(pairs)}"
                s_name, z_name = f"{tag}_scale", f"{tag}_zero_point"
                graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=_np_float(ftype)), s_name))
                graph.initializer.append(_zero_point(z_name, None, fmt))
                rebuilt.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [f"{tag}_quantized"],
                                                name=f"{tag}_QuantizeLinear"))
                rebuilt.append(helper.make_node("DequantizeLinear", [f"{tag}_quantized", s_name, z_name],
                                                [f"{tag}_dequantized"], name=f"{tag}_DequantizeLinear"))
                pairs[key] = f"{tag}_dequantized"
            node.input[0] = pairs[key]
        rebuilt.append(node)
    if dq_nodes:
        raise OnnxExportError(f"no node reads the quantized weight {next(iter(dq_nodes))}")
    del graph.node[:]
    graph.node.extend(rebuilt)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
            opset.version = QDQ_OPSET
    proto.ir_version = max(proto.ir_version, 9)  # float8 types
    meta = {p.key: p for p in proto.metadata_props}
    if _META_KEY in meta:
        meta[_META_KEY].value = plan.mode
    else:
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, _META_KEY: plan.mode})
    return out


__all__ = ["rewrite_qdq", "weight_codes", "QDQ_OPSET"]
