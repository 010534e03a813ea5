"""Export a (permuted, pruned) model to ONNX with ``torch.onnx.export(..., dynamo=True)``.

What ``export_onnx`` produces
-----------------------------
* One graph input per example kwarg (same names, same order), one output: the model's main tensor
  (``logits`` when the model returns them, else ``last_hidden_state``, else the first output).
* Dynamic axes: dim 0 ("batch") of every input; dim 1 ("seq") of every integer input of rank >= 2
  (token ids, masks, token types, positions). Image inputs get a dynamic batch only.
* Weight initializers are named after the torch parameter whose values they carry. torch 2.13's exporter
  turns ``nn.Linear`` on 3-D activations into ``MatMul(x, W^T)`` and its optimizer constant-folds the
  transpose into an *anonymous* ``[K, N]`` initializer (``val_76``); linear on 2-D activations becomes
  ``Gemm(transB=1)`` with the ``[N, K]`` parameter; GPT-2's ``Conv1D`` (``addmm``) becomes
  ``Gemm(transB=0)`` with the ``[K, N]`` parameter, named after the wrapper's FQN (``model.h.0...``).
  We rename every such initializer to the inner model's parameter FQN (``model.layers.0.mlp.down_proj.weight``)
  after checking, value by value, that it really holds that parameter (possibly transposed), using the
  ``pkg.torch.onnx.name_scopes`` / ``pkg.torch.onnx.fx_node`` metadata the exporter stores on each node.
  :attr:`OnnxExportInfo.initializer_map` records param FQN -> initializer name.
* FP16: the model is deep-copied with its parameters cast to fp16 (buffers such as RoPE ``inv_freq`` stay
  fp32) and exported directly ("half" method). This keeps the model's own mixed precision (Llama's RMSNorm
  and RoPE run in fp32 in torch, and so they do in the graph) and ONNX Runtime's CPU provider runs the
  result (checked for Llama, GPT-2, BERT, ViT, MiniLM). Float inputs
  (``pixel_values``) stay fp32 at the graph boundary and are cast inside the graph; the output is fp16.
  If the half export fails, we fall back to exporting fp32 and converting the graph with
  :func:`convert_to_fp16` (all float tensors become fp16; float inputs stay fp32 via a Cast; outputs fp16).
* A bf16/fp16 model (a half-precision checkpoint kept in its dtype) is traced from a copy with its
  parameters in the graph's dtype: fp16 for FP16 (bf16 -> fp16 is exact within fp16's range), fp32 for FP32.
  A model already in the graph's dtype is traced as it is (no copy).
* Weights go to an external data file (``<name>.data``) only when they exceed 2 GB (protobuf's limit).
"""
from __future__ import annotations

import ast
import copy
import inspect
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import PermcompileError, UsageError
from ..modelio import main_output as _main_output
from ..modelio import main_output_name

__all__ = [
    "OnnxExportError",
    "OnnxExportInfo",
    "TensorSpec",
    "WeightUse",
    "ExportWrapper",
    "export_onnx",
    "GraphPrefetch",
    "convert_to_fp16",
    "iter_weight_uses",
    "onnx_io_specs",
    "main_output",
    "default_forward_kwargs",
    "EXTERNAL_DATA_THRESHOLD",
    "WRAPPER_PREFIX",
]

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights above which they go to an external file
WRAPPER_PREFIX = "model."  # the export wrapper holds the user's model as ``self.model``
_META_WRAPPER = "permcompile.wrapper_prefix"
_MIN_OPSET = 18
_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                "decoder_attention_mask"}


