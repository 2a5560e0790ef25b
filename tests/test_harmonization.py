"""The harmonization objective (cam/harmonization.py), its ClickMe training input and its train.py integration.

- The loss against a numpy transcription of serre-lab/Harmonization's definitions (training/loss.py, pyramid.py):
  pyramid, standardize_cut, token weighting, masking of constant (zero) human maps; and against a golden file
  made once by the reference's own TensorFlow code (tests/golden/make_harmonization_golden.py): pyramid levels,
  pyramidal MSE, and the gradients `harmonizer_loss` returns for its own test model (max pool -> dense).
- The alignment term's gradient reaches every kind of weight of a (tiny) DCLS ConvNeXt and a CAFormer.
- train.py on fixture ClickMe shards with a planted signal (the class is told by a coloured patch, where the human
  map points, and by a global tint, a shortcut): harmonization raises the Grad-CAM alignment of held-out images,
  cross-entropy alone does not; a run stopped and resumed is bit-identical; the exported model loads in
  evaluate.py.
"""
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

import models
import train
from cam import harmonization as H
from cam import metrics
from data.tfrecord import write_records
from dcls_jax.optim import path_names
from evaluation import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "harmonization.npz")


# ------------------------------------------------------------------------------------------------------------
# numpy transcription of the reference (float64), written from loss.py / pyramid.py


def np_standardize_cut(m, eps=1e-5):
    m = np.asarray(m, np.float64)
    mean = m.mean((1, 2), keepdims=True)
    std = np.sqrt(np.square(m - mean).mean((1, 2), keepdims=True))
    return np.maximum((m - mean) / (std + eps), 0)


