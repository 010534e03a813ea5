"""Write a Triton Inference Server model repository for the exported model.

Layout: ``<repo>/<name>/config.pbtxt`` plus ``<repo>/<name>/1/model.onnx`` (platform ``onnxruntime_onnx``)
or ``<repo>/<name>/1/model.plan`` (platform ``tensorrt_plan``). The model file is hard-linked when it can be;
an external-data file (``model.onnx.data``, for weights past 2 GB) is always copied, because ``onnx.load``
refuses external data that has several hard links and Triton may mount the repository on its own.

For ONNX the config enables ONNX Runtime's TensorRT execution accelerator. The parameter keys are the
ones documented by Triton's onnxruntime backend (README, "Parameter mapping between ONNX Runtime and Triton
ONNXRuntime Backend"): ``precision_mode`` ("FP32"/"FP16", maps to ``trt_fp16_enable``),
``max_workspace_size_bytes``, ``trt_sparsity_enable`` (maps to ORT's ``trt_sparsity_enable``: 2:4 sparse
tactics), ``trt_engine_cache_enable`` / ``trt_engine_cache_path`` and ``trt_profile_min_shapes`` /
``trt_profile_opt_shapes`` / ``trt_profile_max_shapes`` ("input:1x1,mask:1x1" style) for dynamic shapes.
Older backends ignore keys they do not know.

:func:`parse_pbtxt` is a tiny protobuf text-format reader used to check what we write (no Triton here).
"""
from __future__ import annotations

import json
import re
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError

__all__ = [
    "TritonModelInfo",
    "write_triton_repo",
    "triton_dtype",
    "parse_pbtxt",
    "validate_triton_config",
]

_TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "string": "TYPE_STRING", "object": "TYPE_STRING",
    # torch / short spellings
    "half": "TYPE_FP16", "float": "TYPE_FP32", "double": "TYPE_FP64", "long": "TYPE_INT64", "int": "TYPE_INT32",
    "fp16": "TYPE_FP16", "fp32": "TYPE_FP32", "bf16": "TYPE_BF16",
}


@dataclass
class TritonModelInfo:
    model_dir: Path
    config_path: Path
    model_file: Path
    platform: str
    config: str  # the config.pbtxt text
    notes: list[str] = field(default_factory=list)  # choices the caller should report (sparsity left off, ...)


SPARSITY_OFF_FP32 = ("trt_sparsity_enable is off: TensorRT runs 2:4 sparse tactics only in FP16/INT8/FP8, "
                     "never FP32; export with precision fp16 for sparse kernels")
FP8_NOTE = ("FP8 Q/DQ graph: the ONNX Runtime TensorRT accelerator has no FP8 switch; TensorRT takes FP8 from the "
            "Q/DQ types where the GPU has FP8 (Ada/Hopper); the TensorRT plan (model_trt) is built for it")


def triton_dtype(dtype: Any) -> str:
    """Triton ``TYPE_*`` name for a numpy / torch dtype or a dtype name (``"int64"``, ``torch.float16``)."""
    import numpy as np  # noqa: PLC0415

    if isinstance(dtype, str):
        if dtype.startswith("TYPE_"):
            return dtype
        text = dtype.lower()
    elif str(dtype).startswith("torch."):
        text = str(dtype)[len("torch."):]
    else:
        try:
            text = np.dtype(dtype).name
        except TypeError:
            text = str(dtype).lower()
    if text not in _TRITON_TYPES:
        try:
            text = np.dtype(text).name
        except TypeError:
            pass
    if text not in _TRITON_TYPES:
        raise UsageError(f"no Triton data type for {dtype!r}")
    return _TRITON_TYPES[text]


def _q(text: str) -> str:
    return json.dumps(str(text))  # protobuf text strings accept JSON-style escapes


def _io_block(kind: str, specs: Sequence[tuple[str, str, list[int]]]) -> str:
    items = []
    for name, dtype, dims in specs:
        dims_text = ", ".join(str(int(d)) for d in dims)
        items.append(f"  {{\n    name: {_q(name)}\n    data_type: {dtype}\n    dims: [ {dims_text} ]\n  }}")
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def _normalise_io(specs, max_batch_size: int) -> list[tuple[str, str, list[int]]]:
    out = []
    for spec in specs:
        if hasattr(spec, "name") and hasattr(spec, "dims"):  # onnx.TensorSpec
            name, dtype, dims = spec.name, spec.dtype, spec.dims()
        else:
            name, dtype, dims = spec
        dims = [int(d) if isinstance(d, int) or str(d).lstrip("-").isdigit() else -1 for d in dims]
        dims = [d if d >= 0 else -1 for d in dims]
        if max_batch_size > 0:  # Triton adds the batch dimension itself
            if not dims:
                raise UsageError(f"{name}: max_batch_size > 0 needs a leading batch dimension")
            dims = dims[1:]
        if not dims:
            dims = [1]
        out.append((str(name), triton_dtype(dtype), dims))
    return out


