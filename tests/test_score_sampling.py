"""``group_score_matrix`` samples rows per reader: the same rows as sampling the whole stacked matrix.

The residual group of a decoder has every q/k/v/gate/up of every block as a reader; stacking all their score
matrices before sampling held the whole stack (2.5 GB at 16 Llama-1B layers). The sample is now drawn over
row numbers and each reader is cut down in turn; this test keeps the old definition as the reference.
"""
from __future__ import annotations

import pytest
import torch

from permcompile.calib.stats import collect_input_stats
from permcompile.capture import capture
from permcompile.models import load_model
from permcompile.passes.coupling import analyze
from permcompile.passes.sparsify import consumer_scores, group_score_matrix
from permcompile.testing.zoo import build_tiny


def _stacked_then_sampled(group, model, stats, criterion, pruned, m, max_rows, seed):
    """The previous implementation: every reader's rows stacked, then a seeded uniform sample."""
    blocks, n = [], group.size
    for mem in group.consumers:
        if mem.param not in pruned:
            continue
        s = consumer_scores(model, mem, stats, criterion)
        s = s / s.mean().clamp_min(1e-30)
        index = mem.index_tensor(s.shape[1])
        if not bool((index % m == torch.arange(index.numel()) % m).all()):
            continue
        counts = torch.bincount(index, minlength=n)
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        for r in range(int(counts.max())):
            present = counts > r
            cols = torch.zeros(n, dtype=torch.long)
            cols[present] = order[starts[present] + r]
            blocks.append(s[:, cols] * present.to(s.dtype))
    scores = torch.cat(blocks)
    if max_rows is not None and scores.shape[0] > max_rows:
        keep = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        scores = scores[keep.sort().values]
    return scores


@pytest.fixture(scope="module")
def llama():
    model = build_tiny("llama")
    loaded = load_model(model)
    groups = analyze(capture(model, loaded.example_inputs(), loaded.forward_kwargs()))
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))}]
    stats = collect_input_stats(model, batches, forward_kwargs=loaded.forward_kwargs())
    pruned = {name for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name
              and "lm_head" not in name}
    return model, groups, stats, pruned


@pytest.mark.parametrize("max_rows", [None, 7, 100, 1000, 10**6])
@pytest.mark.parametrize("seed", [0, 3])
def test_per_reader_sample_equals_the_stacked_sample(llama, max_rows, seed):
    model, groups, stats, pruned = llama
    residual = [g for g in groups if g.kind == "residual"]
    assert residual and len(residual[0].consumers) > 4  # the case the change is for
    for group in groups:
        ours = group_score_matrix(group, model, stats, "wanda", pruned, 4, max_rows=max_rows, seed=seed)
        if ours is None:
            continue
        ref = _stacked_then_sampled(group, model, stats, "wanda", pruned, 4, max_rows, seed)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        if max_rows is not None:
            assert ours.shape[0] == min(max_rows, ref.shape[0])
