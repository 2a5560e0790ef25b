"""TFRecord files and tf.train.Example protos, read without TensorFlow or generated protobuf classes.

Framing of one record (TensorFlow's record_writer):
    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
    masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2**32, c = crc32c(x)
Every CRC is checked; a bad CRC, a truncated record or a malformed Example raises `RecordError` naming the
file and the record index. Nothing is skipped.

CRC32C (Castagnoli, reflected polynomial 0x82F63B78) is computed in NumPy, vectorised over many messages
(about 150 MB/s on one core). CRC is linear over GF(2): each message is left-padded with zeros (which leave a
zero-initialised register unchanged) to whole 1 KiB chunks of 256 words; word lane j of all chunks of all
messages runs a Horner scheme over the chunks (register = advance_1KiB(register) ^ word, two 64 Ki-entry
tables), and lane j is finally advanced over the 4 * (256 - j) bytes to the chunk end and XOR-ed with the
others. The 0xFFFFFFFF initial value is folded in by XOR-ing it into the first four message bytes.
"""
from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator, Sequence

import numpy as np

_POLY = np.uint32(0x82F63B78)
_CHUNK = 1024                      # bytes per chunk of the vectorised CRC
_LANES = _CHUNK // 4               # 4-byte words per chunk
_BATCH = 16 << 20                  # padded bytes per batch of the vectorised CRC
_SMALL = 64                        # messages shorter than this are computed byte by byte
_MASK_DELTA = 0xA282EAD8


class RecordError(ValueError):
    """A TFRecord file or a tf.train.Example that cannot be read exactly."""


# ---------------------------------------------------------------------------------------------- CRC32C
def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ _POLY, t >> 1)
    return t


_T8 = _byte_table()


def _advance(r: np.ndarray, nbytes: int) -> np.ndarray:
    """Advances zero-initialised CRC registers `r` over `nbytes` zero bytes, one byte at a time."""
    for _ in range(nbytes):
        r = _T8[r & 0xFF] ^ (r >> 8)
    return r


def _linear_table(images: np.ndarray) -> np.ndarray:
    """Table of a GF(2)-linear map over all 2**k inputs, from the images of the k basis bits."""
    t = np.zeros(1, np.uint32)
    for im in images:
        t = np.concatenate([t, t ^ im])
    return t


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lo, hi: advance a register over one chunk of zero bytes, indexed by its low / high 16 bits;
    lanes: flat (_LANES, 4, 256) byte tables advancing word lane j over the 4 * (_LANES - j) bytes from
    its start to its chunk's end."""
    chunk = _advance(np.uint32(1) << np.arange(32, dtype=np.uint32), _CHUNK)
    bits = np.uint32(1) << np.arange(8, dtype=np.uint32)
    basis = bits[None] << (8 * np.arange(4, dtype=np.uint32))[:, None]      # (byte k, bit)
    lanes = np.empty((_LANES, 4, 256), np.uint32)
    for j in range(_LANES - 1, -1, -1):
        basis = _advance(basis, 4)
        lanes[j] = [_linear_table(b) for b in basis]
    return _linear_table(chunk[:16]), _linear_table(chunk[16:]), lanes.reshape(-1)


