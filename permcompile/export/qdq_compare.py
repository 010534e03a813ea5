"""ONNX Runtime on a Q/DQ graph against the torch fake-quant model, teacher-forced at every quantizer.

Why not simply compare outputs: ONNX Runtime and torch compute each quantizer's input with different float
rounding (summation order, GELU/LayerNorm kernels), so a value near a rounding boundary lands on the neighbouring
code on one side and not on the other. On a real model such a "flip" happens at thousands of activations and,
amplified by later layers, moves the output by far more than the float tolerance (MiniLM INT8: up to 9 % of the
output scale): an output comparison cannot tell a wrong graph from an honest flip. So the graph is run with every
quantizer's output codes as extra outputs, and the torch model consumes exactly those codes (teacher forcing):

* the outputs must then agree within the float graph's own tolerance (1e-4 fp32, 2e-2 fp16): a wrong scale, code,
  axis or wiring shows up there;
* torch's own rounding of each quantizer's input (computed from the forced codes before it) is compared with the
  graph's codes: float rounding can move a code by one grid step and rarely (a flip); any code more than one step
  away, or more than ``MAX_FLIP_SHARE`` of a layer's codes flipped, means the graph computes something else between
  two quantizers (a wrong scale, weight or wiring), which teacher forcing would otherwise hide from the output.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import VerificationError
from ..passes.quantize import fake_quant_model, quant_tolerance
from .checks import DEFAULT_TOLERANCE
from .compare import SLICE_ABOVE_BYTES, compare_outputs, feeds, torch_outputs, weight_bytes
from .onnx_graph import onnx_initializer_for_param
from .ort_chunks import external_session, weightless_graph

MAX_FLIP_SHARE = 0.05


def quantizer_outputs(proto, plan, report: Mapping[str, Any]) -> dict[str, str]:
    """module FQN → the name of the ``QuantizeLinear`` output its op reads (through its DequantizeLinear)."""
    consumers: dict[str, list] = {}
    producer: dict[str, Any] = {}
    for node in proto.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
        for y in node.output:
            producer[y] = node
    names = {e["param"]: e.get("onnx_initializer") for e in report.get("pruned_layers", []) if isinstance(e, Mapping)}
    out: dict[str, str] = {}
    for module, lp in plan.layers.items():
        init = names.get(lp.param) or onnx_initializer_for_param(proto, lp.param)
        frontier = [n for n in consumers.get(init, []) if n.op_type == "DequantizeLinear"]
        for _ in range(3):  # DequantizeLinear (→ Transpose/Cast) → MatMul/Gemm
            ops = [n for f in frontier for n in consumers.get(f.output[0], [])]
            matmuls = [n for n in ops if n.op_type in ("MatMul", "Gemm")]
            if matmuls:
                dq = producer.get(matmuls[0].input[0])
                q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear":
                    out[module] = q.output[0]
                break
            frontier = ops
    return out


def _to_torch_codes(arr: np.ndarray, fmt) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.float8_e4m3fn) if fmt.is_float else t.to(torch.int8)


def forced_compare(onnx_path, model, plan, report: Mapping[str, Any], batches: Sequence[Mapping[str, torch.Tensor]],
                   forward_kwargs: Mapping[str, Any] | None, precision: str):
    """Run the graph (with its quantizer codes as extra outputs) and ``model`` teacher-forced on those codes;
    returns a ``CompareResult`` (the float tolerance of ``precision``) whose ``detail`` gives the flip share. The
    graph is loaded whole: callers use it for graphs below the sliced-verification threshold."""
    start = time.perf_counter()
    refs, detail, ok, outs = _forced_refs(onnx_path, model, plan, report, batches, forward_kwargs, with_outputs=True)
    result = compare_outputs(refs, outs, precision, DEFAULT_TOLERANCE[precision])
    result.seconds = time.perf_counter() - start
    result.detail = detail
    result.passed = result.passed and ok
    return result


# a value computed in the graph's float type may differ from torch's by a few units of its last place of the
# largest magnitudes summed; 64 units of full scale is generous, and far below what a wrong scale, weight or wiring
# moves a quantizer's input by
ROUNDING_SLACK = {"fp32": 64 * 2.0 ** -24, "fp16": 64 * 2.0 ** -11}


def _forced_refs(onnx_path, model, plan, report, batches, forward_kwargs, with_outputs: bool = False):
    """Teacher-forced references: ``(refs, detail, ok)`` (and the graph's outputs with ``with_outputs``)."""
    import onnx

    # the graph's weights stay on disk (ONNX Runtime reads them from there): loading them here and serialising the
    # tapped graph again held the weights three times beside the model (SmolLM2 FP8: verify 2.52 GiB, 1.58 every
    # other step)
    proto, folder = weightless_graph(onnx_path)
    taps = quantizer_outputs(proto, plan, report)
    want = getattr(onnx.TensorProto, plan.fmt.onnx_type)
    present = {o.name for o in proto.graph.output}
    for name in sorted(set(taps.values()) - present):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, want, None))
    session = external_session(proto, folder)
    del proto
    out_names = [o.name for o in session.get_outputs()]
    outs, codes = [], []
    for batch in batches:
        values = dict(zip(out_names, session.run(None, feeds(session, batch))))
        outs.append(values[out_names[0]])
        codes.append({m: _to_torch_codes(values[n], plan.fmt) for m, n in taps.items()})
        del values
    del session
    refs, flips = [], {}
    for batch, forced in zip(batches, codes):
        with fake_quant_model(model, plan, forced=forced, flips=flips, slack=ROUNDING_SLACK[plan.precision]):
            refs += torch_outputs(model, [batch], forward_kwargs)
    differ = sum(v[0] for v in flips.values())
    total = sum(v[1] for v in flips.values())
    share = differ / total if total else 0.0
    worst = max(flips.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1), default=(None, [0, 1, 0]))
    worst_share = worst[1][0] / max(worst[1][1], 1)
    far = {m: v[2] for m, v in flips.items() if v[2]}
    missing = sorted(set(plan.layers) - set(flips))
    ok = not missing and not far and worst_share <= MAX_FLIP_SHARE
    detail = (f"teacher-forced at {len(flips)}/{len(plan.layers)} quantized layers; {share:.3%} of {total} activation "
              f"codes differ from torch's own rounding (flips; most in one layer {worst_share:.2%})")
    if missing:
        detail += f"; no quantizer of the graph feeds {', '.join(missing[:3])}"
    if far:
        name, count = next(iter(far.items()))
        detail += (f"; {sum(far.values())} codes farther away than rounding explains (first {name}: {count}): the "
                   "graph computes something else before that quantizer")
    elif worst_share > MAX_FLIP_SHARE:
        detail += f" (more than {MAX_FLIP_SHARE:.0%} in {worst[0]}: the graph quantizes something else)"
    return (refs, detail, ok, outs) if with_outputs else (refs, detail, ok)


