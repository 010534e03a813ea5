"""``hf/`` of a quantized run as a compressed-tensors checkpoint (what transformers, vLLM and llm-compressor load).

Why this format: transformers loads it on any device (``AutoModelForCausalLM.from_pretrained`` with
``compressed-tensors`` installed: the weights are decompressed on the first forward and every quantized linear
fake-quantizes its input with the stored static scale, which is the function of our Q/DQ graph), and vLLM serves
it with FP8 / INT8 kernels. TensorRT Model Optimizer's HF format would serve TensorRT-LLM only, and TensorRT takes
our ONNX graph directly.

What is written (compressed-tensors "float-quantized" for FP8, "int-quantized" for INT8 W8A8, the layout of
``compressed_tensors.compressors.naive_quantized``): for every layer of the :class:`~permcompile.passes.quantize.
QuantPlan`, ``<module>.weight`` holds its codes (``float8_e4m3fn`` / ``int8``, the same codes as the ONNX
initializers: both come from :func:`permcompile.export.onnx_qdq.weight_codes`; 2:4 zeros are code 0 in stored
order), ``<module>.weight_scale`` ``[out, 1]`` and ``<module>.input_scale`` ``[1]`` the plan's scales. config.json
gets a ``quantization_config``: one group targeting ``Linear`` (weights symmetric per channel, inputs symmetric per
tensor, static), the unquantized linears and embeddings (heads, embeddings, anything left dense) in ``ignore``,
and a ``sparsity_config`` saying the quantized weights are 2:4, stored dense (informational: compressed-tensors
0.15+ reads no sparsity, older loaders took it to pick sparse kernels).

compressed-tensors compresses ``nn.Linear`` and ``nn.Embedding`` only: a model whose quantized layers are GPT-2
``Conv1D`` ([K, out] weights) keeps the dequantized ``hf/`` of before (``code × scale`` in its dtype), and the
report says why. Reading needs no compressed-tensors: :func:`load_decompressed` rebuilds the dequantized model
for ``verify``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

CONFIG_KEY = "quantization_config"
QUANT_METHOD = "compressed-tensors"
# the compressed-tensors release whose layout this writes and the tests load with (a constant: the output must
# not depend on what happens to be installed)
CT_VERSION = "0.20.1"
# plan mode -> (compressed-tensors QuantizationType, compression format)
FORMATS = {"int8": ("int", "int-quantized"), "fp8": ("float", "float-quantized")}
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def unsupported(model: nn.Module, plan) -> str | None:
    """Why ``plan``'s layers of ``model`` cannot be written as compressed-tensors (None: they can)."""
    if plan.mode not in FORMATS:
        return f"no compressed-tensors format for {plan.mode}"
    for name, lp in plan.layers.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or lp.k_axis != 1 or lp.param != f"{name}.weight":
            return (f"{name} is a {type(module).__name__}; compressed-tensors quantizes nn.Linear weights "
                    f"stored [out, K]")
    return None


def _scale_dtype(model: nn.Module, plan) -> torch.dtype:
    """The checkpoint's dtype where it holds every plan scale exactly, else float32 (bf16 cannot hold fp32/fp16
    scales): a loader that builds its scale parameters in the model's dtype then reads exactly the plan's."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype == torch.float32:
        return dtype
    for lp in plan.layers.values():
        s = torch.cat([lp.weight_scale.float().reshape(-1), torch.tensor([lp.input_scale], dtype=torch.float32)])
        if not torch.equal(s.to(dtype).float(), s):
            return torch.float32
    return dtype


def quantization_config(model: nn.Module, plan, sparsity: str = "2:4", zeros: float = 0.0) -> dict:
    """config.json's ``quantization_config`` for ``plan`` (the fields of ``compressed_tensors.QuantizationConfig``;
    ``zeros``: the share of zero codes in the quantized weights, recorded as the 2:4 config's sparsity)."""
    qtype, fmt = FORMATS[plan.mode]
    quantized = set(plan.layers)
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, nn.Embedding)) and name not in quantized]

    def args(strategy: str) -> dict:
        return {"num_bits": 8, "type": qtype, "symmetric": True, "strategy": strategy, "group_size": None,
                "dynamic": False}

    return {
        "quant_method": QUANT_METHOD, "version": CT_VERSION, "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args("channel"),
                                      "input_activations": args("tensor"), "output_activations": None,
                                      "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {"format": "dense", "sparsity_structure": sparsity, "targets": sorted(quantized),
                            "ignore": ignore, "global_sparsity": round(float(zeros), 6)},
    }


