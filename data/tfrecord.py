"""TFRecord files and tf.train.Example protos, read without TensorFlow.

Framing of one record (TensorFlow's record_writer):
    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2**32, c = crc32c(x)
Every CRC is checked (google-crc32c); a bad CRC, a truncated record or a malformed Example raises
`RecordError` naming the file and the record index. Nothing is skipped. Examples are parsed and encoded with
the tf.train.Example proto that tensorflow-datasets ships (`tensorflow_datasets.proto.tf_example_pb2`).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence

import google_crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tensorflow_datasets.proto import tf_example_pb2

_MASK_DELTA = 0xA282EAD8


class RecordError(ValueError):
    """A TFRecord file or a tf.train.Example that cannot be read exactly."""


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC32C (Castagnoli) of `data`, as TensorFlow's crc32c::Value."""
    return google_crc32c.value(data if isinstance(data, (bytes, np.ndarray)) else bytes(data))


def masked_crc32c(data: bytes | np.ndarray) -> int:
    """The CRC stored in TFRecord framing."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------- TFRecord
def read_records(path: str | os.PathLike) -> list[bytes]:
    """All records of an uncompressed TFRecord file, every length and data CRC checked."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        buf = f.read()
    view, records = np.frombuffer(buf, np.uint8), []   # zero-copy slices google-crc32c accepts
    pos, i, size = 0, 0, len(buf)
    while pos < size:
        if size - pos < 12:
            raise RecordError(f"{path}: record {i} (byte {pos}): truncated header "
                              f"({size - pos} of 12 bytes)")
        n, len_crc = struct.unpack_from("<QI", buf, pos)
        if masked_crc32c(view[pos:pos + 8]) != len_crc:
            raise RecordError(f"{path}: record {i} (byte {pos}): length CRC mismatch; the file is corrupt, "
                              "download it again")
        if size - pos - 12 < n + 4:
            raise RecordError(f"{path}: record {i} (byte {pos}): truncated data: the header announces "
                              f"{n} bytes + 4 bytes CRC, the file has {size - pos - 12} left")
        (data_crc,) = struct.unpack_from("<I", buf, pos + 12 + n)
        if masked_crc32c(view[pos + 12:pos + 12 + n]) != data_crc:
            raise RecordError(f"{path}: record {i} (byte {pos}): data CRC mismatch; the file is corrupt, "
                              "download it again")
        records.append(buf[pos + 12:pos + 12 + n])
        pos += 16 + n
        i += 1
    return records


def write_records(path: str | os.PathLike, records: Sequence[bytes]) -> None:
    """Writes an uncompressed TFRecord file."""
    with open(path, "wb") as f:
        for r in records:
            n = struct.pack("<Q", len(r))
            f.write(n + struct.pack("<I", masked_crc32c(n)) + r + struct.pack("<I", masked_crc32c(r)))


# ------------------------------------------------------------------------------------- tf.train.Example
def parse_example(buf: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """A serialized tf.train.Example -> {name: list[bytes] | float32 array | int64 array}."""
    try:
        example = tf_example_pb2.Example.FromString(bytes(buf))
    except (DecodeError, RuntimeError) as e:  # RuntimeError: recursion limit of the C++ parser
        raise RecordError(f"not a tf.train.Example ({e})") from None
    out: dict[str, list[bytes] | np.ndarray] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.asarray(feature.float_list.value, np.float32)
        elif kind == "int64_list":
            out[key] = np.asarray(feature.int64_list.value, np.int64)
        else:
            out[key] = []                                   # a Feature with no kind set is empty
    return out


def encode_example(features: Mapping[str, bytes | int | float | Sequence]) -> bytes:
    """{name: bytes | int | float or a list of one kind} -> a serialized tf.train.Example."""
    example = tf_example_pb2.Example()
    for key, value in features.items():
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, bytes) for v in values):
            feature.bytes_list.value.extend(values)
        elif all(isinstance(v, (int, np.integer)) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        elif all(isinstance(v, (float, int, np.floating, np.integer)) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise TypeError(f"feature {key!r}: values must all be bytes, ints or floats, got {value!r:.60}")
    return example.SerializeToString(deterministic=True)
