"""evaluate.py's results side: accuracy next to the scores, --precision, checkpoint SHA-256 (pinned hashes),
figures written by a run, --table with --model, --image on photo files, the progress output.

Offline and small: the reduced ResNet-50-DCLS of test_evaluate (TINY) and its dense twin (BASE, registered here),
random weights, the bundled sample (data/sample, 12 records). References are computed independently: top-k with
numpy from logits of the model called directly, SHA-256 with hashlib, image preprocessing with torchvision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import types

import numpy as np
import pytest

from data import download
from evaluation import PRECISIONS, SAMPLE_DIR, checkpoints, evaluator, runtime
from evaluation.evaluator import Evaluator
from PIL import Image

from tests.test_evaluate import CROP, RESIZE, TINY, TINY_CONFIG, register_tiny

BASE = "test_tiny_resnet"          # TINY's twin without DCLS: TINY == BASE + "_dcls"
assert TINY == BASE + "_dcls"


@pytest.fixture(scope="module")
def tiny_pair():
    from models import registry, resnet
    register_tiny()
    if BASE not in registry.MODELS:
        registry.register(registry.Entry(
            name=BASE, builder=functools.partial(resnet._build, resnet.Config(**TINY_CONFIG, conv=resnet.DENSE)),
            family="resnet", target_layer=resnet.ResNet.target_layer, resize_size=RESIZE, input_size=CROP))
    yield BASE, TINY
    registry.MODELS.pop(BASE, None)
    registry.MODELS.pop(TINY, None)


EXTRA = "test_human_mean"           # a metric this module registers: one entry, seen in the JSON and the table


@pytest.fixture(scope="module")
def extra_metric():
    """Registers EXTRA, the mean of the aligned human map, with a table column, for this module's runs (the step of
    test_step_accuracy_equals_numpy_from_logits and sample_run's then compile alike)."""
    from evaluation import metrics
    metrics.register_metric(EXTRA, lambda cam, human: human.mean(axis=(1, 2)), columns={EXTRA: "human mean"})
    yield EXTRA
    metrics.unregister_metric(EXTRA)


@pytest.fixture(scope="module")
def sample_run(tiny_pair, extra_metric, tmp_path_factory):
    """One run over the bundled sample of both models, with every output: JSON, Markdown table, plot, overlays."""
    import evaluate
    d = tmp_path_factory.mktemp("sample_run")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main(["--models", f"{BASE},{TINY}", "--sample", "--random-init", "--cache-dir",
                              str(d / "cache"), "--output", str(d / "out.json"), "--table", str(d / "table.md"), "--plot",
                              str(d / "plot.png"), "--overlays", str(d / "overlays"), "--num-overlays", "2",
                              "--batch-size", "8", "--workers", "2"])
    assert code == 0, stderr.getvalue()[-3000:]
    return d, json.loads((d / "out.json").read_text()), stdout.getvalue(), stderr.getvalue()