@torch.no_grad()
def compressed_state_dict(model: nn.Module, plan) -> tuple[dict[str, torch.Tensor], float]:
    """``model``'s state dict with every planned weight replaced by its codes, plus each layer's ``weight_scale``
    and ``input_scale``; with the share of zero codes. Unplanned tensors are the model's own (no copy)."""
    from .onnx_qdq import weight_codes

    fmt = plan.fmt
    sdt = _scale_dtype(model, plan)
    state = dict(model.state_dict())
    zeros = total = 0
    for name, lp in plan.layers.items():
        w = model.get_parameter(lp.param).detach()
        codes = weight_codes(w.float().cpu().numpy(), 1, lp.weight_scale, fmt, lp.param).contiguous()
        zeros += int((codes.float() == 0).sum())
        total += codes.numel()
        state[lp.param] = codes
        state[f"{name}.weight_scale"] = lp.weight_scale.reshape(-1, 1).to(sdt).contiguous()
        state[f"{name}.input_scale"] = torch.tensor([lp.input_scale], dtype=sdt)
    return state, (zeros / total if total else 0.0)


def save_compressed(model: nn.Module, folder: Path, plan, sparsity: str = "2:4") -> dict:
    """``model.save_pretrained(folder)`` as a compressed-tensors checkpoint of ``plan``; returns what report.json
    records. Falls back to the dequantized checkpoint (``format: dense`` with ``why``) where compressed-tensors has
    no layout for the layers (see :func:`unsupported`)."""
    folder = Path(folder)
    why = unsupported(model, plan)
    if why is not None:
        model.save_pretrained(folder, safe_serialization=True)
        return {"format": "dense", "why": why}
    state, zeros = compressed_state_dict(model, plan)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    del state
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    qc = quantization_config(model, plan, sparsity, zeros)
    config[CONFIG_KEY] = qc
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"format": QUANT_METHOD, "quant_format": qc["format"], "layers": len(plan.layers),
            "ignore": len(qc["ignore"])}


def is_compressed(hf_config: Any) -> bool:
    """Whether a parsed config.json describes a compressed-tensors checkpoint."""
    qc = hf_config.get(CONFIG_KEY) if isinstance(hf_config, Mapping) else None
    return isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD


def quantized_modules(keys) -> list[str]:
    """Modules of a compressed-tensors checkpoint (``keys``: its tensor names) whose weight is stored as codes:
    those with a ``weight_scale``."""
    return sorted(k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale"))


def load_decompressed(hf_dir: Path, cls, keys, read, **kwargs) -> nn.Module:
    """The model of a compressed-tensors ``hf_dir`` with every quantized weight dequantized (``code × weight_scale``
    in the checkpoint's dtype), without compressed-tensors: what ``verify`` runs through its fake-quant reference.
    Input scales are not applied here (the reference takes them from ``quantization.json``). ``keys`` / ``read``:
    the checkpoint's tensor names and a reader by name. Raises ``ValueError`` when the checkpoint holds tensors
    that are neither the model's nor a quantized layer's scales, or codes that do not fit the model."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_dir = Path(hf_dir)
    config = transformers.AutoConfig.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    modules = quantized_modules(keys)
    expected = {f"{m}.{s}" for m in modules for s in ("weight_scale", "input_scale")}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the scales as unexpected: checked below instead
    try:
        model, info = cls.from_pretrained(str(hf_dir), config=config, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    stray = sorted(set(info.get("unexpected_keys") or ()) - expected)
    if stray:
        raise ValueError(f"{len(stray)} tensors belong to no layer of the model: {', '.join(stray[:3])}")
    with torch.no_grad():
        for name in modules:
            codes, scale = read(f"{name}.weight"), read(f"{name}.weight_scale")
            w = model.get_parameter(f"{name}.weight")
            if codes is None or codes.shape != w.shape or scale is None or scale.numel() != w.shape[0]:
                raise ValueError(f"{name}: its codes or weight_scale do not match the model's weight")
            w.copy_((codes.float() * scale.float().reshape(-1, 1)).to(w.dtype))
    return model


__all__ = ["CONFIG_KEY", "QUANT_METHOD", "CT_VERSION", "FORMATS", "CODE_DTYPES", "unsupported",
           "quantization_config", "compressed_state_dict", "save_compressed", "is_compressed",
           "quantized_modules", "load_decompressed"]
