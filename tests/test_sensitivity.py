"""--task-loss: per-output-channel Fisher information of the task loss, and the learned run that uses it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from permcompile.calib.sensitivity import output_sensitivity
from permcompile.config import SearchConfig, OptimizeConfig
from permcompile.testing.zoo import build_tiny


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin1 = nn.Linear(8, 6, bias=False)
        self.lin2 = nn.Linear(6, 5, bias=False)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.randn(6, 8, generator=g))
            self.lin2.weight.copy_(torch.randn(5, 6, generator=g) * torch.arange(1, 7.0))  # columns of different norm

    def forward(self, x):
        return self.lin2(self.lin1(x))


def test_distillation_sensitivity_is_the_output_jacobian_row_norm():
    model = _TwoLayer()
    batches = [{"x": torch.randn(50, 40, 8, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    sens = output_sensitivity(model, batches, ["lin1", "lin2"], "encoder", seed=0)
    expected = model.lin2.weight.detach().square().sum(0)  # E[(W2ᵀ v)_r²] = ||W2[:, r]||²
    assert sens["lin1"].shape == (6,)
    assert torch.allclose(sens["lin1"], expected, rtol=0.1), (sens["lin1"], expected)
    assert torch.allclose(sens["lin2"], torch.ones(5), rtol=0.1)  # dL/dy = v
    # parameters got no gradients and keep their flags
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def _autograd_output_grad(model, batch, name) -> torch.Tensor:
    """∂(next-token CE, summed over real tokens)/∂(output of ``name``), by plain autograd: [B, S, out]."""
    kept = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: kept.setdefault("y", o))
    out = model(**batch, use_cache=False)
    handle.remove()
    y = kept["y"]
    y.retain_grad()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = mask[:, 1:].bool()
    nn.functional.cross_entropy(out.logits[:, :-1][keep], ids[:, 1:][keep], reduction="sum").backward()
    return y.grad


def _llama_batch(model, seq: int, seed: int, pad_from: int | None = None) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[1, pad_from:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_causal_lm_sensitivity_matches_autograd():
    model = build_tiny("llama").eval()
    batch = _llama_batch(model, 12, 1)
    name = "model.layers.1.mlp.up_proj"
    sens = output_sensitivity(model, [batch], [name], "causal-lm", forward_kwargs={"use_cache": False})
    grad = _autograd_output_grad(model, batch, name)
    expected = grad.reshape(-1, grad.shape[-1]).square().mean(0)
    assert torch.allclose(sens[name], expected, rtol=1e-4, atol=1e-10)
    assert float(sens[name].max()) > 0


def test_padding_is_left_out():
    model = build_tiny("llama").eval()
    batch = _llama_batch(model, 10, 2, pad_from=6)
    name = "model.layers.0.self_attn.v_proj"
    sens = output_sensitivity(model, [batch], [name], "causal-lm", forward_kwargs={"use_cache": False})
    grad = _autograd_output_grad(model, batch, name)
    expected = grad[batch["attention_mask"].bool()].square().mean(0)  # 16 real tokens, not 20
    assert torch.allclose(sens[name], expected, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(sens[name], grad.reshape(-1, grad.shape[-1]).square().mean(0), rtol=1e-3)


@pytest.mark.slow  # two full optimize runs with the search: ~55 s on 2 cores
def test_search_with_task_loss_runs_and_changes_the_objective(tiny_dir, tmp_path):
    from permcompile.pipeline import optimize

    base = dict(permutation="search", calib_samples=4, calib_seq_len=32, residual="per-layer")
    plain = optimize(str(tiny_dir("llama")), tmp_path / "a", OptimizeConfig(**base, search=SearchConfig(steps=5)),
                     quiet=True, checkpoint_dir=str(tmp_path / "ca"))
    task = optimize(str(tiny_dir("llama")), tmp_path / "b",
                    OptimizeConfig(**base, search=SearchConfig(steps=5, task_loss=True)), quiet=True,
                    checkpoint_dir=str(tmp_path / "cb"))
    assert all(c["passed"] for c in task.report["checks"])
    errors_a = {g["name"]: g["error_after"] for g in plain.report["groups"] if g["strategy"] == "search"}
    errors_b = {g["name"]: g["error_after"] for g in task.report["groups"] if g["strategy"] == "search"}
    assert errors_a.keys() == errors_b.keys() and errors_a
    # the objective values differ: the rows are weighted by their Fisher information
    assert any(errors_a[k] != errors_b[k] for k in errors_a)
    assert task.report["config"]["search"]["task_loss"] is True


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_sensitivity_for_encoders_and_vision(arch):
    from permcompile.calib.stats import linear_layers

    model = build_tiny(arch).eval()
    if arch == "bert":
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        size = model.config.image_size
        batch = {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}
    names = [n for n in linear_layers(model) if "pooler" not in n]
    sens = output_sensitivity(model, [batch], names, "encoder" if arch == "bert" else "vision")
    assert set(sens) == set(names)
    assert all(float(v.min()) >= 0 and float(v.max()) > 0 for v in sens.values())
