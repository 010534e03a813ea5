"""Checks of a quantized output (``--quantize``): the plan, and the Q/DQ graph against it.

``verify`` (``export/verify.py``) calls these besides its own checks: N:M is checked there on the 8-bit codes
(its weight walk looks through ``DequantizeLinear``), and ONNX Runtime is compared there with the reloaded
``hf/`` model run through :func:`permcompile.passes.quantize.fake_quant_model` under
:func:`permcompile.passes.quantize.quant_tolerance`. Here: ``quantization.json`` parses, every scale in it is
finite and positive, and every quantized layer of ``model.onnx`` stores its weight as codes of the plan's type
with the plan's weight and input scales in its ``DequantizeLinear``/``QuantizeLinear`` nodes; and ``hf/`` is the
compressed-tensors checkpoint of the plan (:func:`hf_check`; ``export/hf_compressed.py`` writes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import UsageError
from ..passes.quantize import QuantPlan, quant_tolerance
from ..safepath import read_json
from .checks import DEFAULT_TOLERANCE, Check, aggregate
from .hf_compressed import CODE_DTYPES, FORMATS, is_compressed, quantized_modules
from .onnx_graph import onnx_initializer_for_param
from .onnx_write import tensor_array

PLAN_FILE = "quantization.json"


def load_plan(out_dir: Path, report: Mapping[str, Any]):
    """``(plan or None, checks)``: None without quantization; a failed check when the plan is missing or bad."""
    path = Path(out_dir) / PLAN_FILE
    if "quantization" not in report and not path.exists():
        return None, []
    if not path.exists():
        return None, [Check("quantization", False, f"report.json records quantization but {PLAN_FILE} is missing")]
    try:
        plan = QuantPlan.from_json(read_json(path, PLAN_FILE))
    except (UsageError, OSError, ValueError, KeyError, TypeError) as exc:
        return None, [Check("quantization", False, f"{PLAN_FILE}: {str(exc).splitlines()[0][:200]}")]
    pruned = {e.get("param") for e in report.get("pruned_layers", []) if isinstance(e, Mapping)}
    missing = sorted(lp.param for lp in plan.layers.values() if lp.param not in pruned)
    if missing or not plan.layers:
        return None, [Check("quantization", False, f"{PLAN_FILE} quantizes no pruned layer" if not plan.layers else
                            f"{PLAN_FILE} names layers that were not pruned: {', '.join(missing[:3])}")]
    recorded = (report.get("quantization") or {}).get("mode")
    if recorded is not None and recorded != plan.mode:
        return None, [Check("quantization", False, f"report.json says {recorded}, {PLAN_FILE} says {plan.mode}")]
    return plan, [Check("quantization", True, f"{plan.mode}: {len(plan.layers)} layers, every scale finite and "
                                              f"positive")]


def _scale_problem(name: str, got, expected) -> str | None:
    """Why the stored scale ``got`` cannot stand for ``expected`` (the plan's), or None: not finite and positive,
    or not bit-equal (in float64, which holds fp32 / fp16 / bf16 scales exactly)."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if not (np.isfinite(got).all() and (got > 0).all()):
        return f"scale {name} is not finite and positive"
    exp = np.asarray(expected, dtype=np.float64).reshape(-1)
    if got.shape != exp.shape or not np.array_equal(got, exp):
        return f"scale {name} differs from {PLAN_FILE}"
    return None


def qdq_check(onnx_model, base_dir, plan, report: Mapping[str, Any], graph_file=None):
    """``onnx_qdq``: each quantized layer's weight is stored as codes of the plan's type behind a
    ``DequantizeLinear`` with the plan's per-channel scales, and each op reading it takes its input through
    ``QuantizeLinear → DequantizeLinear`` with the plan's input scale (finite, positive, bit-equal in the graph's
    float type)."""
    import onnx

    want_type = getattr(onnx.TensorProto, plan.fmt.onnx_type)
    inits = {t.name: t for t in onnx_model.graph.initializer}
    consumers: dict[str, list] = {}
    producer = {}
    for node in onnx_model.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
        for y in node.output:
            producer[y] = node
    names = {e["param"]: e.get("onnx_initializer") for e in report.get("pruned_layers", []) if isinstance(e, Mapping)}

    def array(name):
        t = inits.get(name)
        return None if t is None else tensor_array(t, base_dir, graph_file)

    def scale_ok(name, expected) -> str | None:
        got = array(name)
        return f"scale {name} is not a constant" if got is None else _scale_problem(name, got, expected)

    bad = []
    for lp in plan.layers.values():
        name = names.get(lp.param) or onnx_initializer_for_param(onnx_model, lp.param)
        init = inits.get(name) if name else None
        if init is None:
            bad.append(f"{lp.param}: no weight initializer")
            continue
        if init.data_type != want_type:
            stored = onnx.TensorProto.DataType.Name(init.data_type)
            bad.append(f"{lp.param}: stored as {stored}, not {plan.fmt.onnx_type}")
            continue
        dqs = [n for n in consumers.get(name, []) if n.op_type == "DequantizeLinear" and n.input[0] == name]
        if len(dqs) != 1 or len(consumers.get(name, [])) != 1:
            bad.append(f"{lp.param}: its codes must feed exactly one DequantizeLinear")
            continue
        why = scale_ok(dqs[0].input[1], lp.weight_scale.numpy())
        if why:
            bad.append(f"{lp.param}: {why}")
            continue
        ops = [n for n in consumers.get(dqs[0].output[0], []) if n.op_type in ("MatMul", "Gemm")]
        if not ops:  # through a Transpose/Cast
            ops = [n for mid in consumers.get(dqs[0].output[0], []) for n in consumers.get(mid.output[0], [])
                   if n.op_type in ("MatMul", "Gemm")]
        if not ops:
            bad.append(f"{lp.param}: its dequantized weight feeds no MatMul/Gemm")
            continue
        for op in ops:
            dq = producer.get(op.input[0])
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                bad.append(f"{lp.param}: the input of {op.name} is not quantized")
                break
            why = scale_ok(q.input[1], [lp.input_scale]) or scale_ok(dq.input[1], [lp.input_scale])
            if why:
                bad.append(f"{lp.param}: input {why}")
                break
    return aggregate("onnx_qdq", len(plan.layers), bad,
                      f"{len(plan.layers)} weights stored as {plan.fmt.onnx_type} codes, Q/DQ scales as planned")


def hf_check(hf_dir: Path, plan, report: Mapping[str, Any], reader) -> Check:
    """``hf_quant``: ``hf/`` is the compressed-tensors checkpoint of ``plan`` (``export/hf_compressed.py``):
    config.json's ``quantization_config`` names the plan's format, every planned layer's weight is stored as codes
    of the plan's type with ``weight_scale`` / ``input_scale`` beside it equal to the plan's (finite, positive),
    and no other layer carries scales. N:M of the stored codes is ``hf_nm``'s (it reads the same tensors). A run
    whose layers compressed-tensors cannot hold (GPT-2 Conv1D; report.json says why) keeps dequantized weights,
    and then config.json must not claim a quantization. ``reader(hf_dir)``: ``(tensor names, read by name)``."""
    try:
        bad = _hf_problems(Path(hf_dir), plan, report, reader)
    except Exception as exc:  # noqa: BLE001 - an unreadable or malformed hf/ is a failed check, not a crash
        return Check("hf_quant", False, f"cannot read hf/: {str(exc).splitlines()[0][:200]}")
    if isinstance(bad, Check):
        return bad
    return aggregate("hf_quant", len(plan.layers), bad,
                     f"compressed-tensors {FORMATS[plan.mode][1]}: {len(plan.layers)} weights stored as "
                     f"{plan.fmt.onnx_type} codes, scales as planned")


def _hf_problems(hf_dir: Path, plan, report: Mapping[str, Any], reader) -> list[str] | Check:
    """What :func:`hf_check` finds wrong per layer, or its whole answer where one line says it."""
    config = read_json(hf_dir / "config.json", "hf/config.json")
    keys, read = reader(hf_dir)
    recorded = (report.get("quantization") or {}).get("hf")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    if not is_compressed(config):
        if recorded.get("format") == "compressed-tensors" or quantized_modules(keys):
            return Check("hf_quant", False, "hf/config.json has no compressed-tensors quantization_config")
        why = recorded.get("why") or "written before hf/ held codes"
        return Check("hf_quant", True, f"hf/ holds dequantized weights (code x scale): {why}")
    qc = config["quantization_config"]
    qtype, fmt = FORMATS[plan.mode]
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), Mapping) else {}
    types = {str(g["weights"].get("type")) if isinstance(g, Mapping) and isinstance(g.get("weights"), Mapping)
             else "?" for g in groups.values()}
    if qc.get("format") != fmt or types != {qtype}:
        return Check("hf_quant", False, f"hf/config.json quantizes as {qc.get('format')} ({', '.join(sorted(types))}), "
                                        f"{PLAN_FILE} as {plan.mode}")
    extra = sorted(set(quantized_modules(keys)) - set(plan.layers))
    bad = [f"{m}: quantized in hf/ but not in {PLAN_FILE}" for m in extra]
    want = CODE_DTYPES[plan.mode]
    for name, lp in plan.layers.items():
        codes = read(lp.param)
        if codes is None or codes.dtype != want:
            bad.append(f"{lp.param}: " + ("not in hf/" if codes is None else f"stored as {codes.dtype}, not {want}"))
            continue
        for key, expected in ((f"{name}.weight_scale", lp.weight_scale.numpy()), (f"{name}.input_scale",
                                                                                  [lp.input_scale])):
            got = read(key)
            why = f"scale {key} is missing" if got is None else _scale_problem(key, got.float().numpy(), expected)
            if why:
                bad.append(why)
                break
    return bad


def reference_tolerance(plan, precision: str, tol: float | None) -> float | None:
    if plan is None or tol is not None:
        return tol
    return quant_tolerance(plan, precision, DEFAULT_TOLERANCE[precision])


__all__ = ["load_plan", "qdq_check", "hf_check", "reference_tolerance", "PLAN_FILE"]