def np_downsample(m):
    """tf.nn.conv2d(strides 2, 'SAME') with outer((1, 4, 6, 4, 1)) / 256, as explicit padding and sums."""
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    b, h, w = m.shape
    oh, ow = -(-h // 2), -(-w // 2)
    ph, pw = max(2 * (oh - 1) + 5 - h, 0), max(2 * (ow - 1) + 5 - w, 0)
    p = np.pad(m, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((b, oh, ow))
    for i in range(5):
        for j in range(5):
            out += k[i, j] * p[:, i:i + 2 * oh:2, j:j + 2 * ow:2]
    return out


def np_pyramidal_mse(a, b, tokens, levels=5):
    a, b, t = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(tokens, np.float64)
    losses = []
    for _ in range(levels):
        losses.append(np.mean(np.square(a - b) * t[:, None, None]))
        a, b = np_downsample(a), np_downsample(b)
    return np.mean(losses)


def np_alignment(saliency, human, tokens=None):
    if tokens is None:   # constant human maps (no clicks) masked
        flat = human.reshape(len(human), -1)
        tokens = (flat.max(1) > flat.min(1)).astype(np.float64)
    s, h = np_standardize_cut(saliency), np_standardize_cut(human)
    h = h / (h.max((1, 2), keepdims=True) + 1e-6) * (s.max((1, 2), keepdims=True) + 1e-6)
    return np_pyramidal_mse(s, h, tokens)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    for shape in ((3, 224, 224), (4, 37, 50)):      # the ClickMe size, and odd sizes (asymmetric SAME padding)
        sal = rng.normal(0, 1, shape).astype(np.float32)
        human = rng.uniform(0, 1, shape).astype(np.float32) ** 3
        human[1] = 0.0                                # a map without clicks
        np.testing.assert_allclose(np.asarray(H.standardize_cut(sal)), np_standardize_cut(sal), rtol=1e-5, atol=1e-5)
        levels = H.pyramid(sal, 5)
        ref = sal.astype(np.float64)
        for i, level in enumerate(levels):
            np.testing.assert_allclose(np.asarray(level), ref, rtol=1e-5, atol=1e-6, err_msg=f"level {i}")
            ref = np_downsample(ref)
        assert np.asarray(H.human_tokens(human)).tolist() == [1, 0] + [1] * (shape[0] - 2)
        np.testing.assert_allclose(float(H.alignment_loss(sal, human)), np_alignment(sal, human), rtol=1e-5)
        tokens = rng.uniform(0, 1, shape[0]).astype(np.float32)
        np.testing.assert_allclose(float(H.alignment_loss(sal, human, tokens)), np_alignment(sal, human, tokens),
                                   rtol=1e-5)
    # masked images still count in the mean's denominator, as the reference's plain mean
    a = np.ones((2, 8, 8), np.float32)
    assert float(H.pyramidal_mse_with_tokens(a, 0 * a, np.array([1, 0]), 1)) == pytest.approx(0.5)


def test_matches_golden_from_reference_tensorflow():
    g = dict(np.load(GOLDEN))
    levels = H.pyramid(g["maps"], 5)
    assert len(levels) == 6
    for i, level in enumerate(levels):
        np.testing.assert_allclose(np.asarray(level), g[f"pyr_{i}"], rtol=1e-5, atol=1e-6, err_msg=f"level {i}")
    np.testing.assert_allclose(np.asarray(H.standardize_cut(g["maps"])), g["std_cut"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(H.pyramidal_mse_with_tokens(g["a"], g["b"], g["tokens"])), g["pmse"], rtol=1e-5)

    class Net(nnx.Module):   # the reference's test model: MaxPooling2D(10) -> Flatten -> Dense(10)
        def __init__(self):
            self.kernel, self.bias = nnx.Param(jnp.asarray(g["kernel0"])), nnx.Param(jnp.asarray(g["bias0"]))

        def __call__(self, x):
            b = x.shape[0]
            x = x[:, :60, :60].reshape(b, 6, 10, 6, 10, 3).max((2, 4))
            return x.reshape(b, -1) @ self.kernel[...] + self.bias[...]

    labels = g["labels"].argmax(-1)
    for suffix, lam in (("", 1.0), ("_h1000", 1000.0)):
        def loss_fn(model):   # harmonizer_loss: smoothed CE + 1e-5 * L2 + lambda * alignment (tokens given: 1)
            maps, logits = H.model_maps(model, jnp.asarray(g["images"]), labels)
            ce = optax.softmax_cross_entropy(logits, g["labels"] * (1 - H.LABEL_SMOOTHING) + H.LABEL_SMOOTHING / 10)
            return (ce.mean() + H.LAMBDA_WEIGHTS * H.weight_l2(model)
                    + lam * H.alignment_loss(maps, g["human"], jnp.ones(4)))

        grads = nnx.grad(loss_fn)(Net())
        for name in ("kernel", "bias"):
            want = g[f"grad_{name}{suffix}"]
            np.testing.assert_allclose(np.asarray(grads[name][...]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{name}{suffix}")
    # the alignment term's own gradient (the difference of the two runs) is matched, not just the CE part
    g_align = (g["grad_kernel_h1000"] - g["grad_kernel"]) / 999
    ours = nnx.grad(lambda m: H.alignment_loss(H.model_maps(m, jnp.asarray(g["images"]), labels)[0], g["human"],
                                               jnp.ones(4)))(Net())
    np.testing.assert_allclose(np.asarray(ours["kernel"][...]), g_align, rtol=1e-3, atol=1e-3 * np.abs(g_align).max())


# ------------------------------------------------------------------------------------------------------------
# Gradients reach the weights


@pytest.mark.parametrize("name, kwargs, offsets", [
    ("convnext_tiny_dcls", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_count=3, dilated_kernel_size=3),
     {"head.norm.bias", "head.fc.bias"}),
    ("caformer_s18", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64)), {"head.fc.norm.bias", "head.fc.fc2.bias"}),
])
def test_alignment_gradient_reaches_weights(name, kwargs, offsets):
    """d(alignment term)/d(weights) of the reference's input-gradient map, through the second-order path: finite
    everywhere and nonzero for every parameter except `offsets`, the biases that only add an input-independent
    constant to the logits (after the last nonlinearity), on which dS/dx cannot depend."""
    model = models.create_model(name, rngs=nnx.Rngs(0), num_classes=10, **kwargs)
    model.train()
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
    human = jnp.asarray(rng.uniform(0, 1, (2, 32, 32)), jnp.float32)
    entry = models.get_entry(name)

    def align(m):
        maps, _ = H.model_maps(m, pixels, jnp.array([1, 7]),
                               preprocess=lambda p: (p / 255 - jnp.asarray(entry.mean)) / jnp.asarray(entry.std))
        return H.alignment_loss(maps, human)

    grads = jax.jit(nnx.grad(align))(model)
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(v).all() for v in flat.values())
    zero = {k for k, v in flat.items() if not np.any(v)}
    assert zero == offsets, sorted(zero)
    if name.endswith("_dcls"):
        positions = [k for k in flat if k.endswith(".P")]
        assert positions and all(np.any(flat[k]) for k in positions)


# ------------------------------------------------------------------------------------------------------------
# Fixture ClickMe shards with a planted signal


SIDE = 64              # JPEG side of the fixture records (ClickMe's are 256)
IMAGE = 64             # model input (ClickmeTransform resizes the 224 Harmonization image to this)
MODEL = "convnext_tiny_dcls"
TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_count": 3, "dilated_kernel_size": 3}
LAYER = "stages.1"     # Grad-CAM at stride 8: 8 x 8 maps


def _encode(features):
    """tf.train.Example wire format (bytes_list = 1, int64_list = 3)."""
    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def ld(field, payload):
        return bytes([field << 3 | 2]) + varint(len(payload)) + payload

    entries = b""
    for name, value in features.items():
        feature = ld(1, ld(1, value)) if isinstance(value, bytes) else ld(3, ld(1, varint(value)))
        entries += ld(1, ld(1, name.encode()) + ld(2, feature))
    return ld(1, entries)


def _jpeg(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def planted_records(n, seed):
    """Class c in {0, 1}: a red (c = 0) or blue (c = 1) square at a random place, where the human map points,
    and a green tint of the whole image (+ for 0, - for 1): a shortcut that cross-entropy may use instead."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    records = []
    for i in range(n):
        c = i % 2
        img = rng.uniform(70, 180, (SIDE, SIDE, 3))
        y, x = rng.integers(4, SIDE - 16, 2)
        img[y:y + 12, x:x + 12] = (220, 40, 40) if c == 0 else (40, 40, 220)
        img[..., 1] += 50 if c == 0 else -50
        human = np.exp(-((yy - y - 6) ** 2 + (xx - x - 6) ** 2) / (2 * 6.0 ** 2))
        if i == 3:
            human[:] = 0.0    # a map without clicks: masked by the objective
        records.append(_encode({"image": _jpeg(np.clip(img, 0, 255).astype(np.uint8)),
                                "heatmap": _jpeg(np.round(255 * human).astype(np.uint8)),   # grayscale JPEG
                                "label": c}))
    return records


@pytest.fixture(scope="module")
def clickme_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("clickme")
    (root / "shards").mkdir()
    write_records(root / "shards" / "train-0.tfrecords", planted_records(64, 0))
    write_records(root / "shards" / "val-0.tfrecords", planted_records(32, 1))   # held out
    return root


STEPS, STOP, LAMBDA, LR = 30, 2, 10.0, 3e-3


def _argv(root, objective, *sets):
    base = ["data=clickme", f"data_dir={root / 'tfds'}", f"clickme_dir={root / 'shards'}",
            "clickme_num_shards={'train': 1, 'validation': 1}", f"model={MODEL}", f"model_kwargs={TINY}",
            f"image_size={IMAGE}", "batch_size=16", f"lr={LR}", "lr_base_batch=0", "warmup_steps=0", "min_lr=0",
            f"total_steps={STEPS}", "log_every=1", "checkpoint_every=0", "val_split=none", "data_workers=0",
            "weight_decay=0", "drop_path=0", f"objective={objective}", f"harmonization_lambda={LAMBDA}",
            "harmonization_weight_l2=0", "harmonization_map=gradcam", f"harmonization_layer={LAYER}",
            "progress=false"]
    argv = ["--config", os.path.join(ROOT, "configs", "harmonize.py:convnext_tiny_dcls")]
    for item in base + list(sets):
        argv += ["--set", item]
    return argv


def _flat(state):
    return {".".join(path_names(p)): np.asarray(x.addressable_data(0))
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


_RUNNER = """
import sys, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
import train
from dcls_jax.optim import path_names
state, _ = train.main({argv!r})
np.savez({out!r}, **{{".".join(path_names(p)): np.asarray(x.addressable_data(0))
                     for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}})
"""


@pytest.fixture(scope="module")
def two_devices(clickme_fixture, tmp_path_factory):
    """Starts the harmonization run on 2 simulated devices (stopped at STOP) in the background, so that it compiles
    while this process runs the single-device ones; test_two_devices_match_one_device collects it."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("two_devices")
    argv = _argv(clickme_fixture, "harmonization", f"workdir={out / 'run'}", f"stop_at_step={STOP}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    with open(out / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _RUNNER.format(argv=argv, out=str(out / "state.npz"))],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def runs(clickme_fixture, two_devices, tmp_path_factory):
    """Harmonization and plain cross-entropy from the same initialisation, each exported for evaluate.py."""
    out = {}
    for objective in ("harmonization", "ce"):
        workdir = tmp_path_factory.mktemp(objective)
        state, _ = train.main(_argv(clickme_fixture, objective, f"workdir={workdir}",
                                    f"export_dir={workdir / 'model'}"))
        out[objective] = (_flat(state), workdir)
    return out


def _held_out(root):
    from data import augment, clickme, pipeline
    source = clickme.data_source("validation", data_dir=root / "tfds", config="with_train",
                                 clickme_dir=root / "shards", num_shards={"train": 1, "validation": 1})
    batch = next(pipeline.Loader(source, pipeline.ClickmeTransform(train=False, image_size=IMAGE), 32,
                                       seed=0).iterate())
    entry = models.get_entry(MODEL)
    return np.asarray(augment.normalize(batch["image"], entry.mean, entry.std)), batch["heatmap"], batch["label"]


def _alignment(model, images, human, labels):
    """Mean Spearman rho of the model's Grad-CAM (at LAYER, bilinearly upsampled) with the human maps, constant
    maps skipped: the study's metric."""
    import cam
    maps = cam.compute(model, images, labels, "gradcam", layer=LAYER, output_size=(IMAGE, IMAGE))
    return metrics.alignment_score(np.asarray(metrics.spearman(maps, human)), np.ones(len(labels), bool))["mean_rho"]


def test_harmonization_raises_alignment_and_ce_does_not(clickme_fixture, runs):
    from models import convert
    images, human, labels = _held_out(clickme_fixture)
    _, cfg = train.parse_args(_argv(clickme_fixture, "ce"))
    before = _alignment(training.build_model(cfg), images, human, labels)   # the runs start from it (seed 0)
    after = {}
    for objective, (_, workdir) in runs.items():
        model = convert.restore(workdir / "model")            # the export evaluate.py --checkpoint reads
        after[objective] = _alignment(model, images, human, labels)
        records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        assert len(records) == STEPS and all(np.isfinite(r["ce"]) for r in records)
        assert ("align" in records[0]) == (objective == "harmonization")
    print(f"held-out Grad-CAM alignment (mean rho): init {before:.3f}, {after}")
    # measured (CPU): init 0.111, harmonization 0.43, cross-entropy 0.147
    assert after["harmonization"] > before + 0.2, (before, after)
    assert after["ce"] < before + 0.1, (before, after)
    assert after["harmonization"] > after["ce"] + 0.2, (before, after)


@pytest.fixture(scope="module")
def stopped(clickme_fixture, tmp_path_factory):
    """The harmonization run killed at STOP (checkpointed), then the same command again to the end."""
    workdir = tmp_path_factory.mktemp("resumed")
    at_stop, _ = train.main(_argv(clickme_fixture, "harmonization", f"workdir={workdir}", f"stop_at_step={STOP}"))
    at_stop = _flat(at_stop)
    resumed, _ = train.main(_argv(clickme_fixture, "harmonization", f"workdir={workdir}"))
    return at_stop, _flat(resumed), workdir


def test_resume_is_bit_exact(runs, stopped):
    final, _ = runs["harmonization"]
    _, resumed, _ = stopped
    assert resumed.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)


def test_two_devices_match_one_device(two_devices, stopped):
    """Data parallel: the batch (images, human maps, labels) sharded over 2 devices gives the single-device
    parameters after STOP steps, to float32 tolerance (measured: 8e-6 relative after 4 steps)."""
    proc, out = two_devices
    proc.wait(timeout=900)
    assert proc.returncode == 0, (out / "log").read_text()[-3000:]
    assert "2 devices on 1 processes" in (out / "log").read_text()
    got, at_stop = dict(np.load(out / "state.npz")), stopped[0]
    assert got.keys() == at_stop.keys()
    for k in at_stop:
        np.testing.assert_allclose(got[k], at_stop[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_export_loads_in_evaluate(runs, stopped, tmp_path):
    """export_dir (end of the run) and train.export_workdir (afterwards, from the resumed run's checkpoint) write
    the final parameters and batch statistics where evaluate.py --checkpoint reads them."""
    import argparse

    import evaluate
    from evaluation.checkpoints import checkpoint_sha256
    final, workdir = runs["harmonization"]
    exported = train.export_workdir(stopped[2], tmp_path / "model")
    for directory in (workdir / "model", exported):
        args = argparse.Namespace(random_init=False, checkpoint=str(directory), cache_dir=None, seed=0)
        model, source, digest = evaluate.load_model(MODEL, args)
        assert source == str(directory) and digest == checkpoint_sha256(directory)
        for kind, prefix in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
            for p, v in nnx.to_flat_state(nnx.state(model, kind)):
                k = ".".join(map(str, p))
                np.testing.assert_array_equal(np.asarray(v[...]), final[f"{prefix}.{k}"], err_msg=f"{directory} {k}")


def test_clickme_train_pipeline_order_shards_and_resume(clickme_fixture):
    """data.pipeline.Loader on ClickMe: Harmonization's pixels (data.preprocess) resized together with their maps; the
    imagenet pipeline's order (an epoch is a permutation), hosts reading their rows, and a resume position."""
    from data import clickme, pipeline, preprocess
    source = clickme.data_source("train", data_dir=clickme_fixture / "tfds", config="with_train",
                                 clickme_dir=clickme_fixture / "shards", num_shards={"train": 1, "validation": 1})
    transform = pipeline.ClickmeTransform(train=True, image_size=IMAGE, hflip=0.5)
    one = pipeline.Loader(source, transform, 16, seed=3)
    whole = list(one.iterate(0, 5))                  # 4 steps per epoch: crosses an epoch boundary
    halves = [list(pipeline.Loader(source, transform, 16, seed=3, process_index=i, process_count=2,
                                         workers=2).iterate(0, 5)) for i in range(2)]
    for step, batch in enumerate(whole):
        assert batch["image"].shape == (16, IMAGE, IMAGE, 3) and batch["heatmap"].shape == (16, IMAGE, IMAGE)
        for key in ("image", "heatmap", "label"):
            np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
    np.testing.assert_array_equal(next(one.iterate(3, 1))["image"], whole[3]["image"])
    labels = np.concatenate([b["label"] for b in whole[:4]])
    assert sorted(labels.tolist()) == [0] * 32 + [1] * 32   # an epoch visits every record once
    # pixels: the Harmonization image / map of the record, resized, flipped together (or not)
    ex = source[0]
    image = preprocess.resize_bilinear(preprocess.clickme_image(ex["image"]), (IMAGE, IMAGE))
    human = preprocess.resize_bilinear(preprocess.clickme_heatmap(ex["heatmap"]), (IMAGE, IMAGE))
    order = np.random.default_rng((3, 0)).permutation(64)
    row = int(np.flatnonzero(order == 0)[0])
    got_image, got_human = whole[row // 16]["image"][row % 16], whole[row // 16]["heatmap"][row % 16]
    flipped = not np.array_equal(got_image, image)
    np.testing.assert_array_equal(got_image, image[:, ::-1] if flipped else image)
    np.testing.assert_array_equal(got_human, human[:, ::-1] if flipped else human)
    evaluation = list(pipeline.Loader(source, pipeline.ClickmeTransform(train=False, image_size=IMAGE), 24,
                                            seed=0).iterate())
    assert [b["valid"].sum() for b in evaluation] == [24, 24, 16]


@pytest.mark.parametrize("sets, message", [
    (["data=imagefolder"], "objective 'harmonization' needs human maps: set data=clickme"),
    (["mixup=0.8"], "data=clickme keeps each image on its human map: set mixup off"),
    (["harmonization_map=gradcam_nope"], "unknown harmonization map 'gradcam_nope'"),
    (["harmonization_map=input_gradient", "harmonization_layer=stages.1"], "input_gradient is an input gradient"),
    (["objective=dice"], "objective 'dice' is not one of"),
])
def test_bad_harmonization_config(clickme_fixture, sets, message):
    _, cfg = train.parse_args(_argv(clickme_fixture, "harmonization", *sets))
    with pytest.raises(train.ConfigError, match=message):
        training.check_config(cfg)


def test_weight_l2_skips_normalisation_and_positions():
    """The reference's L2 term skips normalisation layers ('bn/', 'norm', 'Norm', 'normalization' in Keras
    names); here normalisation modules and the DCLS positions (not weights) are skipped, every other parameter
    counts, as sum(w^2) / 2."""
    model = models.create_model("resnet50_dcls", rngs=nnx.Rngs(0), layers=(1, 1, 1, 1), channels=(8, 8, 8, 8),
                                num_classes=10)
    mask = {".".join(k): v for k, v in H.weight_l2_mask(model).items()}
    skipped = {k for k, v in mask.items() if not v}
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.0.downsample.1.bias"} <= skipped
    assert all(k.split(".")[-2].startswith("bn") or k.split(".")[-1] == "P" or ".downsample.1." in k
               for k in skipped), skipped
    assert mask["conv1.weight"] and mask["fc.bias"] and mask["layer1.0.conv2.weight"]
    params = {".".join(map(str, p)): np.asarray(v[...], np.float64) for p, v in
              nnx.to_flat_state(nnx.state(model, nnx.Param))}
    expected = sum(0.5 * np.sum(v ** 2) for k, v in params.items() if mask[k])
    np.testing.assert_allclose(float(H.weight_l2(model)), expected, rtol=1e-5)
