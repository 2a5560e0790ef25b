"""Hostile and careless inputs to the files/network/data layer (issue 18): every file here is built by the test.

- paths from URLs stay inside the cache (percent-encoded slashes, dot segments, absolute paths), and the
  cache key is the whole URL (port, query): checked against an HTTP server on 127.0.0.1 and the files on disk;
- downloads: unannounced lengths that end early, chunked bodies cut short, trickling servers, oversized
  bodies, corrupt cache entries, servers whose file changed;
- memory: stride-0 / overlapping views, DEFLATE bombs (storage and data.pkl), pickle opcodes that allocate,
  a JPEG header declaring 30000 x 30000 and a flood of tiny TFRecords, each read in a child process whose
  peak resident memory (VmHWM, else ru_maxrss) must stay under 1 GB, with a clear error;
- malformed safetensors headers;
- concurrency and stale state: two first runs on one fresh cache / data directory (subprocesses, repeated),
  a prepared dataset whose source changed, empty shards, temporary directories of killed conversions.

Non-finite weights and corrupt converted caches are tested in tests/test_convert.py (they need its toy model).
"""
import http.server
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from data import clickme, preprocess
from data.download import cache_path, cached_download, download
from data.tfrecord import RecordError

ROOT = Path(__file__).resolve().parent.parent
GB = 1 << 30


# ---------------------------------------------------------------------------------------------------------
# A local server: any path -> its body; modes per path
# ---------------------------------------------------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.files, self.modes, self.requests, self.count = {}, {}, [], {}
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        n = srv.count[self.path] = srv.count.get(self.path, 0) + 1
        data = srv.files.get(self.path.split("?")[0] if self.path.split("?")[0] in srv.modes.get("strip_query", ())
                             else self.path)
        mode = srv.modes.get(self.path, "plain")
        if data is None:
            self.send_error(404)
            return
        if callable(data):
            data = data(n)
        if mode == "nolength":            # no Content-Length, no ranges, closes after the body; first reply cut
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if n == 1 else data)
            self.close_connection = True
            return
        if mode == "nolength_cut_always":  # ... and every reply cut at the same point
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        if mode == "chunked_cut":         # chunked transfer; the first reply ends without the last chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = data[: len(data) // 2] if n == 1 else data
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            if n > 1:
                self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
            return
        if mode == "trickle":             # announces the length, then one byte every 50 ms
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for b in data:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = _Server()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


# ---------------------------------------------------------------------------------------------------------
# Paths from URLs
# ---------------------------------------------------------------------------------------------------------

