"""An ONNX file read just far enough, without the onnx package, to find tensors kept outside it.

A bundle's graphs hold all their weights (docs/bundle-format.md): onnxruntime would otherwise read
"external data" files beside the graph that no hash in the manifest covers. The runtime cannot
import onnx (not a runtime dependency), so this walks the protobuf wire format itself, following
only the fields that can lead to a TensorProto; everything else is skipped by its length.
"""

from __future__ import annotations

from typing import NamedTuple

# Field numbers from onnx.proto (tests/test_hostile_bundles.py checks them against onnx's descriptors):
# message -> {field number: message type of that field}, for the fields that can hold a tensor.
NESTED = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "FunctionProto": {7: "NodeProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14  # TensorProto's fields
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5  # wire types; groups (3, 4) are not used by onnx.proto


class ProtobufError(ValueError):
    """The bytes are not a protobuf message (truncated, or not ONNX at all)."""


class ExternalTensor(NamedTuple):
    name: str
    location: str


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ProtobufError(f"a varint runs past its message at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value) of one message; value is an int, or (start, end) for BYTES."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = _varint(data, pos, end)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, pos = None, pos + size
        elif wire == BYTES:
            size, pos = _varint(data, pos, end)
            value, pos = (pos, pos + size), pos + size
        else:
            raise ProtobufError(f"wire type {wire} at byte {pos}")
        if pos > end:
            raise ProtobufError(f"field {number} runs past its message (byte {pos} of {end})")
        yield number, wire, value


def _text(data: bytes, span: tuple[int, int]) -> str:
    return data[span[0]:span[1]].decode("utf-8", errors="replace")


def _tensor(data: bytes, start: int, end: int):
    """An ExternalTensor if this TensorProto keeps its data outside the file, else None."""
    name, location, external, entries = "", "", False, False
    for number, wire, value in _fields(data, start, end):
        if number == TENSOR_NAME and wire == BYTES:
            name = _text(data, value)
        elif number == TENSOR_DATA_LOCATION and wire == VARINT:
            external = external or value == EXTERNAL
        elif number == TENSOR_EXTERNAL_DATA and wire == BYTES:
            entries = True
            entry = dict((n, _text(data, v)) for n, w, v in _fields(data, *value) if w == BYTES)
            if entry.get(ENTRY_KEY) == "location":
                location = entry.get(ENTRY_VALUE, "")
    return ExternalTensor(name, location or "?") if external or entries else None


def external_tensors(data: bytes) -> list[ExternalTensor]:
    """Every tensor of an ONNX model (initializers, Constant attributes, subgraphs, functions) whose
    data lives in another file; [] for a self-contained model. Raises ProtobufError on bytes that
    are not a protobuf message."""
    found = []
    stack = [("ModelProto", 0, len(data))]  # a stack, not recursion: subgraphs may nest deeply
    while stack:
        message, start, end = stack.pop()
        if message == "TensorProto":
            tensor = _tensor(data, start, end)
            if tensor is not None:
                found.append(tensor)
            continue
        nested = NESTED[message]
        for number, wire, value in _fields(data, start, end):
            if number in nested:
                if wire != BYTES:
                    raise ProtobufError(f"{message} field {number} has wire type {wire}, not a message")
                stack.append((nested[number], *value))
    return found
