"""Naming an exported graph's weights after the torch parameters they carry, and its dynamic axes.

The exporter names a constant-folded ``W^T`` anonymously (``val_76``) and a wrapper's weight after the
wrapper's FQN; :func:`_postprocess` renames every such initializer to the inner model's parameter FQN
after checking, value by value, that it holds that parameter (possibly transposed).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .onnx_graph import _fx_placeholders, _META_WRAPPER, _param_from_metadata, iter_weight_uses
from .onnx_trace import WRAPPER_PREFIX
from .onnx_write import _stream_key

def _rename_values(graph, renames: Mapping[str, str]) -> None:
    """Apply ``renames`` (old -> new) to every reference in ``graph`` and nested subgraphs, in one pass."""
    import onnx

    if not renames:
        return
    for init in graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_values(a.g, renames)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _rename_values(g, renames)
    for vi in list(graph.value_info) + list(graph.input):
        if vi.name in renames:
            vi.name = renames[vi.name]


def _postprocess(proto, model: nn.Module, axes: dict[str, dict[int, str]], check_values: bool,
                 payloads: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, str], list[str]]:
    """Name initializers after torch FQNs, name dynamic axes, and return (param -> initializer map, warnings)."""
    from onnx import numpy_helper

    graph = proto.graph
    notes: list[str] = []
    prefix = WRAPPER_PREFIX
    # name_scopes metadata still carry the wrapper's "model." prefix: record it for iter_weight_uses
    proto.metadata_props.add(key=_META_WRAPPER, value=prefix)

    named = dict(model.named_parameters(remove_duplicate=False))
    named_all = {**named, **dict(model.named_buffers(remove_duplicate=False))}
    placeholder = {"p_" + (prefix + fqn).replace(".", "_"): fqn for fqn in named}
    inits = {i.name: i for i in graph.initializer}

    # 1) strip the wrapper prefix from initializers that are plain parameters/buffers
    protected = {o.name for o in graph.output}  # never rename a graph output
    names = set(inits)
    renames: dict[str, str] = {}
    for name in inits:
        new = name[len(prefix):] if name.startswith(prefix) else None
        if new and new in named_all and new not in names and name not in protected:
            renames[name] = new
            names.discard(name)
            names.add(new)
    _rename_values(graph, renames)
    inits = {i.name: i for i in graph.initializer}

    # 2) name MatMul/Gemm weights after the parameter they hold
    def values_match(init, param: Tensor) -> bool:
        if not check_values:
            return tuple(init.dims) in (tuple(param.shape), tuple(param.shape[::-1]))
        key = _stream_key(init)
        arr = payloads[key] if payloads and key is not None else numpy_helper.to_array(init)
        ref = param.detach().cpu()
        ref = ref.to(torch.float32 if ref.dtype == torch.bfloat16 else ref.dtype).numpy().astype(arr.dtype, copy=False)
        if arr.shape == ref.shape and np.array_equal(arr, ref):
            return True
        return ref.ndim == 2 and arr.shape == ref.T.shape and np.array_equal(arr, ref.T)

    nodes = {n.name: n for n in graph.node}
    names = set(inits)
    renames = {}
    mapping: dict[str, str] = {}
    for use in list(iter_weight_uses(proto)):
        node = nodes[use.node]
        candidates = []
        guess = _param_from_metadata(node, prefix)
        if guess:
            candidates.append(guess)
        candidates += [placeholder[p] for p in _fx_placeholders(node) if p in placeholder]
        init = inits.get(use.init)
        if init is None or use.init in renames or use.init in protected:
            continue  # a Constant node, an initializer already named, or a graph output
        for fqn in dict.fromkeys(candidates):
            param = named.get(fqn)
            if param is None or param.dim() != 2 or fqn in mapping or not values_match(init, param):
                continue
            current = use.init
            if current != fqn:
                new = fqn if fqn not in names else f"{fqn}.T"
                while new in names:
                    new += "_"
                renames[current] = new
                names.discard(current)
                names.add(new)
                current = new
            mapping[fqn] = current
            break
        else:
            if candidates and not any(c in mapping for c in candidates):
                notes.append(f"could not match ONNX weight {use.init} of {use.node} to a parameter")
    _rename_values(graph, renames)

    # tied parameters: every alias of a mapped parameter maps to the same initializer
    by_id: dict[int, list[str]] = {}
    for fqn, p in named.items():
        by_id.setdefault(id(p), []).append(fqn)
    for fqn, init_name in list(mapping.items()):
        for alias in by_id.get(id(named[fqn]), []):
            mapping.setdefault(alias, init_name)

    # 3) name the dynamic axes on inputs and outputs
    for vi in graph.input:
        for ax, label in axes.get(vi.name, {}).items():
            dims = vi.type.tensor_type.shape.dim
            if ax < len(dims):
                if dims[ax].HasField("dim_value"):
                    notes.append(f"input {vi.name} axis {ax} was exported static ({dims[ax].dim_value})")
                else:
                    dims[ax].dim_param = label
    return mapping, notes