def numpy_topk(logits: np.ndarray, labels: np.ndarray):
    """(predicted, top1, top5) from logits with numpy alone (stable sort: ties to the lower class)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[:, 0], order[:, 0] == labels, (order[:, :5] == labels[:, None]).any(axis=1)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------
# Accuracy


def test_step_accuracy_equals_numpy_from_logits(tiny_pair, extra_metric):
    """The step's predictions against numpy top-k of the logits of the model called directly, with labels chosen
    at logit ranks 0, 1, 3, 4, 5, 9, 500, 2: top-1 and top-5 both true and false; the Evaluator's run() and
    summary() over the same batch with two padding rows. (BASE at batch 8: the step sample_run compiles too.)"""
    import jax
    from flax import nnx

    import models
    entry = models.get_entry(BASE)
    model = models.create_model(BASE, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, CROP, CROP, 3)).astype(np.float32)
    logits = np.asarray(model(x))
    order = np.argsort(-logits, axis=1, kind="stable")
    ranks = [0, 1, 3, 4, 5, 9, 500, 2]
    labels = order[np.arange(8), ranks].astype(np.int32)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    ev = Evaluator(model, entry, methods=["gradcam", "threshold_gradcam"], protocol="study", precision="highest",
                   mesh=mesh)
    heat = rng.random((8, 224, 224)).astype(np.float32)
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = jax.device_get(ev.step(nnx.split(model)[1], *(jax.device_put(a, data) for a in (x, heat, labels))))
    out = out["predictions"]
    pred, top1, top5 = numpy_topk(logits, labels)
    np.testing.assert_array_equal(out["predicted"], pred)
    np.testing.assert_array_equal(out["top1"], top1)
    np.testing.assert_array_equal(out["top5"], top5)
    assert top1.tolist() == [True] + [False] * 7 and top5.tolist() == [True] * 4 + [False] * 3 + [True]
    valid = np.array([True] * 6 + [False] * 2)      # padding rows do not count
    acc = evaluator.accuracy(out, valid)
    assert acc == {"top1": top1[:6].mean(), "top5": top5[:6].mean(), "n": 6}
    index = np.array([4, 0, 1, 5, 3, 2, 0, 0])      # padding rows repeat an index, as the pipeline's do
    batch = {"image": x, "heatmap": heat, "label": labels, "index": index, "valid": valid}
    ((_, got),) = list(ev.run([batch]))
    np.testing.assert_array_equal(got["predictions"]["predicted"], pred)
    assert set(got) == {"gradcam", "threshold_gradcam", "predictions", "index", "valid"}
    assert set(got["gradcam"]) == {"rho", "dice", "iou", EXTRA, "evaluated"} and got["gradcam"]["rho"].shape == (8,)
    summary = ev.summary(6)
    assert summary["accuracy"] == acc
    assert summary["predicted_per_image"] == {int(i): int(p) for i, p in zip(index[:6], pred[:6])}
    for c in summary["cams"].values():
        assert c["n_evaluated"] + c["n_skipped"] == 6 and (c["top1"], c["top5"]) == (acc["top1"], acc["top5"])
        assert sorted(c["rho_per_image"]) == list(range(6))
    with pytest.raises(RuntimeError, match="do not match the requested 7"):
        ev.summary(7)


def test_sample_run_reports_accuracy(sample_run):
    """JSON, table and Markdown carry top-1/top-5; per-image predictions equal numpy argmax of the logits of the
    model called on the pipeline's inputs."""
    from flax import nnx

    import models
    from data import clickme, pipeline
    d, result, stdout, _ = sample_run
    source = clickme.data_source("validation", data_dir=d / "cache" / "sample_tfds",
                                 clickme_dir=SAMPLE_DIR, num_shards={"validation": 1})
    for row in result["results"]:
        model = models.create_model(row["model"], rngs=nnx.Rngs(0))   # --seed 0
        model.eval()
        (b,) = list(pipeline.batches(source, models.get_entry(row["model"]), batch_size=len(source), workers=2))
        logits = np.asarray(model(b["image"]))
        pred, top1, top5 = numpy_topk(logits, b["label"])
        assert row["accuracy"]["n"] == len(source) == 12
        assert row["accuracy"]["top1"] == pytest.approx(top1.mean(), abs=1e-12)
        assert row["accuracy"]["top5"] == pytest.approx(top5.mean(), abs=1e-12)
        assert row["predicted_per_image"] == {str(int(i)): int(p) for i, p in zip(b["index"], pred)}
        for c in row["cams"].values():
            assert (c["top1"], c["top5"]) == (row["accuracy"]["top1"], row["accuracy"]["top5"])
        assert row["warnings"] == []          # random weights: no accuracy warning
    assert "top-1" in stdout and "top-5" in stdout
    md = (d / "table.md").read_text()
    assert "| top-1 | top-5 |" in md and md.count(f"| {TINY} |") == 2


