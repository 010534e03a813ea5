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


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """``(field, wire type, tag start, value start, value end)`` of each field of the message in
    ``buf[start:end]`` (protobuf wire format; no groups)."""
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _read_varint(buf, pos)
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            stop = pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {tag_start}")
        if stop > end:
            raise ValueError(f"truncated protobuf field at byte {tag_start}")
        yield field, wire, tag_start, pos, stop
        pos = stop


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def load_weightless(path: str | Path, min_bytes: int = _BIG_PAYLOAD):
    """The ONNX model at ``path`` with every inline initializer of ``min_bytes`` or more turned into an
    external-data reference to its bytes inside ``path`` itself: nothing of the weights is read.

    Why: ``onnx.load`` reads a single-file graph whole and parses a second copy of it (2x the file: 1.7 GB for a
    0.86 GB graph at the 1B shape); this walks the file's protobuf fields through a memory map and copies only
    what is not a large ``raw_data``. ONNX Runtime then reads each weight from ``path`` when a session needs it
    (the graph's folder as its external-data folder)."""
    import mmap

    import onnx

    path = Path(path)
    model_bytes, graph_parts, inits = bytearray(), bytearray(), []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, _, tag, start, stop in _fields(buf, 0, len(buf)):
            if field != _MODEL_GRAPH:
                model_bytes += buf[tag:stop]
                continue
            for gfield, _, gtag, gstart, gstop in _fields(buf, start, stop):
                if gfield != _GRAPH_INITIALIZER:
                    graph_parts += buf[gtag:gstop]
                    continue
                header, raw = bytearray(), None
                for tfield, twire, ttag, tstart, tstop in _fields(buf, gstart, gstop):
                    if tfield == _TENSOR_RAW_DATA and twire == 2 and tstop - tstart >= min_bytes:
                        raw = (tstart, tstop - tstart)
                    else:
                        header += buf[ttag:tstop]
                tensor = onnx.TensorProto()
                tensor.ParseFromString(bytes(header))
                if raw is not None:
                    point_external(tensor, path.name, *raw)
                inits.append(tensor)
    model = onnx.ModelProto()
    model.ParseFromString(bytes(model_bytes))
    model.graph.MergeFromString(bytes(graph_parts))
    model.graph.initializer.extend(inits)
    return model


def tensor_array(tensor, base_dir, graph_file: str | Path | None = None) -> np.ndarray:
    """``tensor``'s values, ``tensor`` left as it is. External data is read the way ``onnx.load`` reads it (its
    checks: a file inside ``base_dir``, no symlink, a single hard link, in bounds), except a reference into
    ``graph_file`` itself (what :func:`load_weightless` makes), read here within the file's bounds: the graph
    file is the one being read, and it may be hard-linked (a Triton repository links ``model.onnx``)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    probe = onnx.TensorProto()
    probe.CopyFrom(tensor)
    where = {e.key: e.value for e in tensor.external_data}
    if graph_file is not None and where.get("location") == Path(graph_file).name:
        offset, length = int(where.get("offset", 0)), int(where.get("length", -1))
        with open(Path(base_dir) / Path(graph_file).name, "rb") as f:
            size = f.seek(0, 2)
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"{tensor.name}: its data lies outside {Path(graph_file).name} "
                                 f"(bytes {offset}..{offset + length} of {size})")
            f.seek(offset)
            data = f.read(length)
        del probe.external_data[:]
        probe.data_location = onnx.TensorProto.DEFAULT
        probe.raw_data = data
    else:
        load_external_data_for_tensor(probe, str(base_dir))
    return numpy_helper.to_array(probe)


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
