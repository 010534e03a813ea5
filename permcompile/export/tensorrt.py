"""Build a TensorRT engine from the exported ONNX, with 2:4 sparse tactics enabled.

TensorRT is optional: it is imported lazily inside the functions, and a missing package or a missing
NVIDIA GPU raises :class:`MissingDependencyError` with one line telling the user what to install.

Version notes (see ``docs`` / DATA.md "TensorRT facts"):
* Sparse tactics need FP16 / INT8 / FP8 weights: FP32 engines never pick them.
* TensorRT >= 11 removed the FP16 / INT8 builder flags (networks are always strongly typed): the ONNX
  itself must be FP16 (``export_onnx(..., precision="fp16")``). On 10.x we set ``BuilderFlag.FP16``.
* ``BuilderFlag.SPARSE_WEIGHTS`` exists in both. The builder's INFO log names the layers that picked a
  sparse kernel ("... picked sparse implementation for layers: a, b"); we capture it with our own ILogger.
* A quantized graph (``--quantize``: explicit Q/DQ, INT8 / FP8 weight codes) is built strongly typed where
  TensorRT can (10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; >= 11 always): every layer's precision
  then comes from the graph's types and no precision flag is set. Older, weakly typed builders get
  ``BuilderFlag.INT8`` / ``BuilderFlag.FP8`` (and FP16 for an fp16 graph). FP8 needs compute capability >= 8.9.

The engine is built and its sparse layers reported; it is not run here (running it needs a GPU, and a
TensorRT-vs-ONNX-Runtime comparison belongs in verification once there is one to test it on).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import MissingDependencyError, PermcompileError, UsageError

__all__ = [
    "TensorRTError",
    "EngineInfo",
    "tensorrt_available",
    "build_engine",
    "default_profiles",
    "parse_sparse_layers",
]

_INSTALL_HINT = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU with CUDA)"
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$")
_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")


class TensorRTError(PermcompileError):
    """TensorRT could not parse the ONNX or build / run the engine."""

    exit_code = 1


@dataclass
class EngineInfo:
    plan_path: Path
    precision: str
    trt_version: str
    sparse: bool
    build_seconds: float
    size_bytes: int
    sparse_layers: list[str] = field(default_factory=list)  # layers that picked a sparse kernel
    eligible_layers: list[str] = field(default_factory=list)  # layers TensorRT found 2:4-eligible
    profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # INFO and above builder messages
    quantize: str | None = None  # "int8" / "fp8": an explicitly quantized (Q/DQ) graph
    strongly_typed: bool = False


def _import_trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise MissingDependencyError(_INSTALL_HINT) from None
    except Exception as exc:  # noqa: BLE001 - broken installs (missing libnvinfer) raise OSError & co
        raise MissingDependencyError(f"TensorRT is installed but cannot be loaded: {str(exc).splitlines()[0]}") from exc
    return trt


def _require_gpu() -> None:
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise MissingDependencyError("no CUDA GPU is visible: TensorRT engines need an NVIDIA GPU")


def _require_fp8_gpu() -> None:
    import torch  # noqa: PLC0415

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise UsageError(f"--quantize fp8: this GPU (compute capability {major}.{minor}) has no FP8 kernels; "
                         "TensorRT needs 8.9 or newer (Ada, Hopper): use --quantize int8")


def tensorrt_available() -> bool:
    """True when ``tensorrt`` imports and a CUDA GPU is visible."""
    try:
        _import_trt()
        _require_gpu()
    except MissingDependencyError:
        return False
    return True


def _major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def parse_sparse_layers(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """(picked, eligible) layer names from TensorRT builder log lines."""
    picked: list[str] = []
    eligible: list[str] = []
    for line in lines:
        for pattern, bucket in ((_PICKED, picked), (_ELIGIBLE, eligible)):
            match = pattern.search(line)
            if match:
                bucket.extend(x.strip() for x in match.group(1).split(",") if x.strip())
    return list(dict.fromkeys(picked)), list(dict.fromkeys(eligible))


def _make_logger(trt, verbose: bool = False):
    class CaptureLogger(trt.ILogger):
        """Keeps every message at INFO or above (VERBOSE too when asked)."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if severity == trt.ILogger.Severity.VERBOSE and not verbose:
                return
            text = str(msg)
            self.lines.append(text)
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(text)

    return CaptureLogger()