def reference_outputs(onnx_path, model, plan, report: Mapping[str, Any], batches, forward_kwargs, precision: str,
                      tol: float | None):
    """``(references, tolerance, detail)`` to compare ONNX Runtime's outputs with: ``model``'s own outputs without
    a plan; with one, its outputs teacher-forced on the graph's quantizer codes (:func:`forced_compare`) and the float
    tolerance of ``precision``, or, for a graph too large to hold beside the model, the fake-quant outputs and the
    tolerance derived from the grid step (``passes.quantize.quant_tolerance``). Raises ``VerificationError`` when
    the graph's codes are not what the model would quantize (flips above ``MAX_FLIP_SHARE``) or a quantizer is
    missing."""
    if plan is None:
        return torch_outputs(model, batches, forward_kwargs), tol, ""
    if not small_enough(onnx_path):
        with fake_quant_model(model, plan):
            refs = torch_outputs(model, batches, forward_kwargs)
        return (refs, tol if tol is not None else quant_tolerance(plan, precision, DEFAULT_TOLERANCE[precision]),
                "fake-quant reference (graph too large to teacher-force beside the model)")
    refs, detail, ok = _forced_refs(onnx_path, model, plan, report, batches, forward_kwargs)
    if not ok:
        raise VerificationError(detail)
    return refs, tol if tol is not None else DEFAULT_TOLERANCE[precision], detail


def small_enough(onnx_path) -> bool:
    """Below the size verification slices at: the graph and the torch model may be held together."""
    return weight_bytes(Path(onnx_path)) <= SLICE_ABOVE_BYTES


__all__ = ["forced_compare", "reference_outputs", "quantizer_outputs", "small_enough", "MAX_FLIP_SHARE"]
