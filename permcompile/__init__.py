"""permcompile: learn channel permutations that make N:M (2:4) sparsity keep more of a Transformer,
fold them into the weights (zero runtime overhead), prune, export ONNX/TensorRT and verify.

Python API::

    from permcompile import optimize, OptimizeConfig, Sparsity
    optimize("minilm", "out/minilm", OptimizeConfig(sparsity=Sparsity(2, 4), permutation="hungarian"))
"""
from .config import LearnedConfig, OptimizeConfig, SearchConfig, Sparsity
from .errors import PermcompileError, UsageError, VerificationError

__version__ = "0.1.0"


def optimize(*args, **kwargs):
    """See :func:`permcompile.pipeline.optimize` (imported lazily to keep ``import permcompile`` fast)."""
    from .pipeline import optimize as _optimize

    return _optimize(*args, **kwargs)


__all__ = ["optimize", "OptimizeConfig", "SearchConfig", "LearnedConfig", "Sparsity", "PermcompileError", "UsageError",
           "VerificationError", "__version__"]
