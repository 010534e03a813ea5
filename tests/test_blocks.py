"""Block streaming (calib/blocks.py) gives the statistics of whole-model forwards, one block at a time."""
from __future__ import annotations

import pytest
import torch

from permcompile.calib.blocks import find_blocks, stream_channel_stats
from permcompile.calib.data import load_calibration
from permcompile.calib.stats import collect_input_stats, linear_layers
from permcompile.models import wrap_module
from permcompile.testing.zoo import build_tiny


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_streamed_channel_stats_equal_whole_model_stats(arch):
    loaded = wrap_module(build_tiny(arch).eval())
    batches = load_calibration(None, loaded, 6, 16, 0)
    modules = sorted(linear_layers(loaded.model))
    whole = collect_input_stats(loaded, batches, progress=False)
    streamed = stream_channel_stats(loaded.model, batches, modules, forward_kwargs=loaded.forward_kwargs())
    assert find_blocks(loaded.model, set(modules))  # the blocks were found: this is the streamed route
    assert set(streamed) == set(whole)
    for name, s in whole.items():
        assert streamed[name].count == s.count, name
        torch.testing.assert_close(streamed[name].sum_sq, s.sum_sq, rtol=1e-5, atol=1e-6, msg=name)