TRAVERSALS = [
    "/a/%2e%2e/%2e%2e/%2e%2e/escape.bin",          # percent-encoded dot segments
    "/a/..%2F..%2F..%2Fescape.bin",                # encoded slashes forming dot segments
    "/%2Ftmp%2Fescape.bin",                        # an absolute path in one segment
    "/a/%2e%2E%2fescape.bin",                      # mixed case
    "/..%5C..%5Cescape.bin",                       # encoded backslashes
    "/a/../../escape.bin",                         # plain dot segments (urllib does not remove them)
    "/a/./escape.bin",
    "/a//escape.bin",                              # empty segment
    "/a/%00escape.bin",                            # NUL
    "/%252e%252e/x.bin",                           # double-encoded: decoded once to '%2e%2e', a plain name
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_urls_write_nothing_outside_the_cache(tmp_path, server, path):
    server.files[path] = b"payload"
    cache = tmp_path / "sandbox" / "cache"
    cache.mkdir(parents=True)
    url = server.url + path
    if path.startswith("/%252e"):                    # harmless: stays inside, named '%2e%2e' literally
        got = cached_download(url, cache)
        assert got.read_bytes() == b"payload" and got.resolve().is_relative_to(cache.resolve())
    else:
        with pytest.raises(ValueError, match="unsafe segment|refusing"):
            cached_download(url, cache)
        assert server.requests == []                 # refused before any request
    assert _tree(tmp_path) - {"sandbox", "sandbox/cache"} <= {f"sandbox/cache/{p}" for p in _tree(cache)}
    assert not list(tmp_path.rglob("escape.bin"))


@pytest.mark.parametrize("filename", ["../escape.bin", "/tmp/escape.bin", "a/b.bin", "..", ".", "", "a\\b"])
def test_unsafe_filenames_and_hosts(tmp_path, filename):
    with pytest.raises(ValueError, match="unsafe|file name"):
        cache_path("http://example.com/x.bin", tmp_path, filename=filename)
    for url in ("http://../x.bin", "file:///etc/passwd", "http://exa mple.com/x", "ftp://example.com/x"):
        with pytest.raises(ValueError):
            cache_path(url, tmp_path)


def test_cache_key_is_the_whole_url(tmp_path, server):
    other = _Server()
    threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
    try:
        server.files["/f.bin"], other.files["/f.bin"] = b"first server", b"second server"
        server.files["/q.bin?v=1"], server.files["/q.bin?v=2"] = b"version 1", b"version 2"
        url2 = f"http://127.0.0.1:{other.server_address[1]}/f.bin"
        assert cached_download(server.url + "/f.bin", tmp_path).read_bytes() == b"first server"
        assert cached_download(url2, tmp_path).read_bytes() == b"second server"          # another port
        assert cached_download(server.url + "/q.bin?v=1", tmp_path).read_bytes() == b"version 1"
        assert cached_download(server.url + "/q.bin?v=2", tmp_path).read_bytes() == b"version 2"  # another query
        n = len(server.requests)
        assert cached_download(server.url + "/q.bin?v=1", tmp_path).read_bytes() == b"version 1"
        assert len(server.requests) == n                                                   # cached
    finally:
        other.shutdown()
        other.server_close()


# ---------------------------------------------------------------------------------------------------------
# Downloads: completeness, time, integrity
# ---------------------------------------------------------------------------------------------------------

BODY = bytes(range(256)) * 40


def test_unannounced_length_cut_early_is_not_cached_as_complete(tmp_path, server):
    server.files["/n.bin"], server.modes["/n.bin"] = BODY, "nolength"
    assert download(server.url + "/n.bin", tmp_path / "n.bin").read_bytes() == BODY
    assert server.count["/n.bin"] == 3            # cut, full, full again: two reads must agree
    # a server that always cuts at the same point is indistinguishable from a shorter file, unless pinned:
    server.files["/c.bin"], server.modes["/c.bin"] = BODY, "nolength_cut_always"
    with pytest.raises(ValueError, match="expected_size"):
        download(server.url + "/c.bin", tmp_path / "c.bin", expected_size=len(BODY))
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_unannounced_length_that_never_repeats_is_refused(tmp_path, server):
    server.files["/r.bin"], server.modes["/r.bin"] = (lambda n: bytes([n]) * 4096), "nolength"
    with pytest.raises(OSError, match="3 reads gave different bodies; pass expected_size= or sha256="):
        download(server.url + "/r.bin", tmp_path / "r.bin", retries=1)
    assert server.count["/r.bin"] == 3 and not list(tmp_path.iterdir())


def test_chunked_body_cut_early_is_retried(tmp_path, server):
    server.files["/k.bin"], server.modes["/k.bin"] = BODY, "chunked_cut"
    assert download(server.url + "/k.bin", tmp_path / "k.bin").read_bytes() == BODY
    assert server.count["/k.bin"] == 2


def test_trickling_server_times_out(tmp_path, server):
    server.files["/t.bin"], server.modes["/t.bin"] = BODY, "trickle"
    start = time.monotonic()
    with pytest.raises(OSError, match="bytes/s, under the minimum"):
        download(server.url + "/t.bin", tmp_path / "t.bin", timeout=0.5, min_rate=1000)
    with pytest.raises(OSError, match="deadline"):
        download(server.url + "/t.bin", tmp_path / "t.bin", timeout=5, min_rate=0, deadline=0.5)
    assert time.monotonic() - start < 10
    assert not list(tmp_path.iterdir())           # nothing partial kept


def test_oversized_downloads_are_refused(tmp_path, server):
    server.files["/big.bin"] = BODY
    with pytest.raises(OSError, match="announces 10240 bytes, more than the limit of 1000"):
        download(server.url + "/big.bin", tmp_path / "big.bin", max_size=1000)
    server.files["/endless.bin"], server.modes["/endless.bin"] = BODY, "nolength"     # no length announced
    with pytest.raises(OSError, match="more than the limit of 1000 bytes"):
        download(server.url + "/endless.bin", tmp_path / "endless.bin", max_size=1000)
    assert not list(tmp_path.iterdir())


def test_recorded_sha256_catches_corruption_and_changed_files(tmp_path, server):
    server.files["/s.bin"] = BODY
    url = server.url + "/s.bin"
    path = cached_download(url, tmp_path)
    record = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert record["size"] == len(BODY) and record["url"] == url
    data = bytearray(path.read_bytes())
    data[100] ^= 1                                  # a flipped bit in the cache
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its recorded"):
        assert cached_download(url, tmp_path).read_bytes() == BODY      # fetched again
    path.unlink()
    server.files["/s.bin"] = BODY[::-1]               # the server's file changed since the first download
    with pytest.raises(ValueError, match="recorded .* when it was first downloaded"):
        cached_download(url, tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):  # a pinned hash wins over the record
        cached_download(url, tmp_path, sha256="0" * 64)


# ---------------------------------------------------------------------------------------------------------
# Memory: hostile checkpoints and records, read in a child process
# ---------------------------------------------------------------------------------------------------------

_ZERO_BLOCK = None


def _deflated(zf: zipfile.ZipFile, name: str, parts: list) -> None:
    """A DEFLATE entry holding `parts` (bytes, or an int n: n zero bytes, a multiple of 16 MiB), built from one
    compressed 16 MiB block repeated (full flushes make blocks independent), so a 2 GB bomb takes a moment.
    Its CRC is not computed: a reader must refuse the entry before expanding it."""
    global _ZERO_BLOCK
    if _ZERO_BLOCK is None:
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        _ZERO_BLOCK = z.compress(bytes(1 << 24)) + z.flush(zlib.Z_FULL_FLUSH)
    c, out, size = zlib.compressobj(9, zlib.DEFLATED, -15), [], 0
    for p in parts:
        if isinstance(p, int):
            out.append(_ZERO_BLOCK * (p >> 24))
        else:
            out.append(c.compress(p) + c.flush(zlib.Z_FULL_FLUSH))
        size += p if isinstance(p, int) else len(p)
    out.append(c.flush(zlib.Z_FINISH))
    info = zipfile.ZipInfo(name)
    zf.writestr(info, b"".join(out))           # written stored; the central directory then says DEFLATE
    info.compress_type, info.file_size = zipfile.ZIP_DEFLATED, size


def _storage_zip(path: Path, pkl: bytes, storages: dict[str, bytes | int]):
    """A torch-style zip: archive/data.pkl + archive/data/<key>; a storage given as an int n is n zero bytes,
    DEFLATE-compressed (a decompression bomb)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            if isinstance(data, int):
                _deflated(zf, f"archive/data/{key}", [data])
            else:
                zf.writestr(f"archive/data/{key}", data)


def _global_pickle(tensors: dict, numel: int) -> bytes:
    """Like torch.save's data.pkl, by hand: GLOBAL opcodes for torch names (no torch import)."""
    buf = io.BytesIO()
    buf.write(b"\x80\x02}q\x00(")                                       # PROTO 2, EMPTY_DICT, MARK
    for name, (off, size, stride) in tensors.items():
        buf.write(pickle.dumps(name, 2)[2:-1])                          # the key (without PROTO/STOP)
        buf.write(b"ctorch._utils\n_rebuild_tensor_v2\n(")              # GLOBAL, MARK
        buf.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu")
        buf.write(pickle.dumps(numel, 2)[2:-1] + b"tQ")                 # numel, TUPLE, BINPERSID
        for v in (off, size, stride, False):
            buf.write(pickle.dumps(v, 2)[2:-1])
        buf.write(b"ccollections\nOrderedDict\n)Rt")                    # OrderedDict(), TUPLE
        buf.write(b"R")                                                  # REDUCE
    buf.write(b"u.")                                                     # SETITEMS, STOP
    return buf.getvalue()


_CHILD = textwrap.dedent("""
    import json, resource, sys, traceback
    sys.path.insert(0, sys.argv[1])
    from models import convert
    from data import clickme, preprocess, tfrecord
    def peak():
        # this process's peak resident memory: VmHWM (ru_maxrss would include the parent's before exec)
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = []
    for kind, path in json.loads(sys.argv[2]):
        try:
            if kind == "checkpoint":
                convert.read_checkpoint(path)
                msg = "no error"
            elif kind == "record":
                data = tfrecord.read_records(path)
                clickme.parse_clickme(data[0], path)
                msg = "no error"
            elif kind == "jpeg":
                preprocess.clickme_image(open(path, "rb").read())
                msg = "no error"
            elif kind == "records":
                msg = f"{len(tfrecord.read_records(path))} records"
        except (ValueError, OSError) as e:
            msg = f"{type(e).__name__}: {e}"
        except BaseException as e:
            msg = "RAW " + "".join(traceback.format_exception(e))[-500:]
        out.append([kind, path, msg, peak()])
    print(json.dumps(out))
""")


def _run_child(cases):
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), json.dumps([[k, str(p)] for k, p in cases])],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _jpeg_with_size(height: int, width: int, gray=False) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L" if gray else "RGB", (16, 16), 128).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")                                         # SOF0: FFC0 len prec height width
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    cases = []
    # 1. a stride-0 view of 2 floats claiming 2**30 elements (4 GiB); 2. an overlapping view (strides 1, 1)
    _storage_zip(d / "stride0.pth", _global_pickle({"w": (0, (1 << 30,), (0,))}, 2), {"0": bytes(8)})
    _storage_zip(d / "overlap.pth", _global_pickle({"w": (0, (1 << 15, 1 << 15), (1, 1))}, 1 << 16),
                 {"0": bytes(1 << 18)})                                  # 4 GiB from 256 KiB, inside the storage
    # 3. many small stride-0 views, each under 64 MiB, together 1.6 GiB
    _storage_zip(d / "stride0_many.pth",
                 _global_pickle({f"w{i}": (0, (1 << 22,), (0,)) for i in range(100)}, 1), {"0": bytes(4)})
    # 4. a DEFLATE bomb: 2 GB of zeros in a storage entry (2 MB compressed)
    _storage_zip(d / "deflate_storage.pth", _global_pickle({"w": (0, (127 << 22,), (1,))}, 127 << 22),
                 {"0": 127 << 24})
    # 5. a DEFLATE bomb in data.pkl: a 2 GB BINBYTES8 of zeros (2 MB compressed)
    with zipfile.ZipFile(d / "deflate_pkl.pth", "w") as zf:
        _deflated(zf, "archive/data.pkl", [b"\x80\x04\x8e" + struct.pack("<Q", 127 << 24), 127 << 24, b"."])
    # 6. a DEFLATE bomb under the data.pkl size limit but over the compression ratio: 30 MB of MARKs
    with zipfile.ZipFile(d / "deflate_pkl_small.pth", "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + b"(" * (30 << 20) + b".", zipfile.ZIP_DEFLATED)
    # 7-11. counted opcodes larger than the file: BINBYTES8, BINUNICODE8, BYTEARRAY8, LONG4, FRAME
    for name, op in (("binbytes8", b"\x8e" + struct.pack("<Q", 1 << 40)),
                     ("binunicode8", b"\x8d" + struct.pack("<Q", 1 << 40)),
                     ("bytearray8", b"\x96" + struct.pack("<Q", 1 << 40)),
                     ("long4", b"\x8b" + struct.pack("<i", (1 << 31) - 1)),
                     ("frame", b"\x95" + struct.pack("<Q", 1 << 40))):
        # FRAME passes the opcode scan (its size is not an argument read) and reaches the unpickler
        _storage_zip(d / f"{name}.pth", b"\x80\x05" + op + (b"N." if name == "frame" else b"abc."), {})
    # 12. an opcode flood: 3 M EMPTY_LIST (3 MB stored: each makes a list)
    _storage_zip(d / "flood.pth", b"\x80\x02" + b"]" * (3 << 20) + b".", {})
    # 13. a storage declaring 2**40 elements with an 8-byte entry
    _storage_zip(d / "numel.pth", _global_pickle({"w": (0, (2,), (1,))}, 1 << 40), {"0": bytes(8)})
    for name in ("stride0", "overlap", "stride0_many", "deflate_storage", "deflate_pkl", "deflate_pkl_small",
                 "binbytes8", "binunicode8", "bytearray8", "long4", "frame", "flood", "numel"):
        cases.append(("checkpoint", d / f"{name}.pth"))
    # 14. a ClickMe record whose image JPEG declares 30000 x 30000;     15. the same JPEG given to preprocessing
    from tests.test_data import example, frame
    huge = _jpeg_with_size(30000, 30000)
    (d / "huge.jpg").write_bytes(huge)
    (d / "huge.tfrecords").write_bytes(frame(example({"image": huge, "heatmap": _jpeg_with_size(64, 64, True),
                                                     "label": 1})))
    cases += [("record", d / "huge.tfrecords"), ("jpeg", d / "huge.jpg")]
    # 16. a flood of 500 000 empty records (8 MB): each 8-byte length CRC once padded to 1 KiB
    (d / "tiny.tfrecords").write_bytes(frame(b"") * 500_000)
    cases.append(("records", d / "tiny.tfrecords"))
    return cases


def test_bombs_fail_clearly_under_1_gb(bombs):
    results = _run_child(bombs)
    expected = {
        "stride0": "repeat their storage's elements", "overlap": "repeat their storage's elements",
        "stride0_many": "repeat their storage's elements", "deflate_storage": "decompression bomb",
        "deflate_pkl": "data.pkl declares", "deflate_pkl_small": "decompression bomb",
        "binbytes8": "cannot parse the checkpoint's pickle", "binunicode8": "cannot parse the checkpoint's pickle",
        "bytearray8": "cannot parse the checkpoint's pickle", "long4": "cannot parse the checkpoint's pickle",
        "frame": "cannot parse the checkpoint's pickle",
        "flood": "opcodes", "numel": "holds 8 bytes, expected", "huge": "30000 x 30000 pixels",
        "tiny": "500000 records"}
    report = []
    for kind, path, msg, peak in results:
        name = Path(path).stem
        report.append(f"{name:18s} {peak / 2**20:7.0f} MiB  {msg[:150]}")
        assert expected[name] in msg, (name, msg)
        assert not msg.startswith("RAW")
    print("\n".join(report))
    assert max(peak for *_, peak in results) < GB, "\n".join(report)


# ---------------------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------------------

BAD = r"x\.safetensors: malformed safetensors file \(.*"


def _safetensors(path: Path, header, data: bytes = bytes(64), raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


# The safetensors library validates the header; our message names the file and quotes its reason.
@pytest.mark.parametrize("header, raw, match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, BAD + "-8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [60, 68]}}, None, BAD + "offset for tensor `w`"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, None, BAD + "shape, data type, or offset"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, None, BAD + "offset for tensor `b`"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, BAD + "-2"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, None, BAD + 'string "2"'),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, None, BAD + "length 1"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, None, BAD + "0.0"),
    ({"w": [1, 2]}, None, BAD + "integer `1`"),
    ([1, 2], None, "unknown checkpoint format"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": 1}, None, BAD + "TensorInfo"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, None, BAD + "not fully covered"),
    ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, None, BAD + "X9"),
    ({"w": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]},
      "p": {"dtype": "U8", "shape": [62], "data_offsets": [2, 64]}}, None, "'w' has unsupported dtype 'F8_E8M0'"),
    (None, b"{\xff\xfe", BAD + "UTF-8"),
    (None, b"{" * 100_000, BAD + "JSON"),
])
def test_malformed_safetensors(tmp_path, header, raw, match):
    from models import convert
    _safetensors(tmp_path / "x.safetensors", header, raw_header=raw)
    with pytest.raises(ValueError, match=match):
        convert.read_checkpoint(tmp_path / "x.safetensors")
    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(ValueError, match=r"big\.safetensors: malformed safetensors file \(.*header too large"):
        convert.read_checkpoint(tmp_path / "big.safetensors")


