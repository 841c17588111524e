"""Bake arrays into an ONNX model as initializers without the onnx package (not on the board).

The protobuf wire format is walked field by field (``fields``): in ``ModelProto.graph``
(field 7) the inputs (``GraphProto.input``, field 11) named like an array are dropped and the
arrays are added as ``GraphProto.initializer`` entries (field 5); every other field is kept
byte for byte. So ``evaluate.onnx`` with the trained weights runs on the image alone, with
its weights as initializers only: a deployable inference model. ``with_metadata`` adds
``ModelProto.metadata_props`` (field 14: key 1, value 2), which onnxruntime shows as
``session.get_modelmeta().custom_metadata_map``.
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


def _read_varint(buf: bytes, at: int) -> tuple:
    value = shift = 0
    while True:
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def fields(buf: bytes) -> list:
    """[(number, wire type, the field's bytes, its payload)] of one protobuf message."""
    out, at = [], 0
    while at < len(buf):
        start = at
        key, at = _read_varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _read_varint(buf, at)
            payload = b""
        elif wire == 2:
            size, at = _read_varint(buf, at)
            payload, at = buf[at:at + size], at + size
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
            payload = b""
        else:
            raise ValueError(f"protobuf wire type {wire} is not in an ONNX model")
        out.append((number, wire, buf[start:at], payload))
    return out


def _name(value_info: bytes) -> str:
    """ValueInfoProto.name (field 1)."""
    return next((p.decode() for n, w, _, p in fields(value_info) if n == 1 and w == 2), "")


def with_initializers(model_bytes: bytes, arrays: dict) -> bytes:
    out = []
    for number, wire, raw, payload in fields(model_bytes):
        if number == 7 and wire == 2:  # the graph: its inputs named like an array go
            kept = [r for n, w, r, p in fields(payload)
                    if not (n == 11 and w == 2 and _name(p) in arrays)]
            added = [_field(5, 2, tensor_proto(name, arrays[name])) for name in sorted(arrays)]
            raw = _field(7, 2, b"".join(kept + added))
        out.append(raw)
    return b"".join(out)


def with_metadata(model_bytes: bytes, props: dict) -> bytes:
    """The model with these string key -> value pairs added to its metadata_props."""
    entries = [_field(14, 2, _field(1, 2, str(k).encode()) + _field(2, 2, str(v).encode()))
               for k, v in props.items()]
    return model_bytes + b"".join(entries)
