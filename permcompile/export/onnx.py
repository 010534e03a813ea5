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

This module runs the export; each concern lives in a sibling module and its public names stay importable
from here: ``onnx_trace`` (the wrapper and ``torch.onnx.export``), ``onnx_names`` (initializers renamed
after their parameters, dynamic axes), ``onnx_graph`` (reading initializer/parameter links and I/O specs),
``onnx_fp16`` (the fp16 graph converter), ``onnx_prefetch`` (tracing in a forked process) and ``onnx_write``
(saving, and the streaming protobuf writer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch import Tensor, nn

from ..errors import OnnxExportError, PermcompileError
from .onnx_fp16 import convert_to_fp16
from .onnx_graph import TensorSpec, WeightUse, iter_weight_uses, onnx_io_specs
from .onnx_names import _postprocess
from .onnx_prefetch import GraphPrefetch
from .onnx_trace import (WRAPPER_PREFIX, ExportWrapper, _check_args, _one_line, _trace, default_forward_kwargs,
                         main_output)
from .onnx_write import _detach_payloads, _save, write_model_streaming

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
_MIN_OPSET = 18


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
    quantized: dict[str, dict] | None = None  # param -> Q/DQ rewrite record (export/onnx_qdq.py), when quantized


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


def export_onnx(model: nn.Module, example_kwargs: Mapping[str, Tensor], path: str | Path, precision: str = "fp32",
                forward_kwargs: Mapping[str, Any] | None = None, *, fp16_method: str = "auto",
                external_data: bool | None = None, opset: int | None = None,
                optimize: str = "fast", prefetched: "GraphPrefetch | None" = None,
                consume: bool = False, quant_plan=None) -> OnnxExportInfo:
    """Export ``model`` to ``path`` (see the module docstring). ``model`` itself is not modified, unless
    ``consume``: then a bf16/fp16 model's parameters may be cast to the graph's dtype in place instead of in
    a copy (one copy of the weights in memory, not two), for a caller done with the model.

    ``fp16_method``: "auto" (half export, converter as fallback), "half" or "convert".
    ``external_data``: None decides by size (> 2 GB of weights), True/False forces it.
    ``optimize``: "fast" (default) runs onnxscript's constant folding and clean-up passes but not its
    pattern rewriter, which is quadratic-ish and took ~70% of a 30-layer SmolLM2 export (minutes);
    ONNX Runtime and TensorRT do their own fusions. "full" is torch's default optimizer, "none" skips it.
    ``prefetched``: a :class:`GraphPrefetch` started on this model (same structure, other weights) before
    its weights changed; its graph is reused with ``model``'s current weights bound by name, which skips
    the trace. If it failed or does not fit, the model is traced here as usual (noted in the warnings).
    ``quant_plan``: a :class:`~permcompile.passes.quantize.QuantPlan`; its layers are rewritten to Q/DQ with
    8-bit weight codes (``export/onnx_qdq.py``) before the file is written, one weight at a time.
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
        traced, prefetch_note = prefetched.take(model, list(example_kwargs), precision, fp16_method, optimize, opset,
                                                  in_place=consume)
        lap("prefetch_bind")
        stages.update(prefetched.stages)
        stages["prefetch_bind"] = round(stages["prefetch_bind"] - stages.get("prefetch_wait", 0.0), 3)
    used_prefetch = traced is not None
    if traced is None:
        traced = _trace(model, example_kwargs, precision, forward_kwargs, fp16_method, opset,
                        torch_optimize=(optimize == "full"), in_place=consume)
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
        quantized = None
        if quant_plan is not None:
            from .onnx_qdq import rewrite_qdq

            quantized = rewrite_qdq(proto, quant_plan, mapping, payloads=payloads,
                                    folder=path.parent if use_external else None)
            lap("qdq")
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
        fp16_method=method, warnings=notes, stages=stages, prefetched=used_prefetch, quantized=quantized,
    )


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


