"""evaluate.py end to end: ClickMe-format shards served from 127.0.0.1, a converted random-weight checkpoint, the
score against an independent PyTorch + scipy computation, 1 vs 4 simulated devices, 2 processes, and the errors.

The model is a reduced ResNet-50-DCLS (one bottleneck per stage, narrow) registered by this module under TINY with
a small version of the study's transform (resize 144 bicubic, crop 128): the same code paths as resnet50_dcls at a
fraction of the compile time. Subprocesses register it through `python -m tests.test_evaluate ARGS`.

The reference is independent of our pipeline except for two parts tested elsewhere: the JPEG decoder (simplejpeg
with TensorFlow's settings, the decoder the study's tf.io.decode_jpeg equals bit for bit) and the human map
(data.preprocess.clickme_heatmap, tested against TensorFlow's semantics in test_data.py).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "test_tiny_resnet_dcls"
TINY_CONFIG = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
RESIZE, CROP = 144, 128
N_IMAGES, BATCH = 7, 4          # 7 is not a multiple of the global batch: the last batch is padded
SHARDS = (4, 3) + (0,) * 15     # records per shard val-0 .. val-16 (the builder reads all 17)
CEILING = 0.65753


def register_tiny() -> None:
    """Registers TINY (also in subprocesses, before evaluate.main)."""
    from models import registry, resnet
    registry.get_entry("resnet50")   # loads the real families first
    if TINY not in registry.MODELS:
        registry.register(registry.Entry(
            name=TINY, builder=functools.partial(resnet._build, resnet.Config(**TINY_CONFIG, conv=resnet.DCLS)),
            family="resnet", target_layer=resnet.ResNet.target_layer, resize_size=RESIZE, input_size=CROP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the tiny model, its PyTorch reference and checkpoint, shards on a local HTTP server


@pytest.fixture(scope="module", autouse=True)
def allow_empty_shards():
    """SHARDS imitates ClickMe's 17 shards with 7 records: most are empty, an error for real data."""
    from data.clickme import ALLOW_EMPTY_ENV
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ALLOW_EMPTY_ENV, "1")
        yield


