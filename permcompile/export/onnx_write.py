"""Writing ONNX files: ``onnx.save`` with or without external data, and a streaming protobuf writer.

Above protobuf's 2 GB a graph cannot be serialised in one piece: :func:`write_model_streaming` writes the
graph with its large initializers replaced by marked placeholders, then streams each tensor's bytes into
the file as the protobuf wire format expects them, never holding a second copy of the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

def _save(proto, path: Path, rewrite_external: bool) -> None:
    import onnx

    if rewrite_external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        # Tensors loaded with load_external_data=False keep their external references untouched.
        onnx.save_model(proto, str(path))


_BIG_PAYLOAD = 1 << 16


_STREAM_MARK = "permcompile-stream:"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _detach_payloads(ir_model) -> dict[str, np.ndarray]:
    """Swap every large initializer of an ``onnx_ir`` model for a placeholder; return key -> array.

    The placeholders serialise as external-data references whose location is ``permcompile-stream:<key>``;
    :func:`write_model_streaming` writes the arrays in their place. Arrays are views where possible
    (a torch parameter's memory), so nothing large is copied.
    """
    import onnx_ir as ir

    payloads: dict[str, np.ndarray] = {}
    for value in ir_model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < _BIG_PAYLOAD:
            continue
        arr = np.ascontiguousarray(tensor.numpy())
        if arr.dtype.byteorder == ">":  # ONNX raw data is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        key = str(len(payloads))
        payloads[key] = arr
        value.const_value = ir.ExternalTensor(_STREAM_MARK + key, offset=0, length=arr.nbytes, dtype=tensor.dtype,
                                              shape=tensor.shape, name=tensor.name or value.name)
    return payloads


def point_external(init, location: str, offset: int, length: int) -> None:
    """Make ``init`` an external-data reference to ``length`` bytes at ``offset`` of ``location`` (its inline
    bytes, if any, are the caller's to clear)."""
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    init.data_location = init.EXTERNAL


def _stream_key(init) -> str | None:
    if init.data_location != init.EXTERNAL:
        return None
    for entry in init.external_data:
        if entry.key == "location" and entry.value.startswith(_STREAM_MARK):
            return entry.value[len(_STREAM_MARK):]
    return None


def write_model_streaming(proto, path: str | Path, payloads: Mapping[str, "np.ndarray | Callable[[], np.ndarray]"]
                          ) -> None:
    """Write ``proto`` whose large initializers are placeholders (see :func:`_detach_payloads`); a payload
    may be a function returning the array, called when its turn to be written comes.

    Why: protobuf's serialiser copies bytes fields at ~130 MB/s here (4 s for SmolLM2's 540 MB, plus as
    much again to build the message). A protobuf message is the concatenation of its fields, and a
    singular message field that occurs twice is merged by every parser, so the file is written as: the
    model without the placeholder initializers, then one ``graph { initializer { <header> raw_data:
    <payload> } }`` fragment per placeholder, the payload written straight from the array's memory.
    Parsers read back an ordinary single-file model (those initializers come last in the list).
    """
    import onnx

    head = onnx.ModelProto()
    head.CopyFrom(proto)  # small: placeholders carry no data
    streamed = []
    kept = []
    for init in head.graph.initializer:
        key = _stream_key(init)
        if key is None:
            kept.append(init)
            continue
        header = onnx.TensorProto()
        header.CopyFrom(init)
        header.ClearField("external_data")
        header.ClearField("data_location")
        streamed.append((header.SerializeToString(), payloads[key]))
    del head.graph.initializer[:]  # (re-adding the kept ones keeps their order)
    head.graph.initializer.extend(kept)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        for header, arr in streamed:
            if callable(arr):  # computed now, one tensor at a time (e.g. 8-bit codes, export/onnx_qdq.py)
                arr = np.ascontiguousarray(arr())
            size = arr.nbytes
            raw_tag = b"\x4a" + _varint(size)  # TensorProto.raw_data = 9, length-delimited
            tensor_len = len(header) + len(raw_tag) + size
            init_tag = b"\x2a" + _varint(tensor_len)  # GraphProto.initializer = 5
            f.write(b"\x3a" + _varint(len(init_tag) + tensor_len))  # ModelProto.graph = 7
            f.write(init_tag)
            f.write(header)
            f.write(raw_tag)
            f.write(memoryview(arr.reshape(-1)).cast("B"))
