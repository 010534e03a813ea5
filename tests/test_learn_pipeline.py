"""The learned strategy end to end on a tiny model: valid, deterministic, resumable, never worse."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from permcompile.config import LearnConfig, OptimizeConfig
from permcompile.errors import UsageError
from permcompile.models import load_model
from permcompile.pipeline import compress_
from permcompile.testing.zoo import build_tiny

LEARN = LearnConfig(steps=6, rounds=1, block_size=16, swap_trials=200)  # both phases exercised


def _cfg(**kw):
    base = dict(permutation="learned", calib_samples=4, calib_seq_len=16, learn=LEARN)
    base.update(kw)
    return OptimizeConfig(**base)


def _run(tmp_path, **kw):
    loaded = load_model(build_tiny("llama"))
    c = compress_(loaded, _cfg(**kw.pop("cfg", {})), checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    return loaded, c


@pytest.mark.parametrize("objective", ["output", "diagonal"])
def test_learned_is_valid_and_not_worse_than_hungarian(tmp_path, objective):
    loaded, c = _run(tmp_path, cfg={"learn": dataclasses.replace(LEARN, objective=objective)})
    learned = [r for r in c.group_results if r.strategy == "learned"]
    assert learned, "no group was learned"
    for g in c.groups:
        assert g.is_valid(c.perms[g.name])
    improved = 0
    for r in learned:
        m = re.search(objective + r" error ([0-9.e+-]+) \(hungarian\) -> ([0-9.e+-]+) \((\d+) exchanges kept\)", r.note)
        assert m, r.note
        before, after = float(m.group(1)), float(m.group(2))
        assert after <= before + 1e-9
        improved += after < before
    assert improved > 0, "the learned refinement improved no group's output error"


def test_resume_after_interruption_gives_same_result(tmp_path, monkeypatch):
    _, full = _run(tmp_path / "full")

    import permcompile.passes.learn as learn_mod

    calls = {"n": 0}
    real = learn_mod._learn_block

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second block
        return real(*args, **kwargs)

    monkeypatch.setattr(learn_mod, "_learn_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "ckpt" / "learn_state.json").read_text())
    assert len(state["done"]) == 1
    monkeypatch.setattr(learn_mod, "_learn_block", real)
    _, resumed = _run(tmp_path / "resumed", resume=True)
    for name in full.perms:  # same seed, same inputs: identical permutations (determinism and resume)
        assert torch.equal(full.perms[name], resumed.perms[name]), name


def test_resume_refuses_changed_inputs(tmp_path):
    _run(tmp_path)
    with pytest.raises(UsageError, match="different"):
        _run(tmp_path, resume=True, cfg={"seed": 1})
