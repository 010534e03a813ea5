"""Quantize the pruned linears to FP8 or INT8 (weights per output channel, activations per tensor), in place.

Why here, after mask + reconstruct: TensorRT's sparse kernels that pay (FP8/INT8 2:4) need the weights on an
8-bit grid with their 2:4 zeros in stored order, and static activation scales (explicit quantization, Q/DQ in
the ONNX graph). The pass moves every pruned weight onto its per-row grid in the model itself (the stored
float values are exactly ``code × scale``, so ``hf/`` and the ONNX export carry the quantized function and the
export recovers the codes exactly), measures each quantized layer's input range on the calibration batches and
returns a :class:`QuantPlan`: data keyed by module FQN, written to ``quantization.json``, from which the ONNX
Q/DQ rewrite (``export/onnx_qdq.py``) and the fake-quant reference of ``verify`` (:func:`fake_quant_model`) are
built. Zeros stay zeros (code 0), so N:M survives in the codes.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UsageError
from ..math.quant import (QFormat, fake_quant, from_codes, get_format, rel_error_diag, snap_rows, tensor_scale,
                          to_codes, weight_scales)

PLAN_FILE = "quantization.json"
PLAN_FORMAT = "permcompile.quantization/1"


@dataclass
class LayerPlan:
    """One quantized linear: weight scales per output channel (float32, exact in the graph's float type), the
    static input scale, and the calibration range it came from."""

    module: str
    param: str
    k_axis: int  # of the stored torch weight: 1 for nn.Linear ([out, K]), 0 for GPT-2 Conv1D ([K, out])
    weight_scale: torch.Tensor  # [out]
    input_scale: float
    input_amax: float
    # weight rounding alone, diagonal-Hessian output error; None when the OBS pass rounded (joint): the layer's
    # reconstruction error in report.json then holds pruning and rounding together
    rel_error_rounding: float | None = None

    def to_dict(self, full: bool = True) -> dict:
        d = {"module": self.module, "param": self.param, "k_axis": self.k_axis, "input_scale": self.input_scale,
             "input_amax": self.input_amax, "rel_error_rounding": self.rel_error_rounding}
        if full:
            d["weight_scale"] = [float(x) for x in self.weight_scale.tolist()]
        else:
            d["weight_scale_min"] = float(self.weight_scale.min())
            d["weight_scale_max"] = float(self.weight_scale.max())
        return d


@dataclass
class QuantPlan:
    """Every quantized linear by module FQN, in model order, with the format and the graph's float type."""

    mode: str
    precision: str  # "fp32" / "fp16": the graph's float type, which the scales are exact in
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    smoothing: dict = field(default_factory=dict)
    joint: bool = False  # the weight grids came from the OBS pass that rounded as it pruned (JointQuant)

    @property
    def fmt(self) -> QFormat:
        return get_format(self.mode)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "mode": self.mode, "precision": self.precision,
                "smoothing": self.smoothing, "layers": [p.to_dict() for p in self.layers.values()]}

    def summary(self) -> dict:
        """What report.json records: the plan without the per-channel scale vectors."""
        return {"mode": self.mode, "precision": self.precision, "plan_file": PLAN_FILE, "joint": self.joint,
                "smoothing": self.smoothing, "layers": [p.to_dict(full=False) for p in self.layers.values()]}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, data: Any) -> "QuantPlan":
        """Parse a plan; raises ``ValueError`` on anything malformed (non-finite or non-positive scales
        included: no graph can be checked against them)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a {PLAN_FORMAT} file")
        get_format(str(data.get("mode")))
        plan = cls(str(data["mode"]), str(data.get("precision", "fp32")), smoothing=data.get("smoothing") or {})
        for row in data.get("layers") or []:
            scale = torch.tensor([float(x) for x in row["weight_scale"]], dtype=torch.float32)
            s_in = float(row["input_scale"])
            if not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all()) and math.isfinite(s_in)
                    and s_in > 0):
                raise ValueError(f"{row.get('module')}: scales must be finite and positive")
            plan.layers[str(row["module"])] = LayerPlan(
                str(row["module"]), str(row["param"]), int(row["k_axis"]), scale, s_in,
                float(row.get("input_amax") or 0.0), row.get("rel_error_rounding"))
        return plan

    @classmethod
    def read(cls, folder: Path) -> "QuantPlan":
        return cls.from_json(json.loads((Path(folder) / PLAN_FILE).read_text(encoding="utf-8")))


@dataclass
class QuantRequest:
    """What :func:`quantize_` needs from the pipeline. ``weight_scales``: per-module scales already used by a
    joint reconstruction (its weights are on that grid: recomputing scales would round them again)."""

    model: nn.Module
    linears: list
    batches: list
    config: Any  # QuantizeConfig
    precision: str = "fp32"
    stats: dict | None = None
    forward_kwargs: dict | None = None
    weight_scales: dict | None = None


@dataclass
class JointQuant:
    """What the OBS pass needs to quantize as it prunes (GPTQ inside the N:M mask, ``math.obs.sparsegpt_nm_``):
    each layer's per-row grid, fixed from its dense weight before the pass; the scales used are kept here for
    :func:`quantize_` (its weights are on that grid: other scales would round them again). ``refit``:
    "requantize" runs the least-squares refit and rounds to the same grid after it; "skip" leaves the refit out."""

    fmt: QFormat
    scale_dtype: torch.dtype
    refit: str = "requantize"
    scales: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, precision: str) -> "JointQuant":
        return cls(get_format(config.mode), scale_dtype(precision), config.refit)

    def start(self, module: str, w_ref: torch.Tensor):
        """The column quantizer for ``module`` (``[out]`` columns of its ``[out, K]`` weight)."""
        scale = weight_scales(w_ref, self.fmt, self.scale_dtype)
        self.scales[module] = scale.cpu()
        fmt = self.fmt
        return lambda col: fake_quant(col, scale.to(col.device), fmt)

    def finish_(self, module: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` back on ``module``'s grid (in place; a no-op where it already is)."""
        return w.copy_(snap_rows(w, self.scales[module].to(w.device), self.fmt))