def _shape_list(profiles: Mapping[str, Sequence[Sequence[int]]], which: int) -> str:
    return ",".join(f"{name}:" + "x".join(str(int(d)) for d in shapes[which]) for name, shapes in profiles.items())


def write_triton_repo(repo_dir, model_name: str, onnx_path=None, plan_path=None,
                      inputs: Sequence[Any] | None = None, outputs: Sequence[Any] | None = None,
                      max_batch_size: int = 0, sparse: bool = True, precision: str = "fp16",
                      profiles: Mapping[str, Sequence[Sequence[int]]] | None = None, io_from_onnx=None,
                      workspace_bytes: int | None = None, engine_cache_dir: str | None = None,
                      instance_count: int = 1, version: int = 1, quantize: str | None = None) -> TritonModelInfo:
    """Create ``repo_dir/model_name`` with ``config.pbtxt`` and the model file in version folder ``version``.

    Give exactly one of ``onnx_path`` / ``plan_path``. ``inputs`` / ``outputs`` are ``(name, dtype, dims)``
    with ``-1`` for dynamic dims, *including* the batch dim (dropped when ``max_batch_size > 0``);
    omitted, they are read from ``onnx_path`` (or ``io_from_onnx`` for a plan). ``profiles`` (input ->
    (min, opt, max) shapes) become ``trt_profile_*_shapes`` for the ONNX Runtime TensorRT accelerator.
    ``sparse`` asks for TensorRT's 2:4 sparse tactics; with ``precision="fp32"`` they are left off (and the
    config says why in a comment): TensorRT has sparse kernels only for FP16/INT8/FP8. ``quantize`` ("int8",
    "fp8"): the graph carries explicit Q/DQ; INT8 turns on the accelerator's INT8 mode (which Q/DQ INT8 layers
    need), FP8 has no switch there (TensorRT takes FP8 from the Q/DQ types; the config says so in a comment).
    """
    if (onnx_path is None) == (plan_path is None):
        raise UsageError("write_triton_repo needs exactly one of onnx_path or plan_path")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(model_name)) or model_name in (".", ".."):
        raise UsageError(f"invalid Triton model name {model_name!r}: use letters, digits, '_', '-', '.'")
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if max_batch_size < 0:
        raise UsageError("max_batch_size must be >= 0")
    source = Path(onnx_path if onnx_path is not None else plan_path)
    if not source.is_file():
        raise UsageError(f"model file not found: {source}")
    if inputs is None or outputs is None:
        from .onnx import onnx_io_specs  # noqa: PLC0415

        spec_src = onnx_path if onnx_path is not None else io_from_onnx
        if spec_src is None:
            raise UsageError("a TensorRT plan needs explicit inputs/outputs (or io_from_onnx)")
        found_in, found_out = onnx_io_specs(spec_src)
        inputs = found_in if inputs is None else inputs
        outputs = found_out if outputs is None else outputs
    ins = _normalise_io(inputs, max_batch_size)
    outs = _normalise_io(outputs, max_batch_size)

    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / str(int(version))
    version_dir.mkdir(parents=True, exist_ok=True)
    if onnx_path is not None:
        platform, target = "onnxruntime_onnx", version_dir / "model.onnx"
        _link_or_copy(source, target)
        data = source.with_name(source.name + ".data")
        if data.exists():  # external weights travel with the graph (same relative location)
            # a copy, never a hard link: onnx.load refuses external data with several links ("potential
            # hardlink attack"), and a symlink or a path outside the model folder is refused too
            _copy(data, version_dir / data.name)
    else:
        platform, target = "tensorrt_plan", version_dir / "model.plan"
        _link_or_copy(source, target)

    lines = [f"name: {_q(model_name)}", f"platform: {_q(platform)}", f"max_batch_size: {int(max_batch_size)}",
             _io_block("input", ins), _io_block("output", outs),
             f"instance_group [\n  {{\n    kind: KIND_GPU\n    count: {int(instance_count)}\n  }}\n]"]
    notes: list[str] = []
    if platform == "onnxruntime_onnx":
        params = [("precision_mode", "INT8" if quantize == "int8" else "FP16" if precision == "fp16" else "FP32")]
        if quantize == "fp8":
            notes.append(FP8_NOTE)
            lines.append(f"# {FP8_NOTE}")
        if workspace_bytes:
            params.append(("max_workspace_size_bytes", str(int(workspace_bytes))))
        if sparse and precision == "fp32" and not quantize:
            notes.append(SPARSITY_OFF_FP32)
            lines.append(f"# {SPARSITY_OFF_FP32}")
        elif sparse or quantize:
            params.append(("trt_sparsity_enable", "1"))
        if engine_cache_dir:
            params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", str(engine_cache_dir))]
        if profiles:
            params += [("trt_profile_min_shapes", _shape_list(profiles, 0)),
                       ("trt_profile_opt_shapes", _shape_list(profiles, 1)),
                       ("trt_profile_max_shapes", _shape_list(profiles, 2))]
        body = "\n".join(f"      parameters {{ key: {_q(k)} value: {_q(v)} }}" for k, v in params)
        lines.append("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
                     "      {\n      name: \"tensorrt\"\n" + body + "\n      }\n    ]\n  }\n}")
    text = "\n".join(lines) + "\n"
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(text)
    return TritonModelInfo(model_dir, config_path, target, platform, text, notes)