class OnnxExportError(PermcompileError):
    """The model could not be exported to ONNX (or the exported graph is unusable)."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``dtype`` is a numpy dtype name, ``shape`` ints or axis names."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dims(self) -> list[int]:
        """Shape with every symbolic/unknown axis as -1 (Triton style)."""
        return [d if isinstance(d, int) and d >= 0 else -1 for d in self.shape]


@dataclass
class OnnxExportInfo:
    path: Path
    precision: str
    opset: int
    input_names: list[str]
    output_name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[int, str]]
    initializer_map: dict[str, str]  # torch parameter FQN -> ONNX initializer name (MatMul/Gemm weights)
    export_seconds: float
    size_bytes: int  # model file + external data
    external_data: bool
    fp16_method: str | None = None  # "half" or "convert" for fp16 exports
    warnings: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per export stage
    prefetched: bool = False  # the graph was traced ahead of time (GraphPrefetch)


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


# --------------------------------------------------------------------------------------------------
# Wrapper around the user's model
# --------------------------------------------------------------------------------------------------
def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _has_var_kwargs(fn) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def default_forward_kwargs(model: nn.Module, forward_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``use_cache=False`` / ``return_dict=True`` where the model takes them, then the caller's kwargs."""
    out: dict[str, Any] = {}
    is_hf = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
    var_kw = _has_var_kwargs(model.forward)
    for key, value in (("use_cache", False), ("return_dict", True)):
        if _accepts(model.forward, key) or (is_hf and var_kw and key == "return_dict"):
            out[key] = value
    out.update(dict(forward_kwargs or {}))
    return out


def main_output(out: Any) -> Tensor:
    """The model's main tensor (:func:`permcompile.modelio.main_output`), as an export error when there is none."""
    try:
        return _main_output(out)
    except ValueError as exc:
        raise OnnxExportError(str(exc)) from None


def _output_name(out: Any) -> str:
    try:
        return main_output_name(out)
    except ValueError:
        return "output"


