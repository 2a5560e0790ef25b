"""data/: TFRecord + tf.train.Example reading, the tfds "clickme" builder (local and over HTTP), the study's
preprocessing and the input pipeline (the protocols: tests/test_evaluation.py).

References are independent of the code under test: CRC32C from its bitwise definition, tf.train.Example
written by a small encoder here, TensorFlow's resize / blur semantics written from their definitions
(interpolation matrices in float64 over TensorFlow's float32 sample positions, scipy.signal.correlate2d with
explicit 'SAME' padding: no TensorFlow here), torchvision's transforms for the model input and torch's
interpolate for the CAM upsampling.
"""
import http.server
import io
import math
import shutil
import struct
import threading

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from scipy.signal import correlate2d

from data import clickme, pipeline, preprocess
from data.download import cache_path, cached_download, download
from data.tfrecord import RecordError, crc32c, encode_example, parse_example, read_records

# ----------------------------------------------------------------------------------------------------------
# Independent writers: CRC32C from the bitwise definition, TFRecord framing, tf.train.Example wire format


def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def ref_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = ref_crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    n = struct.pack("<Q", len(record))
    return n + struct.pack("<I", _masked(n)) + record + struct.pack("<I", _masked(record))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _field(number: int, payload: bytes) -> bytes:            # length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def feature(value, packed: bool = True) -> bytes:
    if isinstance(value, bytes):
        return _field(1, _field(1, value))                                        # BytesList
    if isinstance(value, float):
        return _field(2, _field(1, struct.pack("<f", value)) if packed
                      else _varint(1 << 3 | 5) + struct.pack("<f", value))        # FloatList
    vals = value if isinstance(value, list) else [value]
    body = (_field(1, b"".join(_varint(v) for v in vals)) if packed
            else b"".join(_varint(1 << 3) + _varint(v) for v in vals))
    return _field(3, body)                                                        # Int64List