def _crc32c_scalar(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = int(_T8[(c ^ b) & 0xFF]) ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_many(buf: bytes | np.ndarray, starts: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
    """CRC32C of the messages buf[s:s+n] for each (s, n), as a uint32 array."""
    buf = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    out = np.zeros(len(starts), np.uint32)
    short = lengths < _SMALL
    for n in np.unique(lengths[short]).tolist():               # short messages (TFRecord length fields):
        sel = np.flatnonzero(short & (lengths == n))           # byte by byte, vectorised over messages
        for b in range(0, len(sel), 1 << 16):
            part = sel[b:b + (1 << 16)]
            data = buf[starts[part][:, None] + np.arange(n)]
            r = np.full(len(part), 0xFFFFFFFF, np.uint32)
            for k in range(n):
                r = _T8[(r ^ data[:, k]) & 0xFF] ^ (r >> np.uint32(8))
            out[part] = r ^ np.uint32(0xFFFFFFFF)
    idx = np.flatnonzero(~short)
    if not len(idx):
        return out
    idx = idx[np.argsort(lengths[idx], kind="stable")]         # equal chunk counts become adjacent
    # Batches of at most _BATCH padded bytes: many tiny messages (each padded to 1 KiB) cost no more memory
    # than a bounded multiple of the file.
    padded = np.cumsum(-(-lengths[idx] // _CHUNK)) * _CHUNK
    first = 0
    while first < len(idx):
        base = padded[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(padded, base + _BATCH, side="right")))
        sel = idx[first:last]
        out[sel] = _crc_sorted(buf, starts[sel], lengths[sel])
        first = last
    return out


def _crc_sorted(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of messages of >= 4 bytes, sorted by length."""
    nchunks = -(-lengths // _CHUNK)
    end = np.cumsum(nchunks) * _CHUNK
    begin = end - lengths                                      # left-padded: each ends on a chunk boundary
    flat = np.zeros(int(end[-1]), np.uint8)
    for b, s, n in zip(begin.tolist(), starts.tolist(), lengths.tolist()):
        flat[b:b + n] = buf[s:s + n]
    for k in range(4):                                         # init 0xFFFFFFFF == first 4 bytes XOR 0xFF
        flat[begin + k] ^= 0xFF
    words = flat.view("<u4").reshape(-1, _LANES)
    lo, hi, lanes = _tables()
    lane = np.arange(_LANES)[None] * (4 * 256)                # offsets of the lanes' tables
    res, row, m = np.empty(len(starts), np.uint32), 0, 0
    for n, g in zip(*(u.tolist() for u in np.unique(nchunks, return_counts=True))):
        block = words[row:row + g * n].reshape(g, n, _LANES)   # g messages of n chunks each
        s = block[:, 0].copy()
        for t in range(1, n):                                  # Horner over chunks, per word lane
            x = s
            s = lo[x & 0xFFFF]
            s ^= hi[x >> 16]
            s ^= block[:, t]
        r = lanes[lane + (s & 0xFF)] ^ lanes[lane + 256 + ((s >> 8) & 0xFF)]
        r ^= lanes[lane + 512 + ((s >> 16) & 0xFF)]
        r ^= lanes[lane + 768 + (s >> 24)]
        res[m:m + g] = np.bitwise_xor.reduce(r, axis=1)
        row, m = row + g * n, m + g
    return res ^ np.uint32(0xFFFFFFFF)


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of `data`, as TensorFlow's crc32c::Value."""
    return int(crc32c_many(data, [0], [len(data)])[0])


def _mask(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, np.uint32)
    return ((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(_MASK_DELTA)


def masked_crc32c(data: bytes) -> int:
    """The CRC stored in TFRecord framing."""
    return int(_mask(np.array([crc32c(data)]))[0])


# ------------------------------------------------------------------------------------------- TFRecord
def read_records(path: str | os.PathLike, *, check_crc: bool = True) -> list[bytes]:
    """All records of an uncompressed TFRecord file, every length and data CRC checked."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        buf = f.read()
    starts, lengths, crcs = [], [], []                         # [length field, data] per record
    pos, i, size = 0, 0, len(buf)
    while pos < size:
        if size - pos < 12:
            raise RecordError(f"{path}: record {i} (byte {pos}): truncated header "
                              f"({size - pos} of 12 bytes)")
        n, len_crc = struct.unpack_from("<QI", buf, pos)
        if size - pos - 12 < n + 4:
            raise RecordError(f"{path}: record {i} (byte {pos}): truncated data: the header announces "
                              f"{n} bytes + 4 bytes CRC, the file has {size - pos - 12} left")
        (data_crc,) = struct.unpack_from("<I", buf, pos + 12 + n)
        starts += [pos, pos + 12]
        lengths += [8, n]
        crcs += [len_crc, data_crc]
        pos += 16 + n
        i += 1
    if check_crc and starts:
        bad = np.flatnonzero(_mask(crc32c_many(buf, starts, lengths)) != np.asarray(crcs, np.uint32))
        if len(bad):
            k = int(bad[0])
            what = "length" if k % 2 == 0 else "data"
            raise RecordError(f"{path}: record {k // 2} (byte {starts[k - k % 2]}): {what} CRC mismatch "
                              f"({len(bad)} bad CRC(s) in the file); the file is corrupt, download it again")
    return [buf[s:s + n] for s, n in zip(starts[1::2], lengths[1::2])]


def write_records(path: str | os.PathLike, records: Sequence[bytes]) -> None:
    """Writes an uncompressed TFRecord file."""
    with open(path, "wb") as f:
        for r in records:
            n = struct.pack("<Q", len(r))
            f.write(n + struct.pack("<I", masked_crc32c(n)) + r + struct.pack("<I", masked_crc32c(r)))


# ------------------------------------------------------------------------------- protobuf wire format
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise RecordError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise RecordError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized message; value: int, bytes (length-delimited,
    fixed32, fixed64)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            n = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise RecordError(f"unsupported protobuf wire type {wire} (field {field})")
        if pos > end:
            raise RecordError(f"truncated field {field}")
        yield field, wire, value


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_feature(buf: bytes) -> list[bytes] | np.ndarray:
    value: list[bytes] | np.ndarray = []                       # a Feature with no kind set is empty
    for kind, wire, lst in _fields(buf):
        if wire != 2 or kind not in (1, 2, 3):
            continue
        if kind == 1:                                          # BytesList: repeated bytes value = 1
            value = [v for f, w, v in _fields(lst) if f == 1 and w == 2]
        elif kind == 2:                                        # FloatList: repeated float, packed or not
            parts = [v for f, w, v in _fields(lst) if f == 1 and w in (2, 5)]
            value = np.frombuffer(b"".join(parts), "<f4").astype(np.float32)
        else:                                                  # Int64List: repeated int64, packed or not
            ints: list[int] = []
            for f, w, v in _fields(lst):
                if f == 1 and w == 0:
                    ints.append(_int64(v))
                elif f == 1 and w == 2:
                    p = 0
                    while p < len(v):
                        x, p = _varint(v, p)
                        ints.append(_int64(x))
            value = np.asarray(ints, np.int64)
    return value


def parse_example(buf: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """A serialized tf.train.Example -> {name: list[bytes] | float32 array | int64 array}."""
    out = {}
    for f, w, features in _fields(buf):                        # Example.features = 1
        if f != 1 or w != 2:
            continue
        for g, w2, entry in _fields(features):                 # Features.feature = 1 (map entries)
            if g != 1 or w2 != 2:
                continue
            key, feature = b"", b""                            # proto3 defaults
            for h, w3, v in _fields(entry):                    # entry: key = 1, value = 2
                if h == 1 and w3 == 2:
                    key = v
                elif h == 2 and w3 == 2:
                    feature = v
            out[key.decode("utf-8", "replace")] = _parse_feature(feature)
    return out