class ExportWrapper(nn.Module):
    """Calls ``model(**dict(zip(names, args)), **forward_kwargs)`` and returns the main tensor.

    Positional ``*args`` (not ``**kwargs``) because ``torch.export`` only accepts ``dynamic_shapes`` keyed
    by the forward's parameter names. Float inputs are cast to ``float_dtype`` (fp16 export) inside the
    graph, so clients keep sending fp32 images.
    """

    def __init__(self, model: nn.Module, names: list[str], forward_kwargs: Mapping[str, Any] | None = None,
                 float_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model  # attribute name must match WRAPPER_PREFIX
        self.names = list(names)
        self.forward_kwargs = default_forward_kwargs(model, forward_kwargs)
        self.float_dtype = float_dtype
        # plain modules such as nn.Sequential take their inputs positionally
        self.positional = not _has_var_kwargs(model.forward) and not all(_accepts(model.forward, n) for n in names)

    def raw(self, *args: Tensor) -> Any:
        """The model's unmodified output."""
        if self.float_dtype is not None:
            args = tuple(a.to(self.float_dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        if self.positional:
            return self.model(*args, **self.forward_kwargs)
        return self.model(**dict(zip(self.names, args)), **self.forward_kwargs)

    def forward(self, *args: Tensor) -> Tensor:
        return main_output(self.raw(*args))


# --------------------------------------------------------------------------------------------------
# Graph helpers (shared with verify.py)
# --------------------------------------------------------------------------------------------------
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
    """Every constant weight used as input B of a MatMul or Gemm (through Transpose / Cast / Identity).

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
            elif prod.op_type not in ("Cast", "Identity"):
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


# --------------------------------------------------------------------------------------------------
# FP16 converter (fallback when exporting a .half() model fails)
# --------------------------------------------------------------------------------------------------
def convert_to_fp16(model_proto, keep_float_inputs: bool = True, keep_float_outputs: bool = False):
    """Convert every float32 tensor of an ONNX graph to float16, in place, and return the model.

    Initializers, Constant / ConstantOfShape values, ``Cast(to=FLOAT)`` targets, value_info, and graph
    inputs / outputs are all rewritten. With ``keep_float_inputs`` a float32 graph input stays float32 and
    is cast to fp16 right after entering the graph; likewise ``keep_float_outputs`` appends a Cast back to
    float32. Subgraphs (If / Loop / Scan bodies) are converted too. Unlike a ``.half()`` export this
    computes reductions (norm variances, softmax) in fp16 too, hence only a fallback.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

    def conv_tensor(t: TensorProto) -> TensorProto:
        if t.data_type != FLOAT:
            return t
        arr = numpy_helper.to_array(t)
        # clamp finite values to fp16's range (finfo(float32).min masks would otherwise become -inf)
        arr = np.where(np.isfinite(arr), np.clip(arr, -65504.0, 65504.0), arr).astype(np.float16)
        new = numpy_helper.from_array(arr, t.name)
        t.CopyFrom(new)
        return t

    def conv_type(tp) -> None:
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type == FLOAT:
            tp.tensor_type.elem_type = HALF
        elif tp.HasField("sequence_type"):
            conv_type(tp.sequence_type.elem_type)
        elif tp.HasField("optional_type"):
            conv_type(tp.optional_type.elem_type)

    def conv_graph(graph, top: bool) -> None:
        for init in graph.initializer:
            conv_tensor(init)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.type == onnx.AttributeProto.TENSORS:
                    for t in a.tensors:
                        conv_tensor(t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    conv_graph(a.g, False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        conv_graph(g, False)
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = HALF  # Cast(to=FLOAT), EyeLike/Random*(dtype=FLOAT)
        for vi in graph.value_info:
            conv_type(vi.type)
        if not top:
            for vi in list(graph.input) + list(graph.output):
                conv_type(vi.type)
            return
        new_nodes = []
        for vi in graph.input:
            if vi.type.tensor_type.elem_type != FLOAT:
                continue
            if keep_float_inputs:
                inner = f"{vi.name}__fp16"
                for node in graph.node:
                    for i, name in enumerate(node.input):
                        if name == vi.name:
                            node.input[i] = inner
                new_nodes.append(helper.make_node("Cast", [vi.name], [inner], to=HALF, name=f"{vi.name}__cast_fp16"))
            else:
                conv_type(vi.type)
        for node in reversed(new_nodes):
            graph.node.insert(0, node)
        for vi in graph.output:
            if vi.type.tensor_type.elem_type != FLOAT:
                continue
            if keep_float_outputs:
                inner = f"{vi.name}__fp16"
                for node in graph.node:
                    for i, name in enumerate(node.output):
                        if name == vi.name:
                            node.output[i] = inner
                    for i, name in enumerate(node.input):
                        if name == vi.name:
                            node.input[i] = inner
                graph.node.append(helper.make_node("Cast", [inner], [vi.name], to=FLOAT, name=f"{vi.name}__cast_fp32"))
            else:
                conv_type(vi.type)

    conv_graph(model_proto.graph, True)
    for func in model_proto.functions:
        for node in func.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = HALF
    return model_proto


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    """A one-line summary of an exporter error (torch's messages are multi-page)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line[:300]


def _dynamic_spec(name: str, tensor: Tensor) -> dict[int, str]:
    axes = {0: "batch"} if tensor.dim() >= 1 else {}
    if tensor.dim() >= 2 and (name in _TEXT_INPUTS or not tensor.is_floating_point()):
        axes[1] = "seq"
    return axes


def _grow_examples(example: dict[str, Tensor], axes: dict[str, dict[int, str]]) -> dict[str, Tensor]:
    """torch.export specialises dimensions of size 0/1: repeat such dynamic dims up to 2."""
    out = {}
    for name, t in example.items():
        for ax in axes.get(name, {}):
            if t.shape[ax] < 2:
                reps = [1] * t.dim()
                reps[ax] = 2
                t = t.repeat(*reps)
        out[name] = t
    return out


def _model_bytes(model: nn.Module, itemsize: int | None) -> int:
    """Bytes of weights the graph will hold, with float tensors at ``itemsize`` bytes.

    A tied parameter counts once per use: the exporter folds the LM head's transpose into a second,
    anonymous initializer next to the embedding's, and a single-file model past protobuf's 2 GiB is unreadable.
    """
    seen: set[int] = set()
    total = 0
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    for i, t in enumerate(tensors + list(model.buffers())):
        if id(t) in seen and i >= len(tensors):  # buffers once; parameters once per owner
            continue
        seen.add(id(t))
        total += t.numel() * (itemsize if (itemsize and t.is_floating_point()) else t.element_size())
    return total


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


@dataclass
class _Traced:
    """A traced (not yet optimised or saved) ONNX program and what is needed to finish it."""

    program: Any  # torch.onnx.ONNXProgram
    module: nn.Module  # the module whose parameters the program holds (the model or its fp16 copy)
    names: list[str]
    axes: dict[str, dict[int, str]]
    out_name: str
    method: str | None
    notes: list[str]


def _check_args(model: nn.Module, example_kwargs, precision: str, fp16_method: str, optimize: str) -> None:
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if optimize not in ("fast", "full", "none"):
        raise UsageError(f"unknown optimize mode {optimize!r}; choose fast, full or none")
    if fp16_method not in ("auto", "half", "convert"):
        raise UsageError(f"unknown fp16 method {fp16_method!r}; choose auto, half or convert")
    if not example_kwargs or not all(isinstance(v, Tensor) for v in example_kwargs.values()):
        raise UsageError("ONNX export needs example inputs: a non-empty dict of tensors")


def _trace(model: nn.Module, example_kwargs: Mapping[str, Tensor], precision: str,
           forward_kwargs: Mapping[str, Any] | None, fp16_method: str, opset: int | None,
           torch_optimize: bool) -> _Traced:
    """Run ``torch.onnx.export`` (the slow part: torch.export, decompositions, translation)."""
    names = list(example_kwargs)
    axes = {n: _dynamic_spec(n, t) for n, t in example_kwargs.items()}
    example = _grow_examples({n: t.detach().cpu() for n, t in example_kwargs.items()}, axes)
    was_training = model.training
    model.eval()
    notes: list[str] = []
    method = None
    if precision == "fp16":
        method = "convert" if fp16_method == "convert" else "half"

    with torch.no_grad():
        probe = ExportWrapper(model, names, forward_kwargs)
        try:
            out_name = _output_name(probe.raw(*(example[n] for n in names)))
        except Exception as exc:  # noqa: BLE001
            raise OnnxExportError(f"the model does not run on the example inputs: {_one_line(exc)}") from exc

    def run_export(m: nn.Module, float_dtype) -> Any:
        wrapper = ExportWrapper(m, names, forward_kwargs, float_dtype=float_dtype).eval()
        dims = {label: torch.export.Dim(label) for label in ("batch", "seq")}
        dyn = tuple({ax: dims[label] for ax, label in axes[n].items()} for n in names)
        kwargs = dict(dynamo=True, input_names=names, output_names=[out_name], verbose=False,
                      optimize=torch_optimize)
        if opset is not None:
            kwargs["opset_version"] = opset
        with warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            try:
                return torch.onnx.export(wrapper, tuple(example[n] for n in names), dynamic_shapes=(dyn,), **kwargs)
            except Exception as exc:  # noqa: BLE001
                text = str(exc).lower()
                if not any(k in text for k in ("constraint", "dynamic_shapes", "specializ", "guard")):
                    raise
                # the named dims were refused (e.g. a range or relation torch inferred): let torch decide
                auto = tuple({ax: torch.export.Dim.AUTO for ax in axes[n]} for n in names)
                return torch.onnx.export(wrapper, tuple(example[n] for n in names), dynamic_shapes=(auto,), **kwargs)

    exported_module: nn.Module = model
    program = None
    try:
        if method == "half":
            try:
                half = _export_module(model, method)
                program = run_export(half, torch.float16)
                exported_module = half
            except Exception as exc:  # noqa: BLE001
                if fp16_method == "half":
                    raise
                notes.append(f"fp16 export of the .half() model failed ({_one_line(exc)}); converted the fp32 graph")
                method = "convert"
        if program is None:
            exported_module = _export_module(model, method)
            program = run_export(exported_module, None)
    except OnnxExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"ONNX export failed: {_one_line(exc)}") from exc
    finally:
        model.train(was_training)
    return _Traced(program, exported_module, names, axes, out_name, method, notes)


def export_onnx(model: nn.Module, example_kwargs: Mapping[str, Tensor], path: str | Path, precision: str = "fp32",
                forward_kwargs: Mapping[str, Any] | None = None, *, fp16_method: str = "auto",
                external_data: bool | None = None, opset: int | None = None,
                optimize: str = "fast", prefetched: "GraphPrefetch | None" = None) -> OnnxExportInfo:
    """Export ``model`` to ``path`` (see the module docstring). ``model`` itself is not modified.

    ``fp16_method``: "auto" (half export, converter as fallback), "half" or "convert".
    ``external_data``: None decides by size (> 2 GB of weights), True/False forces it.
    ``optimize``: "fast" (default) runs onnxscript's constant folding and clean-up passes but not its
    pattern rewriter, which is quadratic-ish and took ~70% of a 30-layer SmolLM2 export (minutes);
    ONNX Runtime and TensorRT do their own fusions. "full" is torch's default optimizer, "none" skips it.
    ``prefetched``: a :class:`GraphPrefetch` started on this model (same structure, other weights) before
    its weights changed; its graph is reused with ``model``'s current weights bound by name, which skips
    the trace. If it failed or does not fit, the model is traced here as usual (noted in the warnings).
    """
    import onnx

    _check_args(model, example_kwargs, precision, fp16_method, optimize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    itemsize = 2 if precision == "fp16" else 4  # the graph's float dtype, whatever the model's
    use_external = (external_data if external_data is not None
                    else _model_bytes(model, itemsize) > EXTERNAL_DATA_THRESHOLD)

    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(stages.get(name, 0.0) + now - clock[0], 3)
        clock[0] = now

    traced = None
    prefetch_note = None
    if prefetched is not None:
        traced, prefetch_note = prefetched.take(model, list(example_kwargs), precision, fp16_method, optimize, opset)
        lap("prefetch_bind")
        stages.update(prefetched.stages)
        stages["prefetch_bind"] = round(stages["prefetch_bind"] - stages.get("prefetch_wait", 0.0), 3)
    used_prefetch = traced is not None
    if traced is None:
        traced = _trace(model, example_kwargs, precision, forward_kwargs, fp16_method, opset,
                        torch_optimize=(optimize == "full"))
        lap("trace")
    notes = list(traced.notes) + ([prefetch_note] if prefetch_note else [])
    program, method, axes = traced.program, traced.method, traced.axes

    if optimize == "fast":
        try:
            _fast_optimize(program.model)
        except Exception as exc:  # noqa: BLE001 - private onnxscript API moved: use the full optimizer
            notes.append(f"fast ONNX optimisation unavailable ({_one_line(exc)}); used the full optimizer")
            program.optimize()
    lap("optimize")
    try:
        if path.exists():
            path.unlink()
        data_file = path.with_name(path.name + ".data")
        if data_file.exists():
            data_file.unlink()
        payloads: dict[str, np.ndarray] = {}
        if use_external:
            program.save(str(path), external_data=True)
            proto = onnx.load(str(path), load_external_data=False)
        else:  # serialise in memory, large weights left out of protobuf (see write_model_streaming)
            import onnx_ir as ir

            if method != "convert":
                payloads = _detach_payloads(program.model)
            proto = ir.serde.serialize_model(program.model)
        lap("serialize")
        if method == "convert":
            if use_external:
                onnx.load_external_data_for_model(proto, str(path.parent))
            convert_to_fp16(proto)
        mapping, more = _postprocess(proto, traced.module, axes, check_values=not use_external, payloads=payloads)
        notes += more
        lap("postprocess")
        if payloads:
            write_model_streaming(proto, path, payloads)
        else:
            _save(proto, path, use_external and method == "convert")
        lap("save")
    except PermcompileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"could not write the ONNX file {path}: {_one_line(exc)}") from exc

    opset_found = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset_found < _MIN_OPSET:
        raise OnnxExportError(f"exported ONNX has opset {opset_found}; need at least {_MIN_OPSET}")
    inputs, outputs = onnx_io_specs(proto)
    size = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size
                                  if path.with_name(path.name + ".data").exists() else 0)
    return OnnxExportInfo(
        path=path, precision=precision, opset=opset_found, input_names=traced.names, output_name=traced.out_name,
        inputs=inputs, outputs=outputs, dynamic_axes=axes, initializer_map=mapping,
        export_seconds=time.perf_counter() - start, size_bytes=size, external_data=bool(use_external),
        fp16_method=method, warnings=notes, stages=stages, prefetched=used_prefetch,
    )


# --------------------------------------------------------------------------------------------------
# Tracing ahead of time
# --------------------------------------------------------------------------------------------------
class GraphPrefetch:
    """Trace a model's ONNX graph in a forked process while the parent changes the model's weights.

    Why: the trace (torch.export, decompositions, translation) is most of an export's cost, yet the
    graph does not depend on weight values, and permcompile never changes a model's structure (folding
    and masking only rewrite weights). So ``optimize`` starts the trace right after loading, in a child
    process (fork: the child sees the loaded model without copying it), and binds the final weights by
    name when it is time to export. The child saves the unoptimised graph to ``workdir`` with a data-less
    reference in place of every initializer that is a parameter or buffer of the model; the parent binds
    the model's current tensor to each of them. Anything unexpected (no ``fork`` on this platform, a failed
    child, a name or shape that does not match) makes :meth:`take` return ``None`` with a reason, and the
    export traces the model itself; the numerical checks after export cover the result either way.
    """

    def __init__(self, model: nn.Module, example_kwargs: Mapping[str, Tensor], precision: str = "fp32",
                 forward_kwargs: Mapping[str, Any] | None = None, *, workdir: str | Path,
                 fp16_method: str = "auto", opset: int | None = None):
        import multiprocessing as mp

        _check_args(model, example_kwargs, precision, fp16_method, "fast")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.precision, self.fp16_method, self.opset = precision, fp16_method, opset
        self.names = list(example_kwargs)
        self.process = None
        self.error: str | None = None
        self.stages: dict[str, float] = {}
        if "fork" not in mp.get_all_start_methods():
            self.error = "this platform cannot fork"
            return
        ctx = mp.get_context("fork")
        # one core for the child: an oversubscribed OpenMP pool spin-waits and slows both processes down
        self._threads = torch.get_num_threads()
        if self._threads > 1:
            torch.set_num_threads(self._threads - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Python 3.12+ warns about fork with threads alive
            self.process = ctx.Process(target=_prefetch_child, name="permcompile-onnx-trace", daemon=True,
                                       args=(model, dict(example_kwargs), precision, forward_kwargs, fp16_method,
                                             opset, str(self.workdir)))
            self.process.start()

    def cancel(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None
        self._restore_threads()

    def _restore_threads(self) -> None:
        threads = getattr(self, "_threads", None)
        if threads:
            torch.set_num_threads(threads)
            self._threads = None

    def take(self, model: nn.Module, names: list[str], precision: str, fp16_method: str, optimize: str,
             opset: int | None) -> tuple[_Traced | None, str | None]:
        """Wait for the child and bind ``model``'s weights; (None, reason) if the graph cannot be used."""
        try:
            return self._take(model, names, precision, fp16_method, optimize, opset)
        except Exception as exc:  # noqa: BLE001 - any surprise: trace in the parent instead
            return None, f"traced again: prefetched graph unusable ({_one_line(exc)})"
        finally:
            self.cancel()

    def _take(self, model, names, precision, fp16_method, optimize, opset):
        import json

        if (names, precision, fp16_method, opset) != (self.names, self.precision, self.fp16_method, self.opset) \
                or optimize == "full":
            return None, "traced again: export options differ from the prefetched graph's"
        if self.process is None:
            return None, f"traced again: no prefetched graph ({self.error})"
        waited = time.perf_counter()
        self.process.join()
        self.stages["prefetch_wait"] = round(time.perf_counter() - waited, 3)
        self._restore_threads()
        meta_file = self.workdir / "meta.json"
        if self.process.exitcode != 0 or not meta_file.is_file():
            err = self.workdir / "error.txt"
            why = err.read_text().strip() if err.is_file() else f"exit code {self.process.exitcode}"
            return None, f"traced again: the prefetch failed ({why[:300]})"
        meta = json.loads(meta_file.read_text())
        import onnx_ir as ir

        ir_model = ir.load(str(self.workdir / "graph.onnx"))
        module = _export_module(model, meta["method"])
        wrapper = ExportWrapper(module, names, None)
        state = dict(wrapper.named_parameters(remove_duplicate=False))
        state.update(dict(wrapper.named_buffers(remove_duplicate=False)))
        inits = ir_model.graph.initializers
        bound = {}
        for name in meta["state_initializers"]:
            tensor = state.get(name)
            value = inits.get(name)
            if tensor is None or value is None:
                return None, f"traced again: {name} is missing from the model or the prefetched graph"
            if tuple(value.shape) != tuple(tensor.shape) or str(value.dtype) != meta["dtypes"][name]:
                return None, f"traced again: {name} changed shape or dtype since the prefetch"
            bound[name] = tensor.detach()
        extra = [n for n in inits if n in state and n not in bound]
        if extra:
            return None, f"traced again: unexpected initializers {extra[:3]}"
        program = torch.onnx.ONNXProgram(ir_model, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program.apply_weights(bound)
        axes = {n: {int(k): v for k, v in ax.items()} for n, ax in meta["axes"].items()}
        return _Traced(program, module, names, axes, meta["out_name"], meta["method"], meta["notes"]), None


def _prefetch_child(model, example_kwargs, precision, forward_kwargs, fp16_method, opset, workdir) -> None:
    """Body of the prefetch process: trace, save the graph (parameters as data-less references) and meta.json."""
    import json
    import os
    import sys

    workdir = Path(workdir)
    code = 0
    try:
        torch.set_num_threads(1)  # the parent keeps computing meanwhile
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        traced = _trace(model, example_kwargs, precision, forward_kwargs, fp16_method, opset, torch_optimize=False)
        wrapper = ExportWrapper(traced.module, traced.names, None)
        state = {n for n, _ in wrapper.named_parameters(remove_duplicate=False)}
        state |= {n for n, _ in wrapper.named_buffers(remove_duplicate=False)}
        import onnx_ir as ir

        inits = traced.program.model.graph.initializers
        names = sorted(n for n in inits if n in state)
        dtypes = {n: str(inits[n].dtype) for n in names}
        for n in names:  # the parent binds its own tensors: save only a data-less reference for these
            t = inits[n].const_value
            inits[n].const_value = ir.ExternalTensor(_STREAM_MARK + n, offset=0, length=t.nbytes, dtype=t.dtype,
                                                     shape=t.shape, name=n)
        ir.save(traced.program.model, str(workdir / "graph.onnx"))
        meta = {"out_name": traced.out_name, "method": traced.method, "notes": traced.notes,
                "axes": traced.axes, "state_initializers": names, "dtypes": dtypes}
        (workdir / "meta.json.tmp").write_text(json.dumps(meta))
        os.replace(workdir / "meta.json.tmp", workdir / "meta.json")
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent through a file
        try:
            (workdir / "error.txt").write_text(f"{type(exc).__name__}: {_one_line(exc)}")
        except Exception:  # noqa: BLE001
            pass
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _fast_optimize(model) -> None:
    """onnxscript's ``optimize_ir`` without the pattern-rewrite pass (in place on an ``onnx_ir.Model``)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as folding

    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                folding.FoldConstantsPass(shape_inference=True,
                                          input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                          output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def _export_module(model: nn.Module, method: str | None) -> nn.Module:
    """The module a graph is traced from: an fp16 copy for the "half" method; otherwise the model itself, or
    an fp32 copy of a bf16/fp16 model (an fp32 graph, or the fp32 graph the "convert" method starts from)."""
    from ..dtypes import is_half

    if method == "half":
        return _half_copy(model)
    return _cast_copy(model, torch.float32) if is_half(model) else model


def _half_copy(model: nn.Module) -> nn.Module:
    """:func:`_cast_copy` to fp16."""
    return _cast_copy(model, torch.float16)


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy with every floating *parameter* in ``dtype``; buffers keep their dtype.

    Buffers such as rotary ``inv_freq`` stay fp32 (the model computes RoPE in fp32 from them; rounding
    them to fp16 shifts high positions' phases). ``nn.Module``'s own casting is not used because transformers'
    ``PreTrainedModel.half`` refuses models loaded from quantized checkpoints (GGUF). The cast parameters are
    handed to ``deepcopy`` up front, so the original weights are never copied first (peak: the model plus
    the cast copy). A model already in ``dtype`` is returned itself: nothing to copy.
    """
    if not any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        return model.eval()
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for param in model.parameters():  # tied parameters appear once: they stay shared in the copy
            if param.is_floating_point() and param.dtype != dtype:
                memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    cast = copy.deepcopy(model, memo)
    if hasattr(cast, "config") and hasattr(cast.config, "dtype"):
        try:
            cast.config.dtype = dtype
        except Exception:  # noqa: BLE001
            pass
    return cast.eval()


def _save(proto, path: Path, rewrite_external: bool) -> None:
    import onnx

    if rewrite_external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        # Tensors loaded with load_external_data=False keep their external references untouched.
        onnx.save_model(proto, str(path))


_BIG_PAYLOAD = 1 << 16
_STREAM_MARK = "permcompile-stream:"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _detach_payloads(ir_model) -> dict[str, np.ndarray]:
    """Swap every large initializer of an ``onnx_ir`` model for a placeholder; return key -> array.

    The placeholders serialise as external-data references whose location is ``permcompile-stream:<key>``;
    :func:`write_model_streaming` writes the arrays in their place. Arrays are views where possible
    (a torch parameter's memory), so nothing large is copied.
    """
    import onnx_ir as ir

    payloads: dict[str, np.ndarray] = {}
    for value in ir_model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < _BIG_PAYLOAD:
            continue
        arr = np.ascontiguousarray(tensor.numpy())
        if arr.dtype.byteorder == ">":  # ONNX raw data is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        key = str(len(payloads))
        payloads[key] = arr
        value.const_value = ir.ExternalTensor(_STREAM_MARK + key, offset=0, length=arr.nbytes, dtype=tensor.dtype,
                                              shape=tensor.shape, name=tensor.name or value.name)
    return payloads


def _stream_key(init) -> str | None:
    if init.data_location != init.EXTERNAL:
        return None
    for entry in init.external_data:
        if entry.key == "location" and entry.value.startswith(_STREAM_MARK):
            return entry.value[len(_STREAM_MARK):]
    return None


def write_model_streaming(proto, path: str | Path, payloads: Mapping[str, np.ndarray]) -> None:
    """Write ``proto`` whose large initializers are placeholders (see :func:`_detach_payloads`).

    Why: protobuf's serialiser copies bytes fields at ~130 MB/s here (4 s for SmolLM2's 540 MB, plus as
    much again to build the message). A protobuf message is the concatenation of its fields, and a
    singular message field that occurs twice is merged by every parser, so the file is written as: the
    model without the placeholder initializers, then one ``graph { initializer { <header> raw_data:
    <payload> } }`` fragment per placeholder, the payload written straight from the array's memory.
    Parsers read back an ordinary single-file model (those initializers come last in the list).
    """
    import onnx

    head = onnx.ModelProto()
    head.CopyFrom(proto)  # small: placeholders carry no data
    streamed = []
    kept = []
    for init in head.graph.initializer:
        key = _stream_key(init)
        if key is None:
            kept.append(init)
            continue
        header = onnx.TensorProto()
        header.CopyFrom(init)
        header.ClearField("external_data")
        header.ClearField("data_location")
        streamed.append((header.SerializeToString(), payloads[key]))
    del head.graph.initializer[:]  # (re-adding the kept ones keeps their order)
    head.graph.initializer.extend(kept)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        for header, arr in streamed:
            size = arr.nbytes
            raw_tag = b"\x4a" + _varint(size)  # TensorProto.raw_data = 9, length-delimited
            tensor_len = len(header) + len(raw_tag) + size
            init_tag = b"\x2a" + _varint(tensor_len)  # GraphProto.initializer = 5
            f.write(b"\x3a" + _varint(len(init_tag) + tensor_len))  # ModelProto.graph = 7
            f.write(init_tag)
            f.write(header)
            f.write(raw_tag)
            f.write(memoryview(arr.reshape(-1)).cast("B"))


class _quiet_loggers:
    """Silence the exporter's progress chatter (it logs through ``logging`` and ``print``)."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                     "torch.fx.experimental.symbolic_shapes"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
