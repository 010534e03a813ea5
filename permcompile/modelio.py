"""A model's inputs and main output, one rule each for calibration, verification, export and ``eval``.

Inputs: :func:`random_inputs` builds them by name from a transformers config. A metric that needs one output
by name (``eval``'s logits or hidden states) reads it with :func:`named_output`. The main output, the one
tensor compared: ``logits``, else ``last_hidden_state``, else the first tensor of the output (a
tensor itself, a tuple or list, a mapping's values). transformers' ``ModelOutput`` is a mapping whose keys
are the fields that are set, so a ``logits=None`` field falls through to ``last_hidden_state``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .errors import UsageError

MAIN_OUTPUTS = ("logits", "last_hidden_state")


def _find(out: Any) -> tuple[str, Tensor]:
    if isinstance(out, Tensor):
        return "output", out
    for key in MAIN_OUTPUTS:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return key, value
    if isinstance(out, Mapping):
        for key, value in out.items():
            if isinstance(value, Tensor):
                return str(key), value
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, Tensor):
                return "output", value
    raise ValueError(f"cannot find an output tensor in the model's {type(out).__name__} output")


def main_output(out: Any) -> Tensor:
    """The model's main tensor (see the module docstring); ``ValueError`` when the output holds none."""
    return _find(out)[1]


def main_output_name(out: Any) -> str:
    """The name of :func:`main_output`'s tensor: its key, or ``"output"`` for a tensor or a sequence."""
    return _find(out)[0]


def named_output(out: Any, name: str) -> Tensor:
    """``out.<name>`` (an attribute or a mapping's key) for a metric that needs that very output; a bare tensor or a
    tuple's first tensor stands in for it. :class:`UsageError` when there is none."""
    if isinstance(out, Tensor):
        return out
    value = getattr(out, name, None)
    if value is None and isinstance(out, Mapping):
        value = out.get(name)
    if value is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        value = out[0]
    if not isinstance(value, Tensor):
        raise UsageError(f"the model's output has no {name}: is this the right kind of model for this metric?")
    return value


def text_config(config):
    """The text part of a config (a vision-language model's ``text_config``), else the config itself."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # noqa: BLE001
            pass
    return config


def random_inputs(input_names: Sequence[str], config, batch: int, seq: int, generator: torch.Generator,
                  image_hw: tuple[int, int] | None = None, vocab_size: int | None = None) -> dict[str, Tensor]:
    """Random model inputs for ``input_names`` from a transformers config (vocab_size / image_size).

    ``image_hw`` overrides the config's ``image_size`` for ``pixel_values``: the size the graph was
    exported at (a processor may crop to less than the config says, as DINOv2's does: 224 vs 518);
    ``vocab_size`` overrides the config's.
    """
    out: dict[str, Tensor] = {}
    text = text_config(config)
    for name in input_names:
        if name in ("input_ids", "decoder_input_ids"):
            vocab = vocab_size or getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
            if not vocab:
                raise UsageError(f"cannot generate {name}: the config has no vocab_size")
            out[name] = torch.randint(0, int(vocab), (batch, seq), generator=generator)
        elif name in ("attention_mask", "decoder_attention_mask"):
            out[name] = torch.ones(batch, seq, dtype=torch.long)
        elif name == "token_type_ids":
            out[name] = torch.zeros(batch, seq, dtype=torch.long)
        elif name == "position_ids":
            out[name] = torch.arange(seq).unsqueeze(0).repeat(batch, 1)
        elif name == "pixel_values":
            vision = getattr(config, "vision_config", None) or config
            size = image_hw or getattr(vision, "image_size", None)
            if size is None:
                raise UsageError("cannot generate pixel_values: the config has no image_size")
            h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
            channels = int(getattr(vision, "num_channels", 3))
            out[name] = torch.randn(batch, channels, int(h), int(w), generator=generator)
        else:
            raise UsageError(f"cannot generate random values for input {name!r}")
    return out
