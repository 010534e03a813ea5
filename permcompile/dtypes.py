"""Checkpoint dtypes: which one a model is stored in, and running a half-precision model in fp32.

permcompile keeps a bf16/fp16 checkpoint in its own dtype (memory ≈ the checkpoint, ``hf/`` written as it
came in). Anything whose answer must not depend on half-precision rounding (the check that folding kept the
function, the torch reference ONNX Runtime is compared against) runs the half model under
:func:`fp32_compute`: every op sees its half tensors upcast to fp32, one op at a time, so the model is never
copied whole and the result is the fp32 function of the stored weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["HALF_DTYPES", "model_dtype", "is_half", "fp32_compute", "dtype_name"]

HALF_DTYPES = (torch.bfloat16, torch.float16)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s floating parameters (by element count) are stored in; fp32 if none."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def is_half(model: nn.Module) -> bool:
    """True when any floating parameter of ``model`` is bf16 or fp16."""
    return any(p.dtype in HALF_DTYPES for p in model.parameters())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def _up(value):
    if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
        return value.float()
    if isinstance(value, torch.dtype) and value in HALF_DTYPES:
        return torch.float32  # explicit casts to half (``x.to(input_dtype)``) stay fp32 too
    return value


CHUNK_ELEMENTS = 1 << 24  # a half weight larger than this is upcast in slices of rows (64 MB of fp32 each)


def _chunked_linear(x, weight, bias):
    """``F.linear`` of an fp32 input with a large half weight, upcasting ``rows`` output rows at a time: an LM
    head of 128256 x 2048 would otherwise need a 1 GB transient fp32 copy for each call."""
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    outs = [F.linear(x, weight[i:i + rows].float(), None if bias is None else _up(bias[i:i + rows]))
            for i in range(0, weight.shape[0], rows)]
    return torch.cat(outs, dim=-1)


class _Fp32Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _EMBEDDINGS:  # gather the rows in the stored dtype, then upcast (exact): no fp32 table
            return _up(func(*args, **kwargs))
        if func is F.linear and len(args) >= 2 and not kwargs and isinstance(args[1], torch.Tensor) \
                and args[1].dtype in HALF_DTYPES and args[1].dim() == 2 and args[1].numel() > CHUNK_ELEMENTS:
            return _chunked_linear(_up(args[0]), args[1], args[2] if len(args) > 2 else None)
        args, kwargs = tree_map(_up, (tuple(args), kwargs))
        return func(*args, **kwargs)


_EMBEDDINGS = (F.embedding, torch.embedding)


@contextmanager
def fp32_compute(model: nn.Module | None = None) -> Iterator[None]:
    """Run torch code in fp32 although its weights are bf16/fp16 (a no-op for an fp32 ``model``).

    Each op's half tensor arguments are upcast (a transient fp32 copy of one weight at a time) and half
    dtypes passed to ops become fp32, so activations stay fp32 end to end. For forward passes under
    ``torch.no_grad()``: in-place updates of half parameters inside the context would touch the copies.
    """
    if model is not None and not is_half(model):
        yield
        return
    with _Fp32Mode():
        yield
