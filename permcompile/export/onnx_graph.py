"""Reading an exported ONNX graph: which initializer carries which torch parameter, and the I/O specs.

The exporter stores ``pkg.torch.onnx.name_scopes`` / ``pkg.torch.onnx.fx_node`` metadata on each node;
:func:`iter_weight_uses` reads it to find the parameter behind every MatMul/Gemm weight (ours, or the
wrapper's FQN), which export (initializer renaming), verification and Triton/TensorRT configs rely on.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import UsageError, VerificationError

_META_WRAPPER = "permcompile.wrapper_prefix"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``dtype`` is a numpy dtype name, ``shape`` ints or axis names."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dims(self) -> list[int]:
        """Shape with every symbolic/unknown axis as -1 (Triton style)."""
        return [d if isinstance(d, int) and d >= 0 else -1 for d in self.shape]


@dataclass(frozen=True)
class WeightUse:
    """A constant weight feeding a MatMul (input B) or Gemm (input B), possibly through Transpose/Cast.

    ``k_axis`` is the axis *of the stored initializer* that is the reduction (K) axis of the op.
    ``param`` is the torch parameter FQN guessed from the node's exporter metadata (None if unknown).
    """

    init: str
    node: str
    op: str
    k_axis: int
    shape: tuple[int, ...]
    param: str | None
    via: tuple[str, ...]  # op types walked through between the initializer and the op


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _meta(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _param_from_metadata(node, prefix: str = "") -> str | None:
    """Guess the torch weight FQN of a MatMul/Gemm node from the exporter's metadata."""
    meta = _meta(node)
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    fqn = None
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        # [..., '<module fqn>', '<op name>']: the module owning the op is the second to last entry.
        if len(names) >= 2 and names[-2]:
            fqn = f"{names[-2]}.weight"
    if fqn and prefix and fqn.startswith(prefix):
        fqn = fqn[len(prefix):]
    return fqn


def _fx_placeholders(node) -> list[str]:
    """``p_model_layers_0_mlp_up_proj_weight``-style parameter placeholders named in the fx node."""
    text = _meta(node).get("pkg.torch.onnx.fx_node", "")
    args = text.split("args = ", 1)[-1]
    return re.findall(r"%(p_\w+)", args)


def iter_weight_uses(model_proto) -> Iterator[WeightUse]:
    """Every constant weight used as input B of a MatMul or Gemm (through Transpose / Cast / Identity /
    DequantizeLinear).

    K axis: MatMul B of rank r -> axis r-2 (rank-1 B is skipped); Gemm -> axis 1 if transB else 0; a
    Transpose with ``perm`` on the path maps output axis a to input axis ``perm[a]``.
    """
    import onnx

    graph = model_proto.graph
    prefix = _meta(model_proto).get(_META_WRAPPER, "")
    shapes: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in graph.initializer}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                shapes[node.output[0]] = tuple(value.dims)
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        cur = node.input[1]
        via: list[str] = []
        rank = None
        perms: list[list[int]] = []
        ok = True
        while cur not in shapes:
            prod = producer.get(cur)
            if prod is None:
                ok = False
                break
            if prod.op_type == "Transpose":
                perms.append(list(_attr(prod, "perm", []) or []))
            elif prod.op_type not in ("Cast", "Identity", "DequantizeLinear"):  # DQ: N:M is read on the codes
                ok = False
                break
            via.append(prod.op_type)
            cur = prod.input[0]
        if not ok:
            continue
        shape = shapes[cur]
        rank = len(shape)
        if rank < 2:
            continue
        if node.op_type == "MatMul":
            axis = rank - 2
        else:
            axis = 1 if _attr(node, "transB", 0) else 0
        # walk back from the op's view through each Transpose (nearest the op first)
        for perm in perms:
            if not perm:
                perm = list(range(rank))[::-1]
            axis = perm[axis]
        yield WeightUse(init=cur, node=node.name, op=node.op_type, k_axis=axis, shape=shape,
                        param=_param_from_metadata(node, prefix), via=tuple(via))


def _np_dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # noqa: BLE001 - exotic types (bfloat16, float8)
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_spec(value_info) -> TensorSpec:
    t = value_info.type.tensor_type
    shape: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or "?")
    return TensorSpec(value_info.name, _np_dtype_name(t.elem_type), tuple(shape))


def onnx_io_specs(path_or_proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs of an ONNX file or ModelProto."""
    import onnx

    proto = path_or_proto
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_proto), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [_value_spec(v) for v in proto.graph.input if v.name not in inits]
    outputs = [_value_spec(v) for v in proto.graph.output]
    return inputs, outputs


def load_onnx(path_or_model, external_data: bool = True):
    """``path_or_model`` as a ModelProto (returned as is when it already is one); a missing file is a
    :class:`UsageError`, an unreadable one a :class:`VerificationError`."""
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    try:
        return onnx.load(str(path_or_model), load_external_data=external_data)
    except FileNotFoundError:
        raise UsageError(f"ONNX file not found: {path_or_model}") from None
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"cannot read ONNX file {path_or_model}: {exc}".splitlines()[0]) from exc


def onnx_initializer_for_param(onnx_model, fqn: str) -> str | None:
    """The ONNX initializer holding torch parameter ``fqn`` as a MatMul/Gemm weight, or None.

    Tried in order: an initializer named exactly ``fqn`` (what :func:`export_onnx` writes), one whose
    name ends with ``"." + fqn`` (raw torch exports keep the wrapper's prefix, e.g. GPT-2 Gemm weights),
    and finally the exporter's node metadata (``name_scopes`` module path, ``fx_node`` placeholder
    ``p_<fqn with _>``), which also finds anonymous, constant-folded ``val_NN`` weights.
    """
    model = load_onnx(onnx_model) if not hasattr(onnx_model, "graph") else onnx_model
    uses = list(iter_weight_uses(model))
    used = {u.init for u in uses}
    if fqn in used:
        return fqn
    suffix = [u.init for u in uses if u.init.endswith("." + fqn)]
    if len(set(suffix)) == 1:
        return suffix[0]
    hits = [u.init for u in uses if u.param and (u.param == fqn or u.param.endswith("." + fqn))]
    if len(set(hits)) == 1:
        return hits[0]
    token = fqn.replace(".", "_")
    nodes = {node.name: node for node in model.graph.node}
    hits = [u.init for u in uses
            if any(p == "p_" + token or p.endswith("_" + token) for p in _fx_placeholders(nodes[u.node]))]
    if len(set(hits)) == 1:
        return hits[0]
    return None
