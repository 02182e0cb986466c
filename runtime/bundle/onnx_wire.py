"""A dependency-free reader of the ONNX protobuf wire format: validates a ``.onnx`` file's structure
and lists the external-data files its tensors point at.

The runtime cannot assume the ``onnx`` package (a device may have only onnxruntime), and a bundle
must be checked before any engine opens it, so this walks the protobuf encoding itself: every
field's wire type and length is checked against the file, the messages that can hold tensors
(graph, node attributes, functions, training info, sparse tensors) are descended into, and
``raw_data`` / packed arrays are skipped by length, so a 1 GB model costs one pass over its
message headers, not over its weights. Field numbers are those of ``onnx/onnx.proto3`` (IR 10).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

#: Which fields of each message hold which sub-message (only those that can lead to a TensorProto).
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto {key = 1, value = 2}
_TENSOR_DATA_LOCATION = 14  # enum: 0 DEFAULT, 1 EXTERNAL
_TENSOR_NAME = 8
_MAX_DEPTH = 64  # nested subgraphs (If / Loop bodies); real models nest a few levels


class OnnxFormatError(ValueError):
    """The file is not a well-formed ONNX ModelProto (the message says where it breaks)."""


@dataclass(frozen=True)
class ExternalData:
    """One tensor's external-data reference: ``location`` relative to the model file, byte range."""

    tensor: str
    location: str
    offset: int
    length: int | None  # None = to the end of the file


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise OnnxFormatError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise OnnxFormatError(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: mmap.mmap | bytes, start: int, end: int):
    """Yield ``(field_number, wire_type, value)``: an int for varints, ``(begin, end)`` for length-delimited."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFormatError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise OnnxFormatError(f"field {number} runs {pos + size - end} bytes past its message at byte {pos}")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise OnnxFormatError(f"fixed-width field {number} runs past its message")
            yield number, wire, None
        else:  # 3 / 4: deprecated groups, never used by ONNX; 6 / 7: invalid
            raise OnnxFormatError(f"field {number} has wire type {wire}, which ONNX never writes")


def _text(buf: mmap.mmap | bytes, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFormatError(f"a string at byte {span[0]} is not UTF-8") from None


def _tensor(buf: mmap.mmap | bytes, start: int, end: int, out: list[ExternalData]) -> None:
    name, location_flag, entries = "", 0, {}
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = _text(buf, value)
        elif number == _TENSOR_DATA_LOCATION and wire == 0:
            location_flag = value
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    if n == 1:
                        key = _text(buf, v)
                    else:
                        val = _text(buf, v)
            entries[key] = val
    if location_flag == 0 and not entries:
        return
    if "location" not in entries:
        raise OnnxFormatError(f"tensor {name!r} is stored externally but names no location")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise OnnxFormatError(f"tensor {name!r}: external-data offset / length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise OnnxFormatError(f"tensor {name!r}: negative external-data offset / length")
    out.append(ExternalData(name, entries["location"], offset, length))


def _walk(buf: mmap.mmap | bytes, kind: str, start: int, end: int, out: list[ExternalData], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"subgraphs nested deeper than {_MAX_DEPTH} levels")
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is None or wire != 2:
            continue
        if child == "tensor":
            _tensor(buf, *value, out)
        else:
            _walk(buf, child, *value, out, depth + 1)


def read_onnx_external_data(path: str | Path) -> list[ExternalData]:
    """Validate ``path`` as an ONNX ModelProto and return its external-data references.

    Raises:
        OnnxFormatError: not a ModelProto (no ``ir_version`` first, no graph, a malformed field).
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise OnnxFormatError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # ModelProto serialises fields in number order: ir_version (field 1, varint) comes first.
            if buf[0] != 0x08:
                raise OnnxFormatError(f"first bytes {bytes(buf[:8]).hex()} are not an ir_version field")
            graphs = 0
            for number, wire, _value in _fields(buf, 0, len(buf)):
                if number == 7:
                    if wire != 2:
                        raise OnnxFormatError("the graph field is not a message")
                    graphs += 1
            if graphs != 1:
                raise OnnxFormatError(f"a model holds one graph, this one {graphs}")
            out: list[ExternalData] = []
            _walk(buf, "model", 0, len(buf), out, 0)
            return out