def scale_dtype(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.float32


def _kout(w: torch.Tensor, k_axis: int) -> torch.Tensor:
    return w if k_axis == 1 else w.t()


@torch.no_grad()
def quantize_(request: QuantRequest, mode: str) -> QuantPlan:
    """Move every pruned linear's weight onto its per-output-channel ``mode`` grid (in place) and derive static
    per-tensor input scales from the calibration batches. Post-conditions: each quantized weight equals
    ``codes × scale`` exactly (in float32; in the model's dtype up to its rounding, which the export undoes),
    every scale is finite and positive, zeros stayed zeros. Raises ``UsageError`` when a layer's calibration
    inputs are all zero or not finite (no scale exists)."""
    fmt = get_format(mode)
    sdt = scale_dtype(request.precision)
    model = request.model
    plan = QuantPlan(mode, request.precision)
    given = request.weight_scales or {}
    plan.joint = bool(given)
    layers = [i for i in request.linears if i.prune]
    for info in layers:
        w = _kout(model.get_parameter(info.param), info.k_axis)
        ref = w.detach().float()
        scale = given.get(info.module)
        joint = scale is not None  # already on this grid: its rounding error is inside the reconstruction's
        scale = weight_scales(ref, fmt, sdt) if scale is None else scale.float()
        snapped = snap_rows(ref, scale, fmt)
        if bool(((snapped != 0) & (ref == 0)).any()):
            raise AssertionError(f"{info.module}: quantization turned a pruned zero into a weight")
        stat = (request.stats or {}).get(info.module)
        err = None if joint else rel_error_diag(ref, snapped, stat.mean_sq if stat is not None else None)
        w.copy_(snapped.to(w.dtype))
        plan.layers[info.module] = LayerPlan(info.module, info.param, info.k_axis, scale, 0.0, 0.0, err)
    amax = input_ranges(model, request.batches, list(plan.layers), request.forward_kwargs)
    margin = float(request.config.act_margin)
    for name, lp in plan.layers.items():
        value = amax.get(name)
        if value is None:
            raise UsageError(f"{name} never ran on the calibration batches: it has no activation range to "
                             f"quantize with")
        try:
            lp.input_scale = tensor_scale(value * margin, fmt, sdt)
        except ValueError:
            why = "all zero" if value == 0 else "not finite"
            raise UsageError(f"--quantize {mode}: the calibration inputs of {name} are {why} (max |x| = {value}), so "
                             f"no activation scale exists; use calibration data that exercises this layer") from None
        lp.input_amax = value
    return plan


@torch.no_grad()
def input_ranges(model: nn.Module, batches: list, modules: list[str], forward_kwargs: dict | None = None) -> dict:
    """``max |x|`` of each named module's input over the calibration batches (padded tokens excluded where the
    batch's ``attention_mask`` lines up with the input); NaN when any input was not finite."""
    from ..dtypes import fp32_compute

    amax: dict[str, float] = {}
    state: dict = {"mask": None}
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            mask = state["mask"]
            if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.bool()]
            if x.numel() == 0:
                return None
            value = float(x.detach().abs().amax().float())
            if not math.isfinite(value) or not bool(torch.isfinite(x).all()):
                value = math.nan
            prev = amax.get(name, 0.0)
            amax[name] = value if math.isnan(value) or math.isnan(prev) else max(prev, value)
            return None
        return hook

    for name in modules:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with fp32_compute(model):
            for batch in batches:
                state["mask"] = batch.get("attention_mask")
                model(**batch, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return amax


def _fq_forward(module: nn.Module, lp: LayerPlan, fmt: QFormat, forced: dict | None = None,
                flips: dict | None = None, slack: float = 0.0):
    """A forward for ``module`` computing ``W_q · Q(x)``: input fake-quantized with its static scale, weight
    re-snapped to its grid in float32 (a bf16 weight holds ``code × scale`` only up to bf16 rounding).

    ``forced[module]``: input codes to use instead of this forward's own rounding (teacher forcing from the ONNX
    graph's quantizers); ``flips[module]`` then counts ``[codes that differ from the own rounding, codes, codes
    farther from it than one grid step and ``slack`` of full scale]``."""
    is_linear = isinstance(module, nn.Linear)

    def forward(x, *args, **kwargs):
        codes = forced.get(lp.module) if forced is not None else None
        if codes is not None and codes.numel() == x.numel():  # a Gemm reads [B*S, K] where torch has [B, S, K]
            codes = codes.reshape(x.shape)
            own = to_codes(x, lp.input_scale, fmt)
            if flips is not None:  # [codes that differ, codes, codes farther apart than rounding explains]
                mine, theirs = own.float(), codes.to(x.device).float()
                diff = (mine - theirs).abs()
                if fmt.is_float:  # the grid's spacing where the two codes lie (E4M3: 3 mantissa bits)
                    top = torch.maximum(mine.abs(), theirs.abs()).clamp_min(2.0 ** -6)
                    spacing = torch.exp2(torch.floor(torch.log2(top)) - 3)
                else:
                    spacing = torch.ones_like(diff)
                row = flips.setdefault(lp.module, [0, 0, 0])
                row[0] += int((diff > 0).sum())
                row[1] += own.numel()
                row[2] += int(((diff > spacing) & (diff > slack * fmt.qmax)).sum())
            xq = from_codes(codes.to(x.device), lp.input_scale)
        else:
            xq = fake_quant(x, lp.input_scale, fmt)
        w = module.weight
        wk = _kout(w, lp.k_axis).float()
        wq = snap_rows(wk, lp.weight_scale.to(wk.device), fmt)
        bias = module.bias.float() if module.bias is not None else None
        if is_linear:
            y = torch.nn.functional.linear(xq, wq, bias)
        else:  # transformers Conv1D: y = x @ W[K, out] + b
            y = xq @ wq.t()
            if bias is not None:
                y = y + bias
        return y.to(x.dtype)

    return forward


@contextlib.contextmanager
def fake_quant_model(model: nn.Module, plan: QuantPlan | None, forced: dict | None = None,
                     flips: dict | None = None, slack: float = 0.0) -> Iterator[nn.Module]:
    """Run ``model`` as the Q/DQ graph computes: each planned linear quantizes its input with the static scale
    and multiplies by its dequantized weight (a no-op with ``plan`` None). The forwards are restored on exit.
    ``forced`` / ``flips``: teacher forcing of the input codes (see ``_fq_forward``; the dict may be refilled
    between forward passes)."""
    if plan is None or not plan.layers:
        yield model
        return
    fmt = plan.fmt
    patched = []
    try:
        for name, lp in plan.layers.items():
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _fq_forward(module, lp, fmt, forced, flips, slack)
        yield model
    finally:
        for module, old in patched:
            if old is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old


def quant_tolerance(plan: QuantPlan, precision: str, base: float) -> float:
    """ONNX Runtime vs the torch fake-quant reference, relative to the output scale, derived from the grid step.

    Both sides compute the same function; they differ by float rounding (``base``: the float graph's own
    tolerance), and where that rounding moves a value across a rounding boundary of an activation quantizer, by a
    whole step there. A float error ε turns into a step δ with probability ε/δ, so the error's RMS grows by
    ``sqrt(δ/ε)``: the tolerance is ``base × (1 + sqrt(rel_step / u))``, with ``rel_step`` the format's step at full
    scale and u the unit roundoff of the graph's float type (2^-24 fp32, 2^-11 fp16): INT8 0.036 (fp32) / 0.10
    (fp16), FP8 0.11 / 0.26. Measured on the tiny zoo (llama, gpt2, bert, vit): fp32 graphs 2e-7 without a flip,
    up to 0.018 with one; fp16 graphs up to 0.060 (INT8) and 0.103 (FP8)."""
    u = 2.0 ** -11 if precision == "fp16" else 2.0 ** -24
    return float(base) * (1.0 + math.sqrt(plan.fmt.rel_step / u))


__all__ = ["PLAN_FILE", "JointQuant", "LayerPlan", "QuantPlan", "QuantRequest", "quantize_", "input_ranges",
           "fake_quant_model", "quant_tolerance", "scale_dtype"]
