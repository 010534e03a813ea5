"""The Hugging Face environment permcompile runs in: offline and quiet.

One place for the variables, set (``setdefault``: a user's own setting wins) before transformers or
huggingface_hub are imported, which read them once. Torch-free, so the CLI and the benchmarks can call it
first thing.
"""
from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # nothing here may reach the network
    "TRANSFORMERS_VERBOSITY": "error",  # our own step lines say what is happening
    "TOKENIZERS_PARALLELISM": "false",  # no fork warning from the tokenizers' thread pool
}


def unset_hf_env(quiet: bool = True) -> dict[str, str]:
    """The :data:`DEFAULTS` that ``os.environ`` does not set yet (``quiet=False``: ``HF_HUB_OFFLINE`` only).

    A script writes ``os.environ.update(unset_hf_env())`` above its ``import torch``: linters allow an
    environment change there, not an arbitrary call."""
    return {key: value for key, value in DEFAULTS.items()
            if (quiet or key == "HF_HUB_OFFLINE") and key not in os.environ}


def set_hf_env(quiet: bool = True) -> None:
    """Set :data:`DEFAULTS` in ``os.environ`` where they are not set already; ``quiet=False`` (the library,
    whose caller may want transformers' messages) sets only ``HF_HUB_OFFLINE``."""
    os.environ.update(unset_hf_env(quiet))