# ---------------------------------------------------------------------------------------------------------
# Datasets: stale sources, empty shards, concurrent preparation
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.test_data import make_record, write_shard
    rng = np.random.default_rng(1)
    recs = [make_record(rng, label) for label in (5, 6, 7, 8)]
    a, b = tmp_path_factory.mktemp("src_a"), tmp_path_factory.mktemp("src_b")
    write_shard(a / "val-0.tfrecords", recs[:2])
    write_shard(b / "val-0.tfrecords", recs[2:])
    return a, b, recs


def _labels(ds):
    return [int(ds[i]["label"]) for i in range(len(ds))]


def test_prepared_dataset_follows_its_source(tmp_path, shards, caplog):
    caplog.set_level("WARNING", logger="data.clickme")   # other test modules lower the root logger's level
    a, b, recs = shards
    kw = dict(data_dir=tmp_path / "d", num_shards={"validation": 1})
    assert _labels(clickme.data_source(clickme_dir=a, **kw)) == [5, 6]
    record = json.loads((tmp_path / "d" / "clickme" / "default" / "1.0.0" / clickme.SOURCE_FILE).read_text())
    assert record["kind"] == "dir" and len(record["shards"][0]["sha256"]) == 64
    assert _labels(clickme.data_source(clickme_dir=b, **kw)) == [7, 8]          # another source: rebuilt
    assert "rebuilding" in caplog.text
    copy = tmp_path / "copy"
    shutil.copytree(b, copy)                                                    # same bytes elsewhere: reused
    caplog.clear()
    assert _labels(clickme.data_source(clickme_dir=copy, **kw)) == [7, 8]
    assert "rebuilding" not in caplog.text
    from tests.test_data import write_shard
    write_shard(copy / "val-0.tfrecords", recs[:1])                             # changed in place: rebuilt
    assert _labels(clickme.data_source(clickme_dir=copy, **kw)) == [5]
    assert _labels(clickme.data_source(data_dir=tmp_path / "d")) == [5]         # no source named: as prepared