def default_profiles(onnx_path, max_batch: int = 8, opt_batch: int = 1, max_seq: int = 512,
                     opt_seq: int = 128) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes for every graph input: axis "batch" 1..max_batch, "seq" 1..max_seq."""
    from .onnx import onnx_io_specs  # noqa: PLC0415

    inputs, _ = onnx_io_specs(onnx_path)
    out = {}
    for spec in inputs:
        ranges = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d >= 0:
                ranges.append((d, d, d))
            elif d == "batch" or (i == 0 and d != "seq"):
                ranges.append((1, opt_batch, max_batch))
            else:
                ranges.append((1, opt_seq, max_seq))
        lo, mid, hi = (tuple(r[j] for r in ranges) for j in range(3))
        out[spec.name] = (lo, mid, hi)
    return out


def build_engine(onnx_path, plan_path, precision: str = "fp16",
                 profiles: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
                 sparse: bool = True, workspace_bytes: int = 4 << 30, verbose_log: bool = False,
                 quantize: str | None = None) -> EngineInfo:
    """Parse ``onnx_path`` with TensorRT's OnnxParser and write a serialized engine to ``plan_path``.

    ``profiles`` maps input name -> (min, opt, max) shapes; None derives them with :func:`default_profiles`.
    ``quantize`` ("int8" / "fp8"): the graph carries Q/DQ with weight codes of that type (``--quantize``).
    """
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if quantize not in (None, "int8", "fp8"):
        raise UsageError(f"unknown quantization {quantize!r}; choose int8 or fp8")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file not found: {onnx_path}")
    trt = _import_trt()
    _require_gpu()
    start = time.perf_counter()
    major = _major(trt)
    logger = _make_logger(trt, verbose_log)
    notes: list[str] = []

    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTError("TensorRT could not create a builder (is the GPU usable?)")
    if quantize == "fp8":
        _require_fp8_gpu()
    flags = 0
    if major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    # a Q/DQ graph names every layer's precision: strongly typed where this TensorRT can be asked to (10.x)
    strongly_typed = major >= 11
    if quantize and not strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        strongly_typed = True
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        detail = ("; ".join(errors) or "unknown error").replace("\n", " ")[:500]
        raise TensorRTError("TensorRT cannot parse the ONNX: " + detail)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if precision == "fp32" and not quantize:
            notes.append("FP32 engines never use sparse tactics: export with precision fp16 to get 2:4 kernels")
    onnx_is_fp16 = _onnx_has_fp16_weights(onnx_path)
    if quantize and not strongly_typed:  # weakly typed builders (< 10) run Q/DQ layers only with the flag on
        wanted = "INT8" if quantize == "int8" else "FP8"
        if not hasattr(trt.BuilderFlag, wanted):
            raise TensorRTError(f"TensorRT {trt.__version__} has no {wanted} support: use TensorRT >= 10")
        config.set_flag(getattr(trt.BuilderFlag, wanted))
    if precision == "fp16":
        if strongly_typed and quantize:
            if not onnx_is_fp16:
                raise TensorRTError("a strongly typed network takes precision from the ONNX, which is FP32: "
                                    "export it with precision fp16")
        elif hasattr(trt.BuilderFlag, "FP16"):  # TensorRT <= 10: weakly typed networks need the flag
            config.set_flag(trt.BuilderFlag.FP16)
        elif not onnx_is_fp16:  # TensorRT >= 11: strongly typed, precision comes from the ONNX
            raise TensorRTError(f"TensorRT {trt.__version__} takes precision from the ONNX, which is FP32: "
                                "export it with precision fp16")
    try:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    except AttributeError:
        pass

    profiles = profiles or default_profiles(onnx_path)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = "; ".join(logger.errors[-3:]) or "see the TensorRT log"
        raise TensorRTError(f"TensorRT engine build failed: {why}".replace("\n", " ")[:500])
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as fh:
        fh.write(memoryview(serialized))
    picked, eligible = parse_sparse_layers(logger.lines)
    if sparse and (precision == "fp16" or quantize) and not picked:
        notes.append("no layer picked a sparse kernel (small layers, or a faster dense tactic won)")
    return EngineInfo(
        plan_path=plan_path, precision=precision, trt_version=str(trt.__version__), sparse=sparse,
        build_seconds=time.perf_counter() - start, size_bytes=plan_path.stat().st_size,
        sparse_layers=picked, eligible_layers=eligible,
        profiles={k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in profiles.items()},
        warnings=notes, log=list(logger.lines), quantize=quantize, strongly_typed=strongly_typed,
    )


def _onnx_has_fp16_weights(onnx_path) -> bool:
    import onnx  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)

