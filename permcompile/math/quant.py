"""Symmetric 8-bit quantization (INT8, FP8 E4M3), pure math: scales, codes, fake quantization.

Weights are quantized per output channel, activations per tensor, both symmetric (zero point 0), with the
semantics of ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (opset 19), so that a torch model run through
:func:`fake_quant` computes what ONNX Runtime or TensorRT computes on the QDQ graph:

* INT8: ``q = clamp(round_half_even(x / s), -128, 127)``; weights use the symmetric range ±127 (their scale is
  ``max|w| / 127``, so -128 never occurs), activations may saturate at -128 as ``QuantizeLinear`` does.
* FP8 E4M3 (``float8_e4m3fn``): ``q = fp8(clamp(x / s, -448, 448))`` rounding to nearest even (``saturate=1``).
* ``DequantizeLinear``: ``q * s`` in the scale's float type.

Everything works on tensors; nothing imports the model, ONNX or the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QFormat:
    """One 8-bit number format: its torch dtype, the largest code magnitude the scale maps ``max|x|`` to
    (``qmax``), the range ``QuantizeLinear`` saturates to and the grid's relative resolution ``rel_step``
    (the spacing of codes near ``qmax`` relative to ``qmax``: what one rounding step costs at full scale)."""

    name: str
    dtype: torch.dtype
    qmax: float
    lo: float
    hi: float
    rel_step: float
    onnx_type: str  # the ONNX TensorProto element type name

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


INT8 = QFormat("int8", torch.int8, 127.0, -128.0, 127.0, 1.0 / 127.0, "INT8")
# E4M3: 3 mantissa bits, codes near 448 are 32 apart (448 = 1.75 * 2^8)
FP8_E4M3 = QFormat("fp8", torch.float8_e4m3fn, 448.0, -448.0, 448.0, 32.0 / 448.0, "FLOAT8E4M3FN")
FORMATS = {f.name: f for f in (INT8, FP8_E4M3)}


def get_format(name: str) -> QFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}") from None


def to_codes(x: Tensor, scale: Tensor | float, fmt: QFormat) -> Tensor:
    """``QuantizeLinear(x, scale)``: codes of ``fmt.dtype``. ``scale`` broadcasts against ``x`` (a scalar, or
    ``[out, 1]`` for per-row scales of an ``[out, K]`` weight). Computed in float32 (``x / scale``)."""
    y = x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    y = y.clamp(fmt.lo, fmt.hi)
    if fmt.is_float:
        return y.to(fmt.dtype)  # round to nearest even; the clamp made it saturating
    return torch.round(y).to(fmt.dtype)  # torch.round: half to even, as QuantizeLinear


def from_codes(q: Tensor, scale: Tensor | float) -> Tensor:
    """``DequantizeLinear(q, scale)`` in float32."""
    return q.float() * torch.as_tensor(scale, dtype=torch.float32, device=q.device)


def fake_quant(x: Tensor, scale: Tensor | float, fmt: QFormat) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in float32: ``x`` moved onto the grid of ``scale``."""
    return from_codes(to_codes(x, scale, fmt), scale)


def round_scale(scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``scale`` as float32 values that ``dtype`` (the graph's float type) holds exactly: an fp16 graph stores
    fp16 scales, and the torch reference must use the same ones."""
    return scale.to(dtype).float()


def weight_scales(w: Tensor, fmt: QFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-row scales ``max|w_i| / qmax`` ([out], float32) of an ``[out, K]`` weight, exact in ``dtype``.

    A row of zeros gets scale 1 (any positive scale codes it as zeros; 0 would divide by zero). The rounded
    scale is nudged up where rounding made it smaller, so no weight saturates."""
    amax = w.detach().abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))
    rounded = round_scale(scale, dtype)
    if dtype != torch.float32:
        up = rounded < scale
        if bool(up.any()):
            bumped = torch.nextafter(scale[up].to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
            rounded[up] = bumped
    return rounded


def tensor_scale(amax: float, fmt: QFormat, dtype: torch.dtype = torch.float32) -> float:
    """Per-tensor scale ``amax / qmax`` (exact in ``dtype``); raises ``ValueError`` when it would be zero,
    negative or not finite (an all-zero or NaN calibration: no scale describes it)."""
    amax = float(amax)
    if not (amax > 0 and amax < float("inf")):
        raise ValueError(f"activation range {amax!r} gives no usable scale")
    scale = float(round_scale(torch.tensor([amax / fmt.qmax]), dtype)[0])
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"activation range {amax!r} gives scale {scale!r} in {dtype}")
    return scale


def snap_rows(w: Tensor, scale: Tensor, fmt: QFormat) -> Tensor:
    """An ``[out, K]`` weight moved onto its per-row grid (float32); zeros stay zeros."""
    return fake_quant(w, scale.reshape(-1, 1), fmt)


def rel_error_diag(w_ref: Tensor, w: Tensor, mean_sq: Tensor | None) -> float:
    """``Σ (w - w_ref)² E[x²] / Σ w_ref² E[x²]`` over an ``[out, K]`` weight with input channels weighted by
    their mean square (the layer-output error with channels treated as uncorrelated; unweighted without
    statistics)."""
    d = (w.float() - w_ref.float()).square()
    r = w_ref.float().square()
    if mean_sq is not None:
        ms = mean_sq.float().to(w.device).unsqueeze(0)
        d, r = d * ms, r * ms
    total = float(r.sum())
    return float(d.sum()) / total if total > 0 else 0.0


__all__ = ["QFormat", "INT8", "FP8_E4M3", "FORMATS", "get_format", "to_codes", "from_codes", "fake_quant",
           "round_scale", "weight_scales", "tensor_scale", "snap_rows", "rel_error_diag"]