@pytest.fixture(scope="module")
def tiny():
    from models import registry
    register_tiny()
    yield TINY
    registry.MODELS.pop(TINY, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """timm resnet50 reduced like TINY, every conv2 -> dcls.Dcls2d (v0, 5 elements in 7x7, positions spread),
    random BatchNorm statistics; saved as the published DCLS checkpoint is ({"state_dict_ema": ...})."""
    import timm
    import torch

    from tests.torch_ref import dclsify, randomize_batchnorm, randomize_params, save_state_dict
    torch.manual_seed(0)
    model = timm.create_model("resnet50", **TINY_CONFIG)
    dclsify([[(block, "conv2") for block in getattr(model, f"layer{i}")] for i in range(1, 5)],
            kernel_count=5, dilated_kernel_size=7, version="v0", bias=False, seed=0)
    randomize_params(model, ("P",), seed=1, scale=2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".P"):
                p.clamp_(-3, 3)
    randomize_batchnorm(model, seed=2)
    model.eval()
    path = save_state_dict(model.state_dict(), tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar",
                           container="state_dict_ema", epoch=3)
    return model, path


def study_input(jpeg: bytes):
    """The study's model input, independently: TensorFlow-equivalent decode, (tf.image.resize to 224 x 224: the
    identity, the fixture images are 224 x 224), uint8, PIL, torchvision Resize/CenterCrop/ToTensor/Normalize.
    (1, 3, CROP, CROP)."""
    import simplejpeg
    from PIL import Image
    from torchvision import transforms as T
    rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=False)
    assert rgb.shape == (224, 224, 3)
    img = Image.fromarray(rgb)
    transform = T.Compose([T.Resize(RESIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(CROP),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return transform(img)[None]


def jpeg(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def example(image: bytes, heatmap: bytes, label: int) -> bytes:
    """A tf.train.Example {image: bytes, heatmap: bytes, label: int64} in protobuf wire format."""
    def varint(n):
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    def field(number, payload):                         # length-delimited field
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    features = {"image": field(1, field(1, image)), "heatmap": field(1, field(1, heatmap)),
                "label": field(3, field(1, varint(label)))}
    return field(1, b"".join(field(1, field(1, k.encode()) + field(2, v)) for k, v in features.items()))


@pytest.fixture(scope="module")
def records(reference):
    """N_IMAGES (image JPEG, heatmap JPEG, label): plane waves and a disc (224 x 224: the pipeline's resize of the
    image to 224, tested in test_data.py, is then the identity, so that no float rounding before the uint8
    truncation separates the two sides), Gaussian-blob human maps (256 x 256, as ClickMe's); labels: the
    reference's top class for most images (its Grad-CAM is rarely all zero), random for the others."""
    import torch
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224] / 224
    hy, hx = np.mgrid[:256, :256] / 256
    out = []
    for i in range(N_IMAGES):
        img = np.full((224, 224, 3), 128.0)
        for t, f, phase in rng.uniform((0, 2, 0), (np.pi, 12, 6), (3, 3)):      # plane waves
            img += rng.uniform(20, 50, 3) * np.sin(f * (xx * np.cos(t) + yy * np.sin(t)) + phase)[..., None]
        cx, cy, r = rng.uniform(0.25, 0.75, 3)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < (r / 3) ** 2] = rng.uniform(0, 255, 3)
        heat = sum(255 * np.exp(-((hx - bx) ** 2 + (hy - by) ** 2) / (2 * s ** 2))
                   for bx, by, s in rng.uniform((0.2, 0.2, 0.05), (0.8, 0.8, 0.2), (2, 3)))
        out.append((jpeg(np.clip(img, 0, 255).astype(np.uint8)), jpeg(np.clip(heat, 0, 255).astype(np.uint8))))
    with torch.no_grad():
        top = reference[0](torch.cat([study_input(image) for image, _ in out])).argmax(1).tolist()
    labels = [t if i % 3 != 1 else int(rng.integers(1000)) for i, t in enumerate(top)]
    return [(image, heatmap, label) for (image, heatmap), label in zip(out, labels)]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def clickme_url(tmp_path_factory, records):
    """http://127.0.0.1:PORT serving val/val-0.tfrecords ... val/val-16.tfrecords (ClickMe's layout)."""
    from data.tfrecord import write_records
    root = tmp_path_factory.mktemp("server")
    (root / "val").mkdir()
    start = 0
    for i, n in enumerate(SHARDS):
        write_records(root / "val" / f"val-{i}.tfrecords", [example(*r) for r in records[start:start + n]])
        start += n
    assert start == N_IMAGES
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


def common_args(workdir, checkpoint, url) -> list[str]:
    return ["--model", TINY, "--checkpoint", str(checkpoint), "--clickme-url", url, "--data-dir", str(workdir / "tfds"),
            "--cache-dir", str(workdir / "cache"), "--batch-size", str(BATCH), "--no-progress", "--workers", "2"]


@pytest.fixture(scope="module")
def one_device(tiny, reference, clickme_url, workdir):
    """evaluate.main in this process (1 CPU device): downloads the shards, converts the checkpoint. -> (json, stdout)"""
    import evaluate
    out = workdir / "one.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = evaluate.main([*common_args(workdir, reference[1], clickme_url[0]), "--output", str(out)])
    assert code == 0
    return json.loads(out.read_text()), stdout.getvalue()


def run_cli(args, devices: int) -> subprocess.Popen:
    """`python -m tests.test_evaluate ARGS` (TINY registered, then evaluate.main) with `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "tests.test_evaluate", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess timed out; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------------------------------------
# The score against PyTorch + scipy


def reference_rhos(model, records) -> dict[str, list[float]]:
    """Per image: the study's Grad-CAM and Threshold-Grad-CAM (GradCAM.py, thresholding_GradCAM.py of
    DCLS-GradCAM-Eval) in torch with a hook on layer4 (the output of forward_features), resized by torchvision's
    Resize((224, 224)) per map as the study does, and scipy's Spearman rho with the human map; NaN where a map is
    constant (the study skips maps with np.std == 0)."""
    import scipy.stats
    import torch
    import torch.nn.functional as F
    from torchvision import transforms as T

    from data.preprocess import clickme_heatmap
    x = torch.cat([study_input(image) for image, _, _ in records])
    labels = torch.tensor([label for _, _, label in records])
    acts = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = acts["a"]
    (g,) = torch.autograd.grad((logits * F.one_hot(labels, logits.shape[1])).sum(), a)
    a, alpha = a.detach(), g.mean(dim=(2, 3), keepdim=True)
    grad_cam = torch.relu((a * alpha).mean(1))
    t = torch.relu(a * alpha).mean(1)
    lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
    threshold = torch.clamp((t - lo) / (hi - lo), min=0.3)       # 0 / 0 = NaN for a constant map: skipped
    out = {}
    for method, maps in (("gradcam", grad_cam), ("threshold_gradcam", threshold)):
        maps = torch.stack([T.Resize(size=(224, 224))(m) for m in maps[:, None]])[:, 0].numpy()
        rhos = []
        for m, (_, heatmap, _) in zip(maps, records):
            human = clickme_heatmap(heatmap)
            constant = not np.isfinite(m).all() or m.max() == m.min() or human.max() == human.min()
            rhos.append(float("nan") if constant else scipy.stats.spearmanr(m.ravel(), human.ravel())[0])
        out[method] = rhos
    return out


def test_score_matches_pytorch_reference(one_device, reference, records):
    import jax
    result, stdout = one_device
    ref = reference_rhos(reference[0], records)
    (row,) = result["results"]
    assert row["model"] == TINY and row["images"] == N_IMAGES and row["devices"] == len(jax.devices())
    assert row["checkpoint"] == str(reference[1])
    assert set(row["cams"]) == {"gradcam", "threshold_gradcam"}
    for method, cam in row["cams"].items():
        assert sorted(map(int, cam["rho_per_image"])) == list(range(N_IMAGES))
        ours = np.array([np.nan if cam["rho_per_image"][str(i)] is None else cam["rho_per_image"][str(i)]
                         for i in range(N_IMAGES)])
        want = np.array(ref[method])
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(want), err_msg=method)
        np.testing.assert_allclose(ours, want, atol=2e-5, rtol=0, err_msg=method)     # measured: <= 2e-6
        ok = ~np.isnan(want)
        assert ok.sum() >= 3, f"{method}: too few non-constant maps to test anything"
        assert cam["n_evaluated"] == ok.sum() and cam["n_skipped"] == N_IMAGES - ok.sum()
        assert abs(cam["mean_rho"] - want[ok].mean()) <= 1e-5
        assert abs(cam["score"] - want[ok].mean() / CEILING) <= 1e-5                   # the issue asks 1e-4
        assert f"{cam['score']:.4f}" in stdout
    assert "alignment score" in stdout and TINY in stdout      # the table


# ----------------------------------------------------------------------------------------------------------------
# Devices and processes: the same per-image rhos, every image exactly once


def assert_same_rhos(result, one_device_result):
    """Every image exactly once (evaluated or skipped), each rho as in the 1-device run."""
    (row,), (want_row,) = result["results"], one_device_result["results"]
    for method, cam in row["cams"].items():
        got, want = cam["rho_per_image"], want_row["cams"][method]["rho_per_image"]
        assert sorted(map(int, got)) == list(range(N_IMAGES)), f"{method}: images lost or duplicated"
        assert cam["n_evaluated"] + cam["n_skipped"] == N_IMAGES
        for i, w in want.items():
            g = got[i]
            assert (g is None) == (w is None) and (w is None or abs(g - w) <= 1e-5), (method, i, g, w)  # ~1e-6


def test_four_devices_match_one_device(one_device, reference, clickme_url, workdir):
    out = workdir / "four.json"
    args = [*common_args(workdir, reference[1], clickme_url[0]), "--output", out, "--cam", "threshold_gradcam"]
    code, _, err = finish(run_cli(args, devices=4))
    assert code == 0, err[-3000:]
    result = json.loads(out.read_text())
    assert result["results"][0]["devices"] == 4 and result["results"][0]["images"] == N_IMAGES
    assert_same_rhos(result, one_device[0])


def test_two_processes_match_one_device(one_device, reference, clickme_url, workdir):
    out = workdir / "two.json"
    args = [*common_args(workdir, reference[1], clickme_url[0]), "--output", out, "--cam", "gradcam",
            "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    procs = [run_cli([*args, "--process-id", p], devices=2) for p in range(2)]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert (row["devices"], row["processes"], row["images"]) == (4, 2, N_IMAGES)
    assert_same_rhos(result, one_device[0])
    assert "alignment score" in results[0][1] and "alignment score" not in results[1][1]   # process 0 reports


# ----------------------------------------------------------------------------------------------------------------
# Errors: a message naming the problem (and the way out), exit code 2, no output file


def run_failing(capsys, args, tmp_path) -> str:
    import evaluate
    out = tmp_path / "out" / "result.json"
    code = evaluate.main([*args, "--output", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                          "--data-dir", str(tmp_path / "tfds")])
    err = capsys.readouterr().err
    assert code == 2 and "\nerror: " in "\n" + err, err
    assert not out.exists()
    return err[err.index("error: "):]


def test_unknown_model(capsys, tmp_path):
    err = run_failing(capsys, ["--model", "resnet51_dcls", "--random-init", "--sample"], tmp_path)
    assert "unknown model 'resnet51_dcls'" in err and "resnet50_dcls" in err and "convnext_tiny" in err


def test_unknown_model_cli_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "--model", "nope", "--sample", "--random-init", "--output",
                           tmp_path / "x.json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr and "resnet50_dcls" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_checkpoint_of_another_architecture(capsys, tmp_path, reference, clickme_url):
    err = run_failing(capsys, ["--model", "convnext_tiny", "--checkpoint", str(reference[1]), "--clickme-dir",
                               str(clickme_url[1] / "val")], tmp_path)
    assert "cannot load the checkpoint into 'convnext_tiny'" in err and "another architecture" in err


def test_unreadable_data(capsys, tmp_path, tiny, clickme_url):
    args = ["--model", TINY, "--random-init"]
    err = run_failing(capsys, [*args, "--clickme-dir", str(tmp_path / "missing")], tmp_path)
    assert "--clickme-dir" in err and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    err = run_failing(capsys, [*args, "--clickme-dir", str(tmp_path / "empty")], tmp_path)
    assert "has no shard 0" in err and "val-0.tfrecords" in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for p in (clickme_url[1] / "val").iterdir():
        data = p.read_bytes()
        (corrupt / p.name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if p.name == "val-1.tfrecords" else data)
    err = run_failing(capsys, [*args, "--clickme-dir", str(corrupt)], tmp_path)
    assert "val-1.tfrecords" in err and "CRC mismatch" in err


def test_no_network(capsys, tmp_path, monkeypatch, tiny):
    import dataclasses

    from models import registry
    dead = f"http://127.0.0.1:{free_port()}"       # nothing listens there: connection refused
    err = run_failing(capsys, ["--model", TINY, "--random-init", "--clickme-url", dead], tmp_path)
    assert "could not download the ClickMe validation shards" in err and "--clickme-dir" in err
    entry = registry.get_entry("resnet50")
    monkeypatch.setitem(registry.MODELS, "resnet50", dataclasses.replace(
        entry, checkpoint=dataclasses.replace(entry.checkpoint, url=f"{dead}/resnet50.safetensors")))
    err = run_failing(capsys, ["--model", "resnet50", "--sample"], tmp_path)
    assert "could not download" in err and "--checkpoint" in err


if __name__ == "__main__":      # the CLI with TINY registered, for the subprocesses above
    sys.path.insert(0, ROOT)
    register_tiny()
    import evaluate
    sys.exit(evaluate.main(sys.argv[1:]))
