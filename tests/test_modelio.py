"""permcompile.modelio: the one rule for a model's main output."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from permcompile.errors import UsageError
from permcompile.modelio import main_output, main_output_name, named_output


def test_logits_then_last_hidden_state_then_the_first_tensor():
    a, b = torch.ones(2), torch.zeros(3)
    assert main_output(CausalLMOutput(logits=a)) is a and main_output_name(CausalLMOutput(logits=a)) == "logits"
    hidden = BaseModelOutput(last_hidden_state=b)
    assert main_output(hidden) is b and main_output_name(hidden) == "last_hidden_state"
    assert main_output({"pooled": a, "logits": b}) is b  # logits wins wherever it stands
    assert main_output({"extra": None, "pooled": a}) is a and main_output_name({"pooled": a}) == "pooled"
    assert main_output((None, a, b)) is a and main_output_name((a,)) == "output"
    assert main_output(a) is a


def test_a_logits_field_left_unset_falls_through():
    b = torch.zeros(1)
    out = CausalLMOutput(logits=None, hidden_states=(b,))
    with pytest.raises(ValueError, match="cannot find an output tensor"):
        main_output(out)  # hidden_states is a tuple of tensors, not a tensor
    assert main_output(BaseModelOutput(last_hidden_state=b, hidden_states=None)) is b


def test_the_onnx_exporter_says_it_as_an_export_error():
    from permcompile.export import onnx as onnx_export
    from permcompile.export import onnx_trace
    from permcompile.export.onnx import OnnxExportError

    with pytest.raises(OnnxExportError, match="cannot find an output tensor"):
        onnx_export.main_output({"n": 1})
    assert onnx_trace._output_name({"n": 1}) == "output"


def test_named_output_for_a_metric():
    a, b = torch.ones(2), torch.zeros(3)
    assert named_output(CausalLMOutput(logits=a), "logits") is a
    assert named_output({"last_hidden_state": b}, "last_hidden_state") is b
    assert named_output(b, "logits") is b and named_output((a, b), "logits") is a  # stand-ins
    with pytest.raises(UsageError, match="no last_hidden_state"):
        named_output(CausalLMOutput(logits=None), "last_hidden_state")
