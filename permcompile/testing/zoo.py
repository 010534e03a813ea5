"""Tiny random-weight Hugging Face models for tests (built from configs, nothing is downloaded).

Every builder is deterministic for a given ``seed`` (the global RNG is left untouched), returns the model in
eval mode, fp32, with SDPA attention. All dimensions are multiples of 8 and every attention head is 16 wide.
Norm weights/biases, linear biases and layer-scale factors are randomised (not the usual ones/zeros) so that
mistakes in folding permutations through "passenger" parameters change the outputs and are caught by tests.

``ZOO`` maps a short name to its builder; ``save_tiny(name, folder)`` writes one as a safetensors HF folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4  # head_dim = 64 / 4 = 16
KV_HEADS = 2
LAYERS = 2
VOCAB = 128
MAX_POS = 64
IMAGE_SIZE = 32
PATCH = 8
INIT_RANGE = 0.1  # larger than HF's 0.02 so that every layer visibly contributes to the output


def _finish(model_cls, config, seed: int) -> nn.Module:
    """Instantiate ``model_cls`` from ``config`` with a private RNG and randomise passenger parameters."""
    config._attn_implementation = "sdpa"
    devices: list = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        except TypeError:  # older transformers: no dtype keyword
            model = model_cls._from_config(config, attn_implementation="sdpa")
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                is_norm = "norm" in type(owner).__name__.lower()
                if leaf == "weight" and is_norm and param.dim() == 1:
                    param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
                elif leaf == "bias":
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
                elif "layerscale" in type(owner).__name__.lower() or leaf == "lambda1":
                    param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    model = model.float().eval()
    model.config.architectures = [type(model).__name__]
    return model


def tiny_llama(seed: int = 0) -> nn.Module:
    """LlamaForCausalLM with GQA (4 query heads, 2 kv heads) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POS, tie_word_embeddings=True, initializer_range=INIT_RANGE,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False,
    )
    return _finish(LlamaForCausalLM, config, seed)


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """Qwen2ForCausalLM (q/k/v projections carry biases), GQA 4/2, untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        tie_word_embeddings=False, initializer_range=INIT_RANGE, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False,
    )
    return _finish(Qwen2ForCausalLM, config, seed)


def tiny_mistral(seed: int = 0) -> nn.Module:
    """MistralForCausalLM, GQA 4/2, untied head."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POS, sliding_window=None, tie_word_embeddings=False,
        initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False,
    )
    return _finish(MistralForCausalLM, config, seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: transformers Conv1D layers (weight [K, out]) and a fused c_attn (q|k|v)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
        n_positions=MAX_POS, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return _finish(GPT2LMHeadModel, config, seed)


def tiny_opt(seed: int = 0) -> nn.Module:
    """OPTForCausalLM (pre-LayerNorm, biased projections, tied head)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS,
        init_std=INIT_RANGE, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
    )
    return _finish(OPTForCausalLM, config, seed)


def tiny_bert(seed: int = 0) -> nn.Module:
    """BertModel (post-LayerNorm encoder with pooler)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS, type_vocab_size=2,
        initializer_range=INIT_RANGE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return _finish(BertModel, config, seed)


def _vit_config(**extra):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, initializer_range=INIT_RANGE,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )


def tiny_vit(seed: int = 0) -> nn.Module:
    """ViTModel on 32x32 RGB images, 8x8 patches (16 patches + CLS), with pooler."""
    from transformers import ViTModel

    return _finish(ViTModel, _vit_config(), seed)


def tiny_vit_classifier(seed: int = 0) -> nn.Module:
    """ViTForImageClassification with 8 labels."""
    from transformers import ViTForImageClassification

    config = _vit_config(num_labels=8)
    return _finish(ViTForImageClassification, config, seed)


def tiny_dinov2(seed: int = 0) -> nn.Module:
    """Dinov2Model (layer scale on both residual branches) on 32x32 images, 8x8 patches."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=HIDDEN, mlp_ratio=INTERMEDIATE // HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, initializer_range=INIT_RANGE,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layerscale_value=1.0,
    )
    return _finish(Dinov2Model, config, seed)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
    "bert": tiny_bert,
    "vit": tiny_vit,
    "vit_classifier": tiny_vit_classifier,
    "dinov2": tiny_dinov2,
}


def build_tiny(name: str, seed: int = 0) -> nn.Module:
    """Build the zoo model called ``name`` (see ``ZOO``)."""
    try:
        builder = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown tiny model {name!r}; choose one of {', '.join(ZOO)}") from None
    return builder(seed=seed)


def save_tiny(name: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the zoo model ``name`` and ``save_pretrained`` it (safetensors, no tokenizer) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_tiny(name, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
