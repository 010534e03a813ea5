"""hf/ of a quantized run as a compressed-tensors checkpoint (export/hf_compressed.py), loaded back by transformers.

The end-to-end checks on an ``optimize`` output (verify's hf_quant, tampering, the same codes as the ONNX graph)
are in test_quantize.py, beside its quantized pipeline run.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from permcompile.export.checks import DEFAULT_TOLERANCE
from permcompile.export.hf_compressed import CODE_DTYPES, save_compressed, unsupported
from permcompile.math.nm import is_nm, magnitude_scores, nm_mask
from permcompile.passes.quantize import QuantRequest, fake_quant_model, quant_tolerance, quantize_
from permcompile.quantization import QuantizeConfig
from permcompile.testing.zoo import build_tiny


def _quantized_llama(mode: str):
    """The tiny llama with its decoder linears pruned 2:4 (magnitude) and quantized by the quantize pass, with
    its plan and token batches (a calibration batch and a differently shaped one)."""
    model = build_tiny("llama").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            w.mul_(nm_mask(magnitude_scores(w), 2, 4))
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)}]
    linears = [SimpleNamespace(module=n, param=f"{n}.weight", k_axis=1, prune=True) for n in names]
    plan = quantize_(QuantRequest(model, linears, calib, QuantizeConfig(mode=mode)), mode)
    return model, plan, calib + [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 9), generator=gen)}]


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_transformers_loads_the_checkpoint_as_the_fake_quant_model(mode, tmp_path):
    """``AutoModelForCausalLM.from_pretrained(hf/)`` with compressed-tensors installed runs the quantized function
    (weights decompressed, every quantized linear's input fake-quantized with its static scale) on the CPU: its
    logits match the torch fake-quant reference of the plan within the grid-step tolerance, while the same
    weights with float inputs (what a loader ignoring the activation scales would compute) are farther off."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, plan, batches = _quantized_llama(mode)
    info = save_compressed(model, tmp_path, plan)
    assert info["format"] == "compressed-tensors" and info["layers"] == len(plan.layers) == 14
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name, lp in plan.layers.items():  # the codes, 2:4 in stored order, and the plan's scales
        codes = stored[lp.param]
        assert codes.dtype == CODE_DTYPES[mode] and is_nm(codes.float(), 2, 4)
        assert torch.equal(codes.float() * stored[f"{name}.weight_scale"].float(), model.get_parameter(lp.param))
        assert float(stored[f"{name}.input_scale"]) == lp.input_scale
    import json

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the loader's own schema
    assert parsed.format == {"fp8": "float-quantized", "int8": "int-quantized"}[mode]
    assert set(qc["ignore"]) == {"model.embed_tokens", "lm_head"}
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert loaded.model.layers[0].self_attn.q_proj.quantization_scheme.input_activations.type == \
        {"fp8": "float", "int8": "int"}[mode]
    assert not hasattr(loaded.lm_head, "quantization_scheme")
    tol = quant_tolerance(plan, "fp32", DEFAULT_TOLERANCE["fp32"])
    with torch.no_grad():
        for batch in batches:
            got = loaded(**batch).logits
            with fake_quant_model(model, plan):
                ref = model(**batch).logits
            float_inputs = model(**batch).logits
            err, scale = float((got - ref).abs().max()), float(ref.abs().max())
            assert err <= tol * scale
            # both run torch's fp32 ops on the same codes: no rounding flip here (measured 0), far below the error
            # of the same weights on float inputs (5 % of the output scale for FP8, 2.6 % for INT8)
            assert err <= 0.01 * float((float_inputs - ref).abs().max())


def test_layers_compressed_tensors_cannot_hold_keep_the_dequantized_checkpoint(tmp_path):
    """GPT-2's Conv1D ([K, out]) is no nn.Linear: hf/ stays the dequantized checkpoint and the report says why."""
    pytest.importorskip("transformers")
    model = build_tiny("gpt2")
    name = "transformer.h.0.attn.c_attn"
    plan = SimpleNamespace(mode="fp8", layers={name: SimpleNamespace(k_axis=0, param=f"{name}.weight")})
    assert "Conv1D" in unsupported(model, plan)
    info = save_compressed(model, tmp_path, plan)
    assert info["format"] == "dense" and "Conv1D" in info["why"]
    import json

    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_load_model_reads_the_checkpoint_and_refuses_a_nan_code(mode, tmp_path):
    """``load_model`` (what ``permcompile eval OUT`` runs on ``OUT/hf``) loads the compressed checkpoint, whose
    weights are 8-bit codes (float8 has no isfinite kernel: that check once crashed on it), runs it as the
    fake-quant model, and still names a NaN code (float8 E4M3 has one) instead of loading it."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file, save_file

    from permcompile.errors import UsageError
    from permcompile.models import load_model

    model, plan, batches = _quantized_llama(mode)
    save_compressed(model, tmp_path, plan)
    loaded = load_model(str(tmp_path))
    with torch.no_grad():
        got = loaded.model(**batches[0]).logits
        with fake_quant_model(model, plan):
            ref = model(**batches[0]).logits
    assert float((got - ref).abs().max()) <= quant_tolerance(plan, "fp32", DEFAULT_TOLERANCE["fp32"]) * float(
        ref.abs().max())
    if mode != "fp8":
        return
    path = tmp_path / "model.safetensors"
    stored = load_file(str(path))
    param = next(iter(plan.layers.values())).param
    codes = stored[param].clone()
    codes.view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN
    stored[param] = codes
    save_file(stored, str(path), metadata={"format": "pt"})
    with pytest.raises(UsageError, match="not finite.*NaN"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_a_half_precision_source_loads_in_fp32_exactly_and_in_half_within_the_grid_tolerance(mode, tmp_path):
    """A bf16 source model (its parameters bf16, so each quantized weight is ``code × scale`` only up to bf16
    rounding): the checkpoint holds the exact codes, so loaded in fp32 it computes the fake-quant function of the
    same parameters exactly (0 measured); loaded in fp16 or bf16 (what a GPU user does), half-precision
    arithmetic moves some activations across a rounding boundary, so the logits agree within the fp16 graph's
    grid-step tolerance (measured fp16 0.082 / 0.065, bf16 0.099 / 0.064 of the output scale for FP8 / INT8,
    against tolerances 0.26 / 0.10)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, plan, batches = _quantized_llama(mode)
    with torch.no_grad():
        for p in model.parameters():  # the parameters only: the rotary buffer stays fp32, as a loader rebuilds it
            p.data = p.data.to(torch.bfloat16)
        save_compressed(model, tmp_path, plan)
        for p in model.parameters():
            p.data = p.data.float()
    tol = {torch.float32: 0.0, torch.float16: quant_tolerance(plan, "fp16", DEFAULT_TOLERANCE["fp16"])}
    tol[torch.bfloat16] = tol[torch.float16]
    for dtype, limit in tol.items():
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True, dtype=dtype).eval()
        with torch.no_grad():
            for batch in batches:
                got = loaded(**batch).logits.float()
                with fake_quant_model(model, plan):
                    ref = model(**batch).logits
                assert bool(torch.isfinite(got).all())
                assert float((got - ref).abs().max()) <= limit * float(ref.abs().max()), dtype