def test_registered_metric_in_json_and_table(sample_run):
    """EXTRA, registered by one register_metric call, is in every JSON row (the mean over the evaluated images, those
    with a rho, of the pipeline's human maps averaged with numpy in float64) and in the table's columns."""
    import models
    from data import clickme, pipeline
    d, result, stdout, _ = sample_run
    source = clickme.data_source("validation", data_dir=d / "cache" / "sample_tfds", clickme_dir=SAMPLE_DIR,
                                 num_shards={"validation": 1})
    checked = 0
    for row in result["results"]:
        (b,) = list(pipeline.batches(source, models.get_entry(row["model"]), batch_size=len(source), workers=2))
        human = {int(i): h.astype(np.float64).mean() for i, h in zip(b["index"], b["heatmap"])}
        for c in row["cams"].values():
            kept = [human[int(i)] for i, rho in c["rho_per_image"].items() if rho is not None]
            assert len(kept) == c["n_evaluated"]
            if kept:
                assert c[EXTRA] == pytest.approx(np.mean(kept), rel=1e-6, abs=0)
                checked += 1
            else:
                assert c[EXTRA] is None
    assert checked >= 2
    header = next(line for line in stdout.splitlines() if line.startswith("model "))
    assert "alignment score  mean rho  human mean  top-1" in header
    assert "| alignment score | mean rho | human mean | top-1 |" in (d / "table.md").read_text()


def test_accuracy_warning():
    low = {"top1": 0.1, "top5": 0.3, "n": 100}
    assert "implausibly low" in evaluator.accuracy_warning("m", low, "https://x/ckpt.pth")
    assert evaluator.accuracy_warning("m", low, "random-init") is None
    assert evaluator.accuracy_warning("m", {**low, "n": 5}, "ckpt") is None          # too few images to judge
    assert evaluator.accuracy_warning("m", {**low, "top1": 0.8}, "ckpt") is None


# ----------------------------------------------------------------------------------------------------------------
# Precision


def test_precision_changes_the_jitted_computation(tiny_pair, sample_run):
    """The lowered step carries HIGHEST precision on its convolutions and dots under "highest", none under
    "default", and bfloat16 convolutions under "bfloat16"; the run records the default "highest"."""
    import re

    import jax
    from flax import nnx

    import models
    entry = models.get_entry(BASE)
    model = models.create_model(BASE, rngs=nnx.Rngs(0))
    model.eval()
    state = nnx.split(model)[1]
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = (state, *(jax.ShapeDtypeStruct(shape, dtype, sharding=data) for shape, dtype in
                     (((2, CROP, CROP, 3), np.float32), ((2, 224, 224), np.float32), ((2,), np.int32))))
    text = {p: Evaluator(model, entry, methods=["gradcam"], protocol="study", precision=p, mesh=mesh).step
            .lower(*args).as_text() for p in PRECISIONS}
    convs = {p: re.findall(r"stablehlo.convolution.*", t) for p, t in text.items()}
    assert all(convs.values())
    assert all("HIGHEST" in c for c in convs["highest"])
    assert not any("HIGHEST" in c for c in convs["default"])
    assert not any("HIGHEST" in c for c in convs["bfloat16"])
    assert any("bf16" in c for c in convs["bfloat16"]) and not any("bf16" in c for c in convs["default"])
    with pytest.raises(ValueError, match="unknown precision"):
        evaluator.precision_context("float16")
    _, result, _, _ = sample_run
    assert result["config"]["precision"] == "highest"
    assert all(r["precision"] == "highest" for r in result["results"])


def test_json_records_device_versions_and_checkpoint(sample_run):
    import flax
    import jax
    _, result, _, _ = sample_run
    c = result["config"]
    assert c["device_kind"] == jax.devices()[0].device_kind and c["device_count"] == jax.device_count()
    assert c["jax_version"] == jax.__version__ and c["flax_version"] == flax.__version__
    for r in result["results"]:
        assert r["checkpoint"] == "random-init" and r["checkpoint_sha256"] is None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint hashes


def sha256sum_tree(directory) -> str:
    """Independent: the sha256 of `sha256sum`'s sorted lines over every file of the directory."""
    lines = []
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(directory).as_posix()}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def test_checkpoint_sha256_recorded(tiny_pair, tmp_path):
    from flax import nnx

    import models
    from models import convert
    ckpt = tmp_path / "ckpt"
    convert.save(models.create_model(BASE, rngs=nnx.Rngs(5)), ckpt, BASE)
    _, source, digest = checkpoints.load_model(BASE, ckpt)
    assert source == str(ckpt) and digest == sha256sum_tree(ckpt)
    f = tmp_path / "file.bin"
    f.write_bytes(b"checkpoint bytes")
    assert checkpoints.checkpoint_sha256(f) == hashlib.sha256(b"checkpoint bytes").hexdigest()