def example(features: dict, packed: bool = True) -> bytes:
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, feature(v, packed))) for k, v in features.items())
    return _field(1, entries)


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_record(rng, label: int, rgb_heatmap: bool = False) -> tuple[bytes, bytes, int]:
    yy, xx = np.mgrid[:256, :256]
    img = np.stack([xx, yy, (xx + yy) // 2], -1) * rng.uniform(0.3, 1) + rng.normal(0, 25, (256, 256, 3))
    cx, cy = rng.uniform(60, 200, 2)
    heat = 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / rng.uniform(1000, 5000))
    heat = np.clip(heat + rng.normal(0, 4, heat.shape), 0, 255).astype(np.uint8)
    if rgb_heatmap:
        heat = np.repeat(heat[..., None], 3, -1)
    return jpeg(np.clip(img, 0, 255).astype(np.uint8)), jpeg(heat), label


def write_shard(path, records, packed: bool = True):
    path.write_bytes(b"".join(frame(example({"image": i, "heatmap": h, "label": l}, packed))
                              for i, h, l in records))


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    return [make_record(rng, label) for label in (3, 999, 0, 281, 42, 7)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, records):
    d = tmp_path_factory.mktemp("clickme")
    write_shard(d / "val-0.tfrecords", records[:4])
    write_shard(d / "val-1.tfrecords", records[4:], packed=False)       # int64 list not packed
    return d


def _check_dataset(ds, records):
    assert len(ds) == len(records)
    for i, (img, heat, label) in enumerate(records):
        ex = ds[i]
        assert ex["image"] == img and ex["heatmap"] == heat           # the original JPEG bytes
        assert int(ex["label"]) == label and int(ex["index"]) == i
        assert (int(ex["shard"]), int(ex["record"])) == ((0, i) if i < 4 else (1, i - 4))


# ----------------------------------------------------------------------------------------------------------
# CRC32C, framing, Example parsing


def test_crc32c_vectors_and_reference():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA                 # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 4, 5, 8, 1023, 1024, 1025, 4099, 20000]
    buf = rng.integers(0, 256, sum(lengths) + 7, dtype=np.uint8).tobytes()
    starts = np.cumsum([7] + lengths[:-1])
    assert [crc32c(buf[s:s + n]) for s, n in zip(starts, lengths)] == [ref_crc32c(buf[s:s + n])
                                                                        for s, n in zip(starts, lengths)]


def test_parse_example_wire_format():
    ex = example({"b": b"\x00\xffxyz", "i": [1, -2, 2**62], "f": 1.5, "empty": []})
    out = parse_example(ex)
    assert out["b"] == [b"\x00\xffxyz"]
    np.testing.assert_array_equal(out["i"], [1, -2, 2**62])
    assert out["i"].dtype == np.int64 and out["f"].dtype == np.float32 and out["f"].tolist() == [1.5]
    assert len(out["empty"]) == 0
    unpacked = parse_example(example({"i": [5, -7], "f": 2.25}, packed=False))
    np.testing.assert_array_equal(unpacked["i"], [5, -7])
    assert unpacked["f"].tolist() == [2.25]
    # unknown fields (varint 2, fixed64 3) at every level are skipped
    noise = _varint(2 << 3) + _varint(9) + _varint(3 << 3 | 1) + bytes(8)
    assert parse_example(noise + _field(1, noise + _field(1, _field(1, b"k") + _field(2, feature(4)))))["k"] == [4]
    with pytest.raises(RecordError):
        parse_example(ex[:-3])


def test_encode_example_matches_the_wire_format():
    for value in (b"\x00\xffxyz", [1, -2, 2**62], 2.25):                # one feature: the hand-written bytes
        assert encode_example({"k": value}) == example({"k": value})
    out = parse_example(encode_example({"image": b"jpeg", "label": 7, "f": [0.5, 1.5]}))
    assert out["image"] == [b"jpeg"] and out["label"].tolist() == [7] and out["f"].tolist() == [0.5, 1.5]
    with pytest.raises(TypeError, match="feature 'x'"):
        encode_example({"x": [b"a", 1]})


def test_read_records_and_errors(tmp_path, records):
    recs = [example({"image": i, "heatmap": h, "label": l}) for i, h, l in records[:3]]
    good = b"".join(frame(r) for r in recs)
    path = tmp_path / "x.tfrecords"
    path.write_bytes(good)
    assert read_records(path) == recs

    def bad(data: bytes, match: str):
        path.write_bytes(data)
        with pytest.raises(RecordError, match=match) as e:
            read_records(path)
        assert str(path) in str(e.value)

    second = len(frame(recs[0]))
    flip = bytearray(good)
    flip[second + 12 + 100] ^= 1                                            # data of record 1
    bad(bytes(flip), r"record 1 .*data CRC mismatch")
    flip = bytearray(good)
    flip[second + 2] ^= 1                                                  # length field of record 1
    bad(bytes(flip), r"record 1 .*(CRC mismatch|truncated)")
    flip = bytearray(good)
    flip[second + 8] ^= 1                                                  # length CRC of record 1
    bad(bytes(flip), r"record 1 .*length CRC mismatch")
    third = second + len(frame(recs[1]))
    bad(good[:third + 500], r"record 2 .*truncated data")
    bad(good[:third + 5], r"record 2 .*truncated header")


def test_parse_clickme_errors(records):
    img, heat, _ = records[0]
    ok = clickme.parse_clickme(example({"image": img, "heatmap": heat, "label": 5}), "f: record 0")
    assert ok == {"image": img, "heatmap": heat, "label": 5}
    rgb_heat = make_record(np.random.default_rng(1), 1, rgb_heatmap=True)[1]
    cases = [({"image": img, "heatmap": rgb_heat, "label": 1}, "'heatmap' is a 3-channel"),
             ({"image": heat, "heatmap": heat, "label": 1}, "'image' is a 1-channel"),
             ({"image": img, "label": 1}, "missing feature 'heatmap'"),
             ({"image": img, "heatmap": heat, "label": [1, 2]}, "'label' must be a int64_list with one value"),
             ({"image": img, "heatmap": heat, "label": b"1"}, "'label' must be a int64_list"),
             ({"image": img, "heatmap": b"not a jpeg", "label": 1}, "'heatmap' is not a readable JPEG"),
             ({"image": img, "heatmap": heat, "label": 1000}, "label 1000 outside")]
    for features, match in cases:
        with pytest.raises(RecordError, match=match) as e:
            clickme.parse_clickme(example(features), "shard.tfrecords: record 7")
        assert "shard.tfrecords: record 7" in str(e.value)


def test_jpeg_channels_are_checked(records):
    img, heat, _ = records[0]
    with pytest.raises(ValueError, match=r"heatmap is a 3-channel \(YCbCr\) JPEG, expected a 1-channel grayscale"):
        preprocess.decode_heatmap(img)
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(cmyk, format="JPEG")
    with pytest.raises(RecordError, match=r"r: feature 'image' is a 4-channel \(CMYK\) JPEG, expected a 3-channel"):
        clickme.parse_clickme(example({"image": cmyk.getvalue(), "heatmap": heat, "label": 1}), "r")


# ----------------------------------------------------------------------------------------------------------
# The tfds builder


def test_builder_from_local_dir(tmp_path, shard_dir, records):
    ds = clickme.data_source("validation", data_dir=tmp_path, clickme_dir=shard_dir,
                             num_shards={"validation": 2})
    _check_dataset(ds, records)
    assert sorted(p.name for p in (tmp_path / "clickme" / "default" / "1.0.0").iterdir() if "array_record" in p.name)
    decoded = clickme.data_source("validation", data_dir=tmp_path, decode=True)[1]   # prepared: no kwargs needed
    assert decoded["image"].shape == (256, 256, 3) and decoded["heatmap"].shape == (256, 256, 1)
    b = next(pipeline.batches(ds, batch_size=8, workers=2))
    assert b["index"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and b["valid"].tolist() == [True] * 6 + [False] * 2
    assert b["label"][:6].tolist() == [label for _, _, label in records]
    np.testing.assert_array_equal(b["heatmap"][5], preprocess.clickme_heatmap(records[5][1]))


def test_builder_errors_name_file_and_record(tmp_path, records):
    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "val-0.tfrecords", records[:2])
    rgb = make_record(np.random.default_rng(2), 5, rgb_heatmap=True)
    write_shard(src / "val-1.tfrecords", [records[2], rgb])
    with pytest.raises(RecordError, match=r"val-1\.tfrecords: record 1: feature 'heatmap' is a 3-channel"):
        clickme.data_source("validation", data_dir=tmp_path / "a", clickme_dir=src, num_shards={"validation": 2})
    write_shard(src / "val-1.tfrecords", records[2:4])
    data = bytearray((src / "val-1.tfrecords").read_bytes())
    data[len(frame(example({"image": records[2][0], "heatmap": records[2][1], "label": records[2][2]}))) + 40] ^= 4
    (src / "val-1.tfrecords").write_bytes(bytes(data))
    with pytest.raises(RecordError, match=r"val-1\.tfrecords: record 1 .*CRC mismatch"):
        clickme.data_source("validation", data_dir=tmp_path / "b", clickme_dir=src, num_shards={"validation": 2})
    (src / "val-1.tfrecords").write_bytes(bytes(data[:-10]))
    with pytest.raises(RecordError, match=r"val-1\.tfrecords: record 1 .*truncated"):
        clickme.data_source("validation", data_dir=tmp_path / "c", clickme_dir=src, num_shards={"validation": 2})
    with pytest.raises(FileNotFoundError, match="no shard 2 of the validation split"):
        clickme.data_source("validation", data_dir=tmp_path / "d", clickme_dir=src, num_shards={"validation": 3})
    for d in "abcd":                     # nothing half-written is left as a usable dataset
        assert not (tmp_path / d / "clickme" / "default" / "1.0.0").exists()


class _Server(http.server.ThreadingHTTPServer):
    """Serves `files` ({url path: bytes}); paths in `break_once` send half their body and drop the
    connection on their first request; with `ranges` False, Range headers are ignored (full 200 reply)."""

    def __init__(self, files, break_once=(), ranges=True):
        self.files, self.break_once, self.ranges, self.requests = files, set(break_once), ranges, []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and srv.ranges:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.break_once:
            srv.break_once.discard(self.path)
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(shard_dir):
    servers = []

    def start(**kw):
        files = {f"/val/{p.name}": p.read_bytes() for p in shard_dir.iterdir()}
        srv = _Server(files, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("ranges", [True, False], ids=["resume", "restart"])
def test_builder_downloads_broken_connection(tmp_path, server, records, ranges):
    srv, url = server(break_once={"/val/val-0.tfrecords"}, ranges=ranges)
    ds = clickme.data_source("validation", data_dir=tmp_path, base_url=url, num_shards={"validation": 2})
    _check_dataset(ds, records)
    first = [r for r in srv.requests if r[0] == "/val/val-0.tfrecords"]
    assert len(first) == 2 and first[0][1] is None and first[1][1] is not None      # retried with a Range
    cache = tmp_path / "downloads" / "clickme"
    for i in range(2):                   # cache / host / hash of the whole URL / name
        assert cache_path(f"{url}/val/val-{i}.tfrecords", cache).is_file()
    # cached: preparing again (dataset removed, downloads kept) makes no request
    n = len(srv.requests)
    shutil.rmtree(tmp_path / "clickme")
    _check_dataset(clickme.data_source("validation", data_dir=tmp_path, base_url=url,
                                       num_shards={"validation": 2}), records)
    assert len(srv.requests) == n


def test_download_verifies_size(tmp_path, server, shard_dir):
    srv, url = server()
    size = (shard_dir / "val-0.tfrecords").stat().st_size
    with pytest.raises(ValueError, match="expected_size"):
        download(f"{url}/val/val-0.tfrecords", tmp_path / "a", expected_size=size + 1)
    assert not any(tmp_path.iterdir())                                  # nothing half-written
    p = cached_download(f"{url}/val/val-0.tfrecords", tmp_path, expected_size=size)
    assert p.read_bytes() == (shard_dir / "val-0.tfrecords").read_bytes()
    with pytest.raises(OSError, match="HTTP 404"):
        download(f"{url}/val/val-9.tfrecords", tmp_path / "b")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing against TensorFlow semantics written from the definitions (float64)


def tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """tf.image.resize bilinear, antialias=False: half-pixel centres, edge clamping (resize_bilinear_op.cc)."""
    m = np.zeros((n_out, n_in))
    scale = np.float32(n_in) / np.float32(n_out)
    for i in range(n_out):
        src = float((np.float32(i) + np.float32(0.5)) * scale - np.float32(0.5))    # TF computes it in float32
        f = math.floor(src)
        w = src - f
        m[i, min(max(f, 0), n_in - 1)] += 1 - w
        m[i, min(max(f + 1, 0), n_in - 1)] += w
    return m


def ref_resize(x: np.ndarray, size) -> np.ndarray:
    my, mx = tf_bilinear_matrix(x.shape[0], size[0]), tf_bilinear_matrix(x.shape[1], size[1])
    return np.einsum("ij,jk...,lk->il...", my, np.asarray(x, np.float64), mx, optimize=True)


def ref_kernel() -> np.ndarray:
    """Harmonization's gaussian_kernel(10, 10): columns x = -5..4, rows y = 4..-5."""
    k = np.empty((10, 10))
    for row in range(10):
        for col in range(10):
            x, y = col - 5, 4 - row
            k[row, col] = math.exp(-(x * x + y * y) / (2 * 10 ** 2))
    return k / k.sum()


def ref_heatmap(gray: np.ndarray) -> np.ndarray:
    h = ref_resize(gray, (64, 64))
    h = correlate2d(np.pad(h, ((4, 5), (4, 5))), ref_kernel(), mode="valid")   # tf.nn.conv2d 'SAME'
    return ref_resize(h, (224, 224))


def test_heatmap_and_image_match_tensorflow_semantics(records):
    for img, heat, _ in records[:3]:
        gray = preprocess.decode_heatmap(heat)
        got = preprocess.clickme_heatmap(heat)
        assert got.dtype == np.float32 and got.shape == (224, 224)
        assert np.abs(got - ref_heatmap(gray)).max() <= 1e-3
        rgb = preprocess.decode_image(img)
        got = preprocess.clickme_image(img)
        assert got.dtype == np.float32 and got.shape == (224, 224, 3)
        assert np.abs(got - ref_resize(rgb, (224, 224))).max() <= 1e-3
    np.testing.assert_allclose(preprocess.blur_kernel(), ref_kernel(), rtol=1e-6)
    # upsampling and odd sizes too
    x = np.random.default_rng(0).random((7, 9, 2)).astype(np.float32) * 255
    assert np.abs(preprocess.resize_bilinear(x, (224, 13)) - ref_resize(x, (224, 13))).max() <= 1e-3


def test_jpeg_decoder_difference_is_bounded(records):
    """simplejpeg with TF's settings (fast integer IDCT, fancy upsampling) is what tf.io.decode_jpeg returns
    (checked bit for bit against TensorFlow when the project was set up; no TensorFlow here). PIL uses the
    accurate IDCT: identical to simplejpeg's accurate mode, a few grey levels from TF's, and under one grey
    level after the heatmap pipeline."""
    for img, heat, _ in records:
        pil_rgb = np.asarray(Image.open(io.BytesIO(img))).astype(int)
        pil_gray = np.asarray(Image.open(io.BytesIO(heat))).astype(int)
        assert np.array_equal(simplejpeg.decode_jpeg(img, colorspace="RGB"), pil_rgb)
        assert np.array_equal(simplejpeg.decode_jpeg(heat, colorspace="GRAY")[..., 0], pil_gray)
        fast_rgb, fast_gray = preprocess.decode_image(img).astype(int), preprocess.decode_heatmap(heat).astype(int)
        assert 0 < np.abs(fast_rgb - pil_rgb).max() <= 8
        assert np.abs(fast_gray - pil_gray).max() <= 3
        assert np.abs(preprocess.clickme_heatmap(heat) - ref_heatmap(pil_gray)).max() <= 1.0


class _Entry:
    def __init__(self, resize_size, input_size, interpolation="bicubic"):
        self.resize_size, self.input_size, self.interpolation = resize_size, input_size, interpolation
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


STUDY_TRANSFORMS = {"resnet50": (235, 224), "convnext_tiny": (256, 224), "caformer_s18": (224, 224),
                    "fastvit_sa24": (256, 256)}


def test_model_input_matches_torchvision(records):
    from torchvision import transforms as T

    import models

    image = preprocess.clickme_image(records[0][0])
    for name, (r, c) in STUDY_TRANSFORMS.items():
        entry = models.get_entry(name)
        assert (entry.resize_size, entry.input_size, entry.interpolation) == (r, c, "bicubic"), name
        ref = T.Compose([T.Resize(r, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(c), T.ToTensor(),
                         T.Normalize(entry.mean, entry.std)])(Image.fromarray(image.astype(np.uint8)))
        got = preprocess.model_input(image, entry)
        assert got.shape == (c, c, 3) and got.dtype == np.float32
        assert np.abs(got - ref.numpy().transpose(1, 2, 0)).max() <= 1e-6, name
    with pytest.raises(ValueError, match="larger than the resized image"):
        preprocess.model_input(image, _Entry(224, 256))


def test_rand_augment_spec_matches_timm():
    """RandAugment.from_string reads timm's config sections as timm's rand_augment_transform does."""
    from timm.data.auto_augment import rand_augment_transform

    from data import augment
    for spec in ("rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.7-mstd101-mmax15-inc0", "rand-n1-m10-mstd0"):
        timm_ra, ours = rand_augment_transform(spec, {}), augment.RandAugment.from_string(spec)
        op = timm_ra.ops[0]
        assert [o.name for o in timm_ra.ops] == list(ours.ops) and timm_ra.num_layers == ours.num_layers, spec
        assert (op.prob, op.magnitude, op.magnitude_std) == (ours.prob, ours.magnitude, ours.magnitude_std), spec
        assert (op.magnitude_max or augment._LEVEL_DENOM) == ours.magnitude_max, spec
    for spec, match in (("rnd-m9", "must start with 'rand-'"), ("rand-q3", "unknown RandAugment section 'q3'"),
                        ("rand-m", "bad RandAugment section 'm'")):
        with pytest.raises(ValueError, match=match):
            augment.RandAugment.from_string(spec)


def test_model_input_refuses_unknown_interpolation(records):
    image = preprocess.clickme_image(records[0][0])
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        preprocess.model_input(image, _Entry(224, 224, "cubic"))        # even where nothing is resized


# ----------------------------------------------------------------------------------------------------------
# Pipeline


def test_pipeline_shards_pad_and_preprocess(records):
    source = [{"image": i, "heatmap": h, "label": l, "index": k} for k, (i, h, l) in enumerate(records * 2)]
    n, batch = 11, 2                                   # 11 records, 3 processes: shards of 3, 4, 4
    seen = []
    steps = pipeline.num_batches(n, batch, 3)
    for p in range(3):
        out = list(pipeline.batches(source, _Entry(256, 224), batch_size=batch, limit=n, process_index=p,
                                    process_count=3, workers=2))
        assert len(out) == steps == 2
        for b in out:
            assert b["image"].shape == (batch, 224, 224, 3) and b["image"].dtype == np.float32
            assert b["heatmap"].shape == (batch, 224, 224) and b["label"].dtype == np.int32
            assert b["index"].dtype == np.int64 and b["valid"].dtype == bool
            pad = ~b["valid"]
            assert (b["index"][pad] == -1).all() and not b["image"][pad].any() and not b["heatmap"][pad].any()
            for k in np.flatnonzero(b["valid"]):
                ex = source[b["index"][k]]
                assert b["label"][k] == ex["label"]
                np.testing.assert_array_equal(b["heatmap"][k], preprocess.clickme_heatmap(ex["heatmap"]))
                np.testing.assert_array_equal(
                    b["image"][k], preprocess.model_input(preprocess.clickme_image(ex["image"]), _Entry(256, 224)))
            seen += b["index"][b["valid"]].tolist()
    assert sorted(seen) == list(range(n))
    assert [r.start for r in (pipeline.shard_range(n, p, 3) for p in range(3))] == [0, 3, 7]
    # no entry: the 224 float image; processes give the same batches as threads; limit 0 gives nothing
    a = list(pipeline.batches(source, batch_size=4, workers=1))
    b = list(pipeline.batches(source, batch_size=4, workers=2, processes=True))   # grain worker processes
    assert len(a) == len(b) == -(-len(source) // 4) and a[0]["image"].shape == (4, 224, 224, 3)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert list(pipeline.batches(source, batch_size=4, limit=0)) == []
    broken = source[:3] + [dict(source[3], image=source[3]["image"][:600])]      # a truncated JPEG
    with pytest.raises(ValueError, match="record 3 of the source"):
        list(pipeline.batches(broken, batch_size=4, workers=2))
    with pytest.raises(ValueError, match="process_index"):
        next(pipeline.batches(source, batch_size=4, process_index=3, process_count=3))