def test_empty_shard_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv(clickme.ALLOW_EMPTY_ENV, raising=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "val-0.tfrecords").write_bytes(b"")
    with pytest.raises(RecordError, match="holds no records"):
        clickme.data_source(data_dir=tmp_path / "d", clickme_dir=tmp_path / "src", num_shards={"validation": 1})
    assert not (tmp_path / "d" / "clickme" / "default" / "1.0.0").exists()


_PREPARE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    from data import clickme
    ds = clickme.data_source(data_dir=sys.argv[2], clickme_dir=sys.argv[3], num_shards={"validation": 1})
    print(json.dumps([[int(ds[i]["label"]), ds[i]["image"].hex()[:64]] for i in range(len(ds))]))
""")


def test_two_first_preparations_on_one_data_dir(tmp_path, shards):
    a, _, recs = shards
    for attempt in range(3):
        data_dir = tmp_path / f"d{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(ROOT), str(data_dir), str(a)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        assert results[0] == results[1] and [r[0] for r in results[0]] == [5, 6]
        assert not [p for p in (data_dir / "clickme" / "default").iterdir() if p.name != "1.0.0"]


# ---------------------------------------------------------------------------------------------------------
# The huge-JPEG record through dataset preparation, in process
# ---------------------------------------------------------------------------------------------------------

def test_huge_jpeg_record_is_refused_at_preparation(tmp_path):
    from tests.test_data import example, frame
    (tmp_path / "src").mkdir()
    rec = example({"image": _jpeg_with_size(30000, 30000), "heatmap": _jpeg_with_size(64, 64, True), "label": 1})
    (tmp_path / "src" / "val-0.tfrecords").write_bytes(frame(rec))
    with pytest.raises(RecordError, match=r"record 0: feature 'image' declares 30000 x 30000 pixels"):
        clickme.data_source(data_dir=tmp_path / "d", clickme_dir=tmp_path / "src", num_shards={"validation": 1})
    with pytest.raises(ValueError, match="refused before decoding"):
        preprocess.clickme_heatmap(_jpeg_with_size(20000, 20000, True))
