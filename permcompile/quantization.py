"""Quantization modes of ``--quantize`` (a registry) and their knobs (:class:`QuantizeConfig`).

Light on purpose (no torch import): the CLI and ``OptimizeConfig`` read the choices from here; the work happens
in ``passes/quantize.py`` (orchestration) and ``math/quant.py`` (scales, codes, fake quantization).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .registry import Registry

QUANT_MODES = Registry("quantization mode", "--quantize")
REFITS = ("requantize", "skip")


def _none(request):
    return None


def _quantize(fmt: str):
    def handler(request):
        from .passes.quantize import quantize_

        return quantize_(request, fmt)

    handler.__name__ = f"quantize_{fmt}"
    return handler


SMOOTH_AUTO = {"int8": 0.7}  # smooth_alpha="auto" by mode: INT8's static per-tensor activations need it, FP8's not


@dataclass(frozen=True)
class QuantizeConfig:
    """``--quantize fp8|int8`` and its research knobs (Python only).

    Weights: symmetric, per output channel; activations: symmetric, per tensor, static scales from the calibration
    batches (what TensorRT's explicit quantization consumes). Only the pruned (2:4) linears are quantized; layers
    that stay dense (heads, embeddings) keep the graph's float precision.

    ``joint``: with ``--update obs`` the OBS pass rounds each kept column to the grid before spreading its error,
    so one update absorbs pruning and rounding (GPTQ inside the N:M mask); False rounds after reconstruction.
    ``refit``: what follows the joint pass's least-squares refit, which moves weights off the grid: "requantize"
    (refit, then round to the same scales) or "skip" (no refit). ``smooth_alpha``: SmoothQuant migration strength
    of the per-channel diagonal folded into the producers of each quantized input (None: no smoothing; "auto":
    0.7 for INT8, none for FP8 — SmolLM2 INT8 W8A8 perplexity 201 unsmoothed, 121 with 0.5, 99 with 0.7,
    seed 0: docs/QUANTIZATION.md).
    ``act_margin``: activation scale = margin × calibration max |x| / qmax (>1 leaves headroom for inputs
    beyond the calibration range at the price of resolution).
    """

    mode: str = "none"
    joint: bool = True
    refit: str = "requantize"
    smooth_alpha: float | None | str = "auto"
    act_margin: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def smoothing(self) -> float | None:
        """The SmoothQuant strength this run uses (``smooth_alpha`` with "auto" resolved), None for none."""
        if self.smooth_alpha == "auto":
            return SMOOTH_AUTO.get(self.mode)
        return self.smooth_alpha

    def __post_init__(self) -> None:
        QUANT_MODES.get(self.mode)  # one UsageError line listing the choices
        if self.refit not in REFITS:
            raise UsageError(f"quantize refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        if self.smooth_alpha not in (None, "auto") and (isinstance(self.smooth_alpha, str)
                                                         or not 0.0 <= float(self.smooth_alpha) <= 1.0):
            raise UsageError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha!r}")
        if not 1.0 <= float(self.act_margin) <= 16.0:
            raise UsageError(f"act_margin must lie in [1, 16], got {self.act_margin!r}")


QUANT_MODES.add("none", _none, help="weights and activations stay in the graph's float precision (default)")
QUANT_MODES.add("fp8", _quantize("fp8"), config_type=QuantizeConfig,
                help="FP8 E4M3 weights (per output channel) and activations (per tensor, static): Hopper/Ada")
QUANT_MODES.add("int8", _quantize("int8"), config_type=QuantizeConfig,
                help="INT8 weights (per output channel) and activations (per tensor, static): W8A8")


def check_deployable(config) -> None:
    """Refuse, before any work, a quantized run TensorRT could not execute as sparse: its sparse INT8/FP8 tactics
    exist only for 2:4 weights, so ``--quantize`` needs pruning on at 2:4."""
    q = config.quantize
    if not q.enabled:
        return
    if not config.prune:
        raise UsageError(f"--quantize {q.mode} quantizes the 2:4-pruned linears: it needs pruning (drop --no-prune)")
    if (config.sparsity.n, config.sparsity.m) != (2, 4):
        raise UsageError(f"--quantize {q.mode} needs --sparsity 2:4: TensorRT runs sparse INT8/FP8 kernels only "
                         f"for 2:4, not {config.sparsity}")


__all__ = ["QUANT_MODES", "QuantizeConfig", "check_deployable"]
