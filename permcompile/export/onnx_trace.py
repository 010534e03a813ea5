"""Tracing a model with ``torch.onnx.export(..., dynamo=True)``: the wrapper, the dynamic axes, the dtype copy.

:class:`ExportWrapper` turns a model's keyword inputs into positional ones and returns its main output;
:func:`_trace` runs the exporter (quietly) on a copy in the graph's dtype when the model is not in it.
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import OnnxExportError, UsageError
from ..modelio import main_output as _main_output, main_output_name

WRAPPER_PREFIX = "model."  # the export wrapper holds the user's model as ``self.model``


_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                "decoder_attention_mask"}


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
           torch_optimize: bool, in_place: bool = False) -> _Traced:
    """Run ``torch.onnx.export`` (the slow part: torch.export, decompositions, translation).

    ``in_place``: cast ``model``'s own parameters to the graph's dtype instead of a cast copy (see
    :func:`_cast_copy`), for callers that no longer need its weights in their dtype."""
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
                half = _export_module(model, method, in_place)
                program = run_export(half, torch.float16)
                exported_module = half
            except Exception as exc:  # noqa: BLE001
                if fp16_method == "half":
                    raise
                notes.append(f"fp16 export of the .half() model failed ({_one_line(exc)}); converted the fp32 graph")
                method = "convert"
        if program is None:
            exported_module = _export_module(model, method, in_place)
            program = run_export(exported_module, None)
    except OnnxExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"ONNX export failed: {_one_line(exc)}") from exc
    finally:
        model.train(was_training)
    return _Traced(program, exported_module, names, axes, out_name, method, notes)


def _export_module(model: nn.Module, method: str | None, in_place: bool = False) -> nn.Module:
    """The module a graph is traced from: an fp16 copy for the "half" method; otherwise the model itself, or
    an fp32 copy of a bf16/fp16 model (an fp32 graph, or the fp32 graph the "convert" method starts from).
    ``in_place``: the model itself, its parameters cast (see :func:`_cast_copy`)."""
    from ..dtypes import is_half

    if method == "half":
        return _cast_copy(model, torch.float16, in_place)
    return _cast_copy(model, torch.float32, in_place) if is_half(model) else model


def _cast_copy(model: nn.Module, dtype: torch.dtype, in_place: bool = False) -> nn.Module:
    """A deep copy with every floating *parameter* in ``dtype``; buffers keep their dtype.

    Buffers such as rotary ``inv_freq`` stay fp32 (the model computes RoPE in fp32 from them; rounding
    them to fp16 shifts high positions' phases). ``nn.Module``'s own casting is not used because transformers'
    ``PreTrainedModel.half`` refuses models loaded from quantized checkpoints (GGUF). The cast parameters are
    handed to ``deepcopy`` up front, so the original weights are never copied first (peak: the model plus
    the cast copy). A model already in ``dtype`` is returned itself: nothing to copy.

    ``in_place``: cast ``model``'s own parameters one at a time instead (peak: the model plus one tensor) and
    return ``model``, for a caller that will not use its weights in their old dtype again.
    """
    if not any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        return model.eval()
    if in_place:
        from collections import Counter

        # storages several distinct tensors read (views of one buffer) must keep their bytes: cast those by copy
        shared = Counter(t.untyped_storage().data_ptr() for t in {id(t): t for t in
                                                                  [*model.parameters(), *model.buffers()]}.values())
        with torch.no_grad():
            for param in model.parameters():  # tied parameters appear once and stay tied
                if param.is_floating_point() and param.dtype != dtype:
                    alone = shared[param.untyped_storage().data_ptr()] == 1
                    param.data = _recast_in_storage(param.data, dtype) if alone else param.data.to(dtype)
        _set_config_dtype(model, dtype)
        return model.eval()
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for param in model.parameters():  # tied parameters appear once: they stay shared in the copy
            if param.is_floating_point() and param.dtype != dtype:
                memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    cast = copy.deepcopy(model, memo)
    _set_config_dtype(cast, dtype)
    return cast.eval()


def _recast_in_storage(t: Tensor, dtype: torch.dtype, step: int = 1 << 20) -> Tensor:
    """``t.to(dtype)`` written over ``t``'s own bytes when both dtypes have one size (bf16 ↔ fp16), slice by
    slice; otherwise a cast copy. Why not ``.to``: weights loaded from safetensors live in one file mapping
    that stays resident until its last tensor is freed, so casting them one by one into new memory holds the
    model twice; rewritten in place, they never take more room."""
    if t.element_size() != torch.empty((), dtype=dtype).element_size() or not t.is_contiguous():
        return t.to(dtype)
    flat = t.view(-1)
    out = flat.view(dtype)  # the same bytes, read as the new dtype
    for i in range(0, flat.numel(), step):
        out[i:i + step] = flat[i:i + step].to(dtype)  # each slice is read (into a temporary) before it is written
    return out.view(t.shape)


def _set_config_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    if hasattr(model, "config") and hasattr(model.config, "dtype"):
        try:
            model.config.dtype = dtype
        except Exception:  # noqa: BLE001
            pass


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