def test_wrong_pinned_hash_is_refused(tiny_pair, tmp_path, monkeypatch, capsys):
    """A published checkpoint whose bytes do not match the registry's pinned SHA-256 is refused, exit code 2, with
    both hashes named; with the right pin the hash check passes (and loading goes on to read the file)."""
    from models import registry
    import evaluate
    cache = tmp_path / "cache"
    data = b"not the published checkpoint"
    # already in the download cache: no network is needed (the URL's port is closed)
    url = "http://127.0.0.1:9/files/tiny.safetensors"
    raw = download.cache_path(url, cache, filename="tiny.safetensors")
    raw.parent.mkdir(parents=True)
    raw.write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    bad = hashlib.sha256(b"the published checkpoint").hexdigest()

    def pin(sha):
        ckpt = types.SimpleNamespace(url=url, key=None, filename="tiny.safetensors", sha256=sha)
        monkeypatch.setitem(registry.MODELS, BASE, dataclasses.replace(registry.MODELS[BASE], checkpoint=ckpt))

    pin(bad)
    code = evaluate.main(["--model", BASE, "--sample", "--cache-dir", str(cache), "--no-progress",
                          "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and "SHA-256 mismatch" in err and good in err and bad in err, err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(checkpoints.ChecksumError, match="SHA-256 mismatch"):
        checkpoints.load_model(BASE, cache_dir=cache)
    pin(good.upper())
    with pytest.raises(Exception) as e:             # the junk bytes are no checkpoint; but the hash was accepted
        checkpoints.load_model(BASE, cache_dir=cache)
    assert "SHA-256" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Figures written by a run


def test_run_writes_figures(sample_run):
    from cam import figures
    d, result, _, _ = sample_run
    ov = d / "overlays"
    names = sorted(p.name for p in ov.iterdir())
    want = [f"{m}_{i:06d}_{c}.png" for m in (BASE, TINY) for i in range(2) for c in ("gradcam", "threshold_gradcam")]
    want += [f"{BASE}_grid.png", f"{TINY}_grid.png", f"{BASE}_vs_{TINY}_gradcam.png",
             f"{BASE}_vs_{TINY}_threshold_gradcam.png"]
    assert names == sorted(want)
    # sizes: an overlay figure of a CROP-pixel input (3 panels), grids of 2 images x (image, 2 CAMs, human)
    h, w = png(ov / f"{TINY}_000000_gradcam.png").shape[:2]
    assert (w, h) == (8 + 3 * CROP + 2 * 8 + 100, 3 * 16 + 6 + CROP + 8)
    h, w = png(ov / f"{TINY}_grid.png").shape[:2]
    assert (w, h) == (8 + 4 * 160 + 3 * 6 + 90, 16 + 8 + 16 + 2 * (160 + 16 + 4) + 4)
    h, w = png(ov / f"{BASE}_vs_{TINY}_gradcam.png").shape[:2]
    assert (w, h) == (8 + 4 * 160 + 3 * 6 + 90, 16 + 8 + 16 + 2 * (160 + 16 + 4) + 4)
    # the plot shows the JSON's scores
    plot = png(d / "plot.png")
    fig = figures.table_figure(result["results"])
    assert plot.shape[:2] == (100 + 15 * 2 + 2 * 230, 560)     # 2 title lines (random weights, synthetic maps)
    for r in result["results"]:
        arch, dcls = figures.architecture(r["model"])
        for m, c in r["cams"].items():
            assert fig.layout.values[(arch, dcls, m)] == c["score"]


# ----------------------------------------------------------------------------------------------------------------
# --image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A 150 x 200 JPEG and a 180 x 160 RGBA PNG (non-square: the transform resizes the shorter side and crops)."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:150, :200]
    a = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 7), (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(a).save(d / "wave.jpg", quality=92)
    b = rng.integers(0, 256, (180, 160, 4), dtype=np.uint8)
    b[..., 3] = 255
    Image.fromarray(b, "RGBA").save(d / "noise.png")
    return d / "wave.jpg", d / "noise.png"


def reference_input(path) -> np.ndarray:
    """The model's transform in torchvision: Resize(RESIZE, bicubic) of the shorter side, CenterCrop, normalise."""
    from torchvision import transforms as T
    with Image.open(path) as im:
        img = im.convert("RGB")
    t = T.Compose([T.Resize(RESIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(CROP), T.ToTensor(),
                   T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return t(img).permute(1, 2, 0).numpy()[None]


@pytest.mark.parametrize("label", [None, 7])
def test_image_mode(tiny_pair, photos, tmp_path, label, capsys):
    import matplotlib

    import cam
    import evaluate
    import models
    from flax import nnx
    args = ["--model", BASE, "--random-init", "--image", *map(str, photos), "--overlays", str(tmp_path / "fig"),
            "--output", str(tmp_path / "out.json"), "--cam", "gradcam,threshold_gradcam"]
    code = evaluate.main(args + ([] if label is None else ["--label", str(label)]))
    assert code == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "out.json").read_text())
    model = models.create_model(BASE, rngs=nnx.Rngs(0))
    model.eval()
    assert [r["path"] for r in out["images"]] == list(map(str, photos))
    for rec, path in zip(out["images"], photos):
        x = reference_input(path)
        logits = np.asarray(model(x))[0]
        top = np.argsort(-logits, kind="stable")[:5]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        assert [t["class"] for t in rec["top5"]] == top.tolist()
        np.testing.assert_allclose([t["probability"] for t in rec["top5"]], probs[top], rtol=1e-4, atol=1e-7)
        explained = top[0] if label is None else label
        assert rec["explained"] == explained and rec["label"] == label
        stem = path.stem
        for method in ("gradcam", "threshold_gradcam"):
            f = tmp_path / "fig" / f"{BASE}_{stem}_{method}.png"
            assert str(f) in rec["figures"]
            img = png(f)
            # image | model map; the model-map panel holds the overlay of the reference CAM on the reference input
            assert img.shape[:2] == (3 * 16 + 6 + CROP + 8, 8 + 2 * CROP + 8 + 100)
            want_map = np.asarray(cam.compute(model, x, np.array([explained]), method))[0]
            shown = np.clip(x[0] * np.array((0.229, 0.224, 0.225)) + np.array((0.485, 0.456, 0.406)), 0, 1)
            lo, hi = want_map.min(), want_map.max()
            if hi > lo:
                jet = matplotlib.colormaps["jet"]((want_map - lo) / (hi - lo))[..., :3]   # matplotlib's, not ours
                want = 255 * (0.5 * jet + 0.5 * shown)
                top_px = 3 * 16 + 6
                panel = img[top_px:top_px + CROP, 8 + CROP + 8:8 + 2 * CROP + 8].astype(float)
                assert np.abs(panel - want).max() <= 3.0            # 256-entry LUT vs exact jet: < 2 levels
            image_panel = img[3 * 16 + 6:3 * 16 + 6 + CROP, 8:8 + CROP].astype(float)
            assert np.abs(image_panel - 255 * shown).max() <= 1.0
    stdout = capsys.readouterr().out
    assert "wave.jpg" in stdout and "noise.png" in stdout


def test_image_mode_errors(tiny_pair, tmp_path, capsys):
    import evaluate
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code = evaluate.main(["--model", BASE, "--random-init", "--image", str(bad), "--overlays", str(tmp_path / "o")])
    assert code == 2 and "cannot read the image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(ok)
    code = evaluate.main(["--model", BASE, "--random-init", "--image", str(ok), "--label", "1000", "--overlays",
                          str(tmp_path / "o")])
    assert code == 2 and "--label 1000" in capsys.readouterr().err
    for argv in (["--models", BASE, "--image", str(ok), "--overlays", "o"], ["--model", BASE, "--image", str(ok)],
                 ["--model", BASE, "--sample", "--label", "3"]):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------------
# Progress and quiet data preparation


def test_progress_in_a_log_is_plain_lines():
    log = io.StringIO()                      # not a terminal
    p = runtime.Progress(100, desc="m", log_every=0, file=log)
    for _ in range(4):
        p.update(25)
    p.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and "100/100" in lines[-1] and all(line.startswith("m:") for line in lines)


def test_builder_output_is_quiet(sample_run):
    _, _, stdout, _ = sample_run             # the sample was prepared in this run (fresh cache)
    assert "Downloading and preparing" not in stdout and "Dataset clickme" not in stdout
