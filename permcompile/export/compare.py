"""Reference outputs and how ONNX Runtime's outputs are compared with them.

The pieces both verifiers use: :func:`torch_outputs` (the torch side, through the export's own wrapper),
:func:`compare_outputs` and its :class:`CompareResult`, the ONNX Runtime feeds of a batch, and the graph size
above which verification runs slice by slice. :mod:`.verify` (plain graphs, OUT folders) and
:mod:`.qdq_compare` (quantized graphs, teacher-forced) both import them from here, so neither imports the other
for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..dtypes import fp32_compute
from ..errors import UsageError
from .checks import DEFAULT_TOLERANCE, Check
from .onnx import ExportWrapper

@dataclass
class CompareResult:
    max_abs: float
    max_rel: float  # max |a - b| / max |reference|
    cosine: float
    scale: float  # max |reference|
    tol: float
    passed: bool
    batches: int
    precision: str
    seconds: float
    detail: str = ""

    def as_check(self, name: str = "onnxruntime_vs_torch") -> Check:
        detail = (f"{self.precision}: max err {self.max_rel:.2e} of output scale {self.scale:.3g} "
                  f"(tol {self.tol:.0e}), cosine {self.cosine:.6f}, {self.batches} batches")
        if self.detail:
            detail += f"; {self.detail}"
        return Check(name, self.passed, detail, self.max_rel)


_ORT_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


# Graphs with more weights than this run slice by slice on the CPU (export/ort_chunks.py): ONNX Runtime's CPU
# provider casts every fp16 MatMul weight to fp32 before the first layer runs, which would hold the weights
# 1.5x over (fp16 + fp32) for the check alone. Slices of SLICE_BYTES of weights each.
SLICE_ABOVE_BYTES = 512 << 20
SLICE_BYTES = 256 << 20


def weight_bytes(onnx_path) -> int:
    path = Path(onnx_path)
    return sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())


def feeds(session, batch: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in batch:
            raise UsageError(f"ONNX input {inp.name!r} is missing from the comparison batch ({', '.join(batch)})")
        arr = batch[inp.name].detach().cpu().numpy()
        want = _ORT_NP.get(inp.type)
        feeds[inp.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    return feeds


def compare_outputs(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], precision: str = "fp32",
                    tol: float | None = None) -> CompareResult:
    """Compare output arrays pairwise (reference first) with the module's error metrics."""
    tol = float(DEFAULT_TOLERANCE[precision] if tol is None else tol)
    max_abs, scale, dot, na, nb = 0.0, 0.0, 0.0, 0.0, 0.0
    detail = ""
    for ref, out in zip(refs, outs):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return CompareResult(math.inf, math.inf, 0.0, 0.0, tol, False, len(refs), precision, 0.0,
                                 f"shape mismatch {out.shape} vs {ref.shape}")
        if not np.isfinite(out).all():
            detail = "non-finite values in the output"
            max_abs = math.inf
            continue
        max_abs = max(max_abs, float(np.abs(out - ref).max(initial=0.0)))
        scale = max(scale, float(np.abs(ref).max(initial=0.0)))
        dot += float((ref * out).sum())
        na += float((ref * ref).sum())
        nb += float((out * out).sum())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    cosine = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else 0.0)
    passed = bool(math.isfinite(rel) and rel <= tol)
    return CompareResult(max_abs, rel, cosine, scale, tol, passed, len(refs), precision, 0.0, detail)


def torch_outputs(model: nn.Module, input_batches: Sequence[Mapping[str, Tensor]],
                  forward_kwargs: Mapping[str, Any] | None = None) -> list[np.ndarray]:
    """``model``'s main output on each batch, as fp32 arrays: references to compare ONNX Runtime with.

    A bf16/fp16 model runs under :func:`permcompile.dtypes.fp32_compute`, so the reference is the fp32
    function of its stored weights (what an fp32 or fp16 graph of those weights should compute), not
    half-precision rounding; no fp32 copy of the model is made.
    """
    refs = []
    was_training = model.training
    model.eval()
    try:
        for batch in input_batches:
            names = list(batch)
            wrapper = ExportWrapper(model, names, forward_kwargs)
            with torch.no_grad(), fp32_compute(model):
                refs.append(wrapper(*[batch[n] for n in names]).float().cpu().numpy())
    finally:
        model.train(was_training)
    return refs


__all__ = ["CompareResult", "compare_outputs", "torch_outputs", "feeds", "weight_bytes", "SLICE_ABOVE_BYTES",
           "SLICE_BYTES"]