# --------------------------------------------------------------------------------------------------
# A tiny protobuf text-format reader (enough for Triton configs)
# --------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([{}\[\]:,;<>])"""
                    r"""|([^\s{}\[\]:,;<>"'#]+))""")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f"pbtxt: cannot read {text[pos:pos + 20]!r}")
        pos = match.end()
        comment, string, punct, word = match.groups()
        if comment is not None:
            continue
        if string is not None:
            out.append(("str", _unquote(string)))
        elif punct is not None:
            out.append(("punct", punct))
        else:
            out.append(("word", word))
    return out


def _unquote(string: str) -> str:
    if string[0] == '"':
        try:
            return json.loads(string)
        except ValueError:
            pass
    return string[1:-1]


def _scalar(tok: tuple[str, str]) -> Any:
    kind, value = tok
    if kind == "str":
        return value
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", value):
        return float(value)
    if value in ("true", "false"):
        return value == "true"
    return value  # enum identifier (TYPE_INT64, KIND_GPU)


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Parse protobuf text format into ``{field: [values]}`` (every field a list; messages are dicts).

    Raises ValueError on malformed input (unbalanced braces, missing values, ...).
    """
    toks = _tokens(text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take(expected: str | None = None):
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("pbtxt: unexpected end of input")
        tok = toks[pos]
        if expected is not None and tok != ("punct", expected):
            raise ValueError(f"pbtxt: expected {expected!r}, got {tok[1]!r}")
        pos += 1
        return tok

    def value():
        tok = peek()
        if tok is None:
            raise ValueError("pbtxt: missing value")
        if tok in (("punct", "{"), ("punct", "<")):
            close = "}" if tok[1] == "{" else ">"
            take()
            msg = message(close)
            take(close)
            return msg
        if tok[0] == "punct":
            raise ValueError(f"pbtxt: unexpected {tok[1]!r}")
        take()
        return _scalar(tok)

    def message(close: str | None) -> dict[str, list[Any]]:
        msg: dict[str, list[Any]] = {}
        while True:
            tok = peek()
            if tok is None:
                if close is not None:
                    raise ValueError(f"pbtxt: missing {close!r}")
                return msg
            if close is not None and tok == ("punct", close):
                return msg
            if tok[0] != "word":
                raise ValueError(f"pbtxt: expected a field name, got {tok[1]!r}")
            take()
            name = tok[1]
            if peek() == ("punct", ":"):
                take()
            values = msg.setdefault(name, [])
            if peek() == ("punct", "["):
                take()
                if peek() != ("punct", "]"):
                    values.append(value())
                    while peek() == ("punct", ","):
                        take()
                        values.append(value())
                take("]")
            else:
                values.append(value())
            if peek() in (("punct", ","), ("punct", ";")):
                take()

    result = message(None)
    if pos != len(toks):
        raise ValueError(f"pbtxt: unexpected {toks[pos][1]!r}")
    return result


def validate_triton_config(config: Mapping[str, list[Any]] | str) -> list[str]:
    """Problems with a parsed (or raw) Triton config: missing name/platform, bad I/O entries. Empty = ok."""
    if isinstance(config, str):
        try:
            config = parse_pbtxt(config)
        except ValueError as exc:
            return [str(exc)]
    problems = []
    for key in ("name", "platform"):
        if len(config.get(key, [])) != 1 or not isinstance(config[key][0], str):
            problems.append(f"needs exactly one string {key}")
    if config.get("platform", [None])[0] not in ("onnxruntime_onnx", "tensorrt_plan", None):
        problems.append(f"unexpected platform {config['platform'][0]!r}")
    for kind in ("input", "output"):
        entries = config.get(kind, [])
        if not entries:
            problems.append(f"no {kind}s")
        for entry in entries:
            if not isinstance(entry, dict):
                problems.append(f"{kind} entry is not a message")
                continue
            if len(entry.get("name", [])) != 1:
                problems.append(f"{kind} without a name")
            dtype = entry.get("data_type", [None])[0]
            if not (isinstance(dtype, str) and dtype.startswith("TYPE_")):
                problems.append(f"{kind} {entry.get('name')} has no TYPE_* data_type")
            dims = entry.get("dims", [])
            if not dims or not all(isinstance(d, int) and d >= -1 and d != 0 for d in dims):
                problems.append(f"{kind} {entry.get('name')} has bad dims {dims}")
    return problems


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when source and target share a file system (no second copy of the weights), else a copy."""
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _copy(source: Path, target: Path) -> None:
    """An independent copy (the kernel copies it: ``copyfile`` uses ``sendfile``, nothing passes through Python)."""
    if target.exists() or target.is_symlink():
        target.unlink()
    shutil.copyfile(source, target)
