"""Shared fixtures. Everything runs offline: no hub access, quiet transformers logging."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tiny_dir("llama")`` saves the zoo model once per session and returns its folder.

    The folder is shared between tests: copy it (``shutil.copytree``) before modifying it.
    """
    from permcompile.testing import save_tiny

    cache: dict[tuple[str, int], Path] = {}

    def make(name: str, seed: int = 0) -> Path:
        key = (name, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{name}_{seed}")
            cache[key] = save_tiny(name, folder, seed=seed)
        return cache[key]

    return make
