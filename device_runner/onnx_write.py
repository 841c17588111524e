"""Bake arrays into an ONNX model as initializers without the onnx package (not on the board).

Protobuf merges a repeated message field that appears twice, so appending a second
``ModelProto.graph`` (field 7) that holds only ``GraphProto.initializer`` entries (field 5)
adds those initializers to the model. An initializer with the name of a graph input is that
input's default value (ONNX IR >= 4), so ``evaluate.onnx`` with the trained weights appended
runs on the image alone: a deployable inference model.
"""
from __future__ import annotations

import numpy as np

FLOAT = 1  # TensorProto.DataType.FLOAT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian float32)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    out = b"".join(_field(1, 0, _varint(int(d))) for d in array.shape)
    out += _field(2, 0, _varint(FLOAT))
    out += _field(8, 2, name.encode())
    out += _field(9, 2, array.tobytes())
    return out


def with_initializers(model_bytes: bytes, arrays: dict) -> bytes:
    graph = b"".join(_field(5, 2, tensor_proto(name, arrays[name])) for name in sorted(arrays))
    return model_bytes + _field(7, 2, graph)
