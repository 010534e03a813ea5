"""Test helpers: a zoo of tiny random-weight Hugging Face models (no downloads)."""
from .zoo import ZOO, build_tiny, save_tiny

__all__ = ["ZOO", "build_tiny", "save_tiny"]
