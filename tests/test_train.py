"""train.py, data/imagenet.py and data/augment.py on CPU with a tiny ConvNeXt-dcls.

End to end: a few steps on a synthetic ImageFolder and a synthetic tensorflow-datasets build (array_record,
written here without TensorFlow) make the loss fall; the full recipe (RandAugment, mixup/cutmix, erasing,
drop path, EMA, clamp, repulsive loss) resumes bit for bit, gives the same parameters on 4 simulated devices
(to fp32 tolerance) and on two real processes joined by jax.distributed (gloo CPU collectives).
Pieces against independent references: augmentations against timm (its own random streams replayed), the
learning-rate schedule against ConvNeXt's formula, the repulsive loss against a torch version of
ConvNeXt-dcls's, weight decay and the position learning rate against hand-computed AdamW updates.
"""
import io
import json
import math
import os
import random
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import configs
import train
from dcls_jax.optim import path_names
from data import augment, imagenet, pipeline
from evaluation import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_count": 3, "dilated_kernel_size": 3}
STEPS, STOP = 4, 2


# ------------------------------------------------------------------------------------------------------------
# Synthetic data: 4 classes told apart by colour, 8 train and 2 val images each (40 x 48 JPEG)

def _images(n_per_class, seed):
    rng = np.random.default_rng(seed)
    for c in range(4):
        for i in range(n_per_class):
            img = np.full((40, 48, 3), 30, np.uint8)
            img[..., c % 3] = 220 if c < 3 else 120
            img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            yield c, i, buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n, seed in (("train", 8, 0), ("val", 2, 1)):
        for c, i, data in _images(n, seed):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            (root / split / f"class{c}" / f"img{i}.JPEG").write_bytes(data)
    return str(root)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """An `imagenet2012` build in array_record format, written by tfds' own builder machinery (no TensorFlow:
    the images are given as encoded JPEG bytes)."""
    import tensorflow_datasets as tfds

    class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("5.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=4),
                "file_name": tfds.features.Text()}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8, 0), "validation": self._generate_examples(2, 1)}

        def _generate_examples(self, n, seed):
            for c, i, data in _images(n, seed):
                yield f"{c}_{i}", {"image": data, "label": c, "file_name": f"{c}_{i}.JPEG"}

    root = tmp_path_factory.mktemp("tfds")
    Imagenet2012(data_dir=str(root), file_format="array_record").download_and_prepare()
    assert "tensorflow" not in sys.modules
    return str(root)


def _args(data_dir, *sets, data="imagefolder"):
    base = [f"data={data}", f"data_dir={data_dir}", "num_classes=4", f"model_kwargs={TINY}", "batch_size=8",
            "lr=0.01", "lr_base_batch=0", "warmup_steps=0", "log_every=1", "checkpoint_every=0"]
    if data == "tfds":
        base.append("val_split=validation")
    argv = ["--config", os.path.join(ROOT, "configs", "convnext_dcls.py:runlocal")]
    for s in base + list(sets):
        argv += ["--set", s]
    return argv


# The full recipe at toy scale: every augmentation and regulariser on, positions pushed hard into the clamp,
# the validation split evaluated before and after training.
FULL = (f"total_steps={STEPS}", "mixup_group=2", "position_lr_mult=100", "repulsive_loss=true",
        "repulsive_after_epoch=-1", "eval_every=0", "eval_at_start=true")


def _records(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def _host(x):
    return np.asarray(x.addressable_data(0))


def _flat(state):
    return {".".join(path_names(p)): _host(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _subprocess_env(devices):
    # XLA's CPU backend at optimisation level 0 compiles the sharded train step in half the time; the results
    # are compared with a tolerance anyway.
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
               JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=ROOT)
    return env


_RUNNER = """
import sys, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
import train
from dcls_jax.optim import path_names
argv, out = {argv!r}, {out!r}
if {check_batch!r}:
    try:
        train.main(argv + ["--set", "batch_size=6"])
    except train.ConfigError as e:
        print("CONFIG ERROR:", e)
state, _ = train.main(argv)
if jax.process_index() == 0:
    np.savez(out, **{{".".join(path_names(p)): np.asarray(x.addressable_data(0))
                     for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}})
"""


def _spawn(argv, out, devices, check_batch=False):
    """Runs train.main(argv) in a fresh interpreter; its final state goes to `out` (.npz), its log to out.log."""
    code = _RUNNER.format(argv=list(argv), out=str(out), check_batch=check_batch)
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_subprocess_env(devices),
                                stdout=log, stderr=subprocess.STDOUT)
    proc.log = f"{out}.log"
    return proc


def _wait(proc, timeout=600):
    proc.wait(timeout=timeout)
    with open(proc.log) as f:
        log = f.read()
    assert proc.returncode == 0, log[-3000:]
    return log


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(folder, tmp_path_factory):
    """Starts the 4-device run (STEPS steps) and the two-process run (2 processes x 2 devices joined by
    jax.distributed.initialize, STOP steps, then a checkpoint) in the background, so that they compile while
    this process computes the single-device references; test_devices_and_processes_match_one_device collects
    them."""
    out = tmp_path_factory.mktemp("spawned")
    port = _free_port()
    procs = {"four": [_spawn(_args(folder, *FULL, "val_split=none"), out / "four.npz", 4, check_batch=True)],
             "multi": [_spawn(_args(folder, *FULL, "val_split=none", f"workdir={out / 'multi'}",
                                    f"stop_at_step={STOP}")
                              + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                              out / "multi.npz", 2) for i in range(2)]}
    yield out, procs
    for proc in procs["four"] + procs["multi"]:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class SeenExamples:
    """Records the training examples each batch of train.main holds (their indices in the split) and the step
    each run starts its input at, by wrapping data.pipeline.Loader.iterate."""

    def __init__(self):
        self.batches, self.starts = [], []

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        iterate = pipeline.Loader.iterate

        def recording(loader, start_step=0, num_steps=None):
            if loader.train:
                self.starts.append(start_step)
            for batch in iterate(loader, start_step, num_steps):
                if loader.train:
                    self.batches.append(batch["index"].copy())
                yield batch

        self.patch.setattr(pipeline.Loader, "iterate", recording)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


@pytest.fixture(scope="module")
def full_run(folder, spawned, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    with SeenExamples() as seen:
        state, evaluation = train.main(_args(folder, *FULL, f"workdir={workdir}"))
    return _flat(state), evaluation, workdir, seen


@pytest.fixture(scope="module")
def stopped_run(folder, tmp_path_factory):
    """The full recipe stopped at step STOP (checkpointed), then the same command again to STEPS."""
    workdir = str(tmp_path_factory.mktemp("resumed"))
    with SeenExamples() as seen:
        state, _ = train.main(_args(folder, *FULL, f"workdir={workdir}", f"stop_at_step={STOP}"))
        at_stop = _flat(state)
        state, _ = train.main(_args(folder, *FULL, f"workdir={workdir}"))
    return at_stop, _flat(state), seen, workdir


# ------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("data", ["imagefolder", "tfds"])
def test_loss_falls(data, full_run, tfds_dir, tmp_path):
    """The validation loss (clean images, cross-entropy) falls over the STEPS steps of the full recipe."""
    if data == "imagefolder":
        workdir = full_run[2]
    else:
        workdir = str(tmp_path)
        train.main(_args(tfds_dir, *FULL, f"workdir={workdir}", data="tfds"))
    train_losses = [r["loss"] for r in _records(workdir, "loss")]
    assert len(train_losses) == STEPS and all(map(math.isfinite, train_losses))
    evals = _records(workdir, "val_loss")
    assert [r["step"] for r in evals] == [0, STEPS] and evals[0]["eval_images"] == 8
    assert evals[1]["val_loss"] < evals[0]["val_loss"] - 0.05, evals


def test_full_recipe_positions_clamped_and_evaluated(folder, full_run):
    final, evaluation, workdir, _ = full_run
    _, cfg = train.parse_args(_args(folder, *FULL))
    init = _flat({"params": nnx.state(training.build_model(cfg), nnx.Param)})   # the run's initial parameters
    positions = [k for k in final if k.startswith("params.") and k.endswith(".P")]
    assert len(positions) == 4   # one P per stage, shared by the stage's blocks
    bound = TINY["dilated_kernel_size"] // 2
    for k in positions:
        p = final[k]
        assert not np.array_equal(p, init[k]), f"{k} did not move"
        assert np.abs(p).max() <= bound, f"{k} escaped the clamp"
        assert np.isclose(np.abs(p), bound).any(), f"{k} never reached the clamp (test too weak)"
    assert 0.0 <= evaluation["top1"] <= 1.0 and 0.0 <= evaluation["ema_top1"] <= 1.0


def test_resume_is_bit_exact(full_run, stopped_run):
    """Stopped mid-epoch at STOP and resumed from the checkpoint, the run reads exactly the examples of the
    uninterrupted run (checked against the permutation the order is defined by) and ends with the same bits."""
    final, _, _, seen = full_run
    _, resumed, resumed_seen, workdir = stopped_run
    steps_per_epoch = 32 // 8
    assert 0 < STOP % steps_per_epoch and STEPS <= steps_per_epoch   # resumed mid-epoch
    order = np.random.default_rng((0, 0)).permutation(32)   # epoch 0 of seed 0
    np.testing.assert_array_equal(np.concatenate(seen.batches), order[:STEPS * 8])
    assert seen.starts == [0] and resumed_seen.starts == [0, STOP]
    np.testing.assert_array_equal(np.concatenate(resumed_seen.batches), order[:STEPS * 8])
    with open(os.path.join(workdir, "checkpoints", str(STOP), "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["data"] == {"epoch": 0, "batch_in_epoch": STOP, "seed": 0, "size": 32, "global_batch": 8}
    assert final.keys() == resumed.keys()
    for k in final:
        np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)


def test_devices_and_processes_match_one_device(full_run, stopped_run, spawned):
    """4 simulated devices give the single-device parameters after STEPS steps; two processes after STOP steps."""
    final, at_stop, (out, procs) = full_run[0], stopped_run[0], spawned
    log = _wait(procs["four"][0])
    assert "CONFIG ERROR: batch_size 6 is not divisible by the 4 devices" in log, log[-2000:]
    for proc in procs["multi"]:
        _wait(proc)
    for name, expected in (("four", final), ("multi", at_stop)):
        got = dict(np.load(out / f"{name}.npz"))
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=2e-5, err_msg=f"{name} {k}")


# ------------------------------------------------------------------------------------------------------------
# Configuration errors, found before any computation


@pytest.mark.parametrize("sets, message", [
    (["model=convnext_nope"], "unknown model 'convnext_nope'"),
    (["data_dir=/nonexistent/dir"], "data_dir '/nonexistent/dir' does not exist"),
    (["bacth_size=8"], "unknown config key 'bacth_size'; did you mean batch_size"),
    (["batch_size=eight"], "config key 'batch_size' expects int"),
    (["optimizer=sgd"], "optimizer 'sgd' is not one of"),
    (["rand_augment=rand-q9"], "unknown RandAugment section 'q9'"),
    (["num_classes=10"], "has 4 classes but num_classes=10"),
    (["model_kwargs={'depthz': (1, 1, 1, 1)}"], "unknown config override"),
])
def test_bad_config_fails_before_compute(folder, sets, message):
    before = len(jax.live_arrays())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.main(_args(folder, *sets))
    assert len(jax.live_arrays()) == before


def test_init_checkpoint_merge_skips_the_head(tmp_path):
    """init_checkpoint (a PyTorch .pth written here) goes through models.statedict.merge_state_dict: every
    parameter and batch statistic comes from the checkpoint except those init_skip names, which keep the run's
    fresh values; a checkpoint that does not fit is a ConfigError listing the mismatch."""
    import dataclasses

    import torch

    def flat(tree):
        return {".".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    base = configs.Config(model="convnext_tiny_dcls", model_kwargs=TINY, num_classes=4, seed=5)
    source = flat({"p": nnx.state(training.build_model(dataclasses.replace(base, seed=1, num_classes=1000)),
                                   nnx.Param)})          # an ImageNet checkpoint, fine-tuned on 4 classes
    path = tmp_path / "init.pth"
    torch.save({k[2:]: torch.from_numpy(np.array(v)) for k, v in source.items()}, path)
    cfg = dataclasses.replace(base, init_checkpoint=str(path), init_skip=r"^head\.fc\.")
    _, params, batch_stats, _ = nnx.split(training.build_model(cfg), nnx.Param, nnx.BatchStat, ...)
    fresh = flat(params)
    got = flat(training.load_init_checkpoint(cfg, params, batch_stats)[0])
    assert got.keys() == fresh.keys() and any(k.startswith("head.fc.") for k in got)
    for k in got:
        want = fresh[k] if k.startswith("head.fc.") else source[f"p.{k}"]
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert not np.array_equal(source["p.head.fc.weight"], fresh["head.fc.weight"])   # the test can tell them apart
    with pytest.raises(train.ConfigError, match="head.fc.weight: checkpoint \\(1000, 64\\) vs model \\(4, 64\\)"):
        training.load_init_checkpoint(dataclasses.replace(cfg, init_skip=None), params, batch_stats)


def test_device_divisibility():
    cfg = configs.Config(batch_size=6)
    with pytest.raises(train.ConfigError, match="batch_size 6 is not divisible by the 4 devices"):
        training.check_devices(cfg, 4, 1)
    assert training.check_devices(configs.Config(batch_size=8), 4, 2) == 2


def test_command_line_exit_status(folder):
    proc = subprocess.run([sys.executable, "train.py", *_args(folder, "model=nope")], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.py: error: unknown model 'nope'" in proc.stderr


# ------------------------------------------------------------------------------------------------------------
# Optimiser pieces against hand computations


def test_weight_decay_groups_and_position_lr():
    cfg = configs.Config(model="convnext_tiny_dcls", model_kwargs=TINY, num_classes=4, weight_decay=0.05)
    params = nnx.state(training.build_model(cfg), nnx.Param)
    groups = training.param_groups(params, cfg)
    names = {".".join(path_names(p)): g for p, g in jax.tree_util.tree_flatten_with_path(groups)[0]}
    assert names["stages.0.blocks.0.conv_dw.P"] == "position"
    assert names["stages.0.blocks.0.conv_dw.weight"] == "decay"       # (O, 1, K) DCLS weights decay
    assert names["stages.0.blocks.0.mlp.fc1.weight"] == "decay"
    assert names["stem.0.weight"] == "decay"
    for k in ("stages.0.blocks.0.conv_dw.bias", "stages.0.blocks.0.norm.weight", "stages.0.blocks.0.gamma",
              "head.fc.bias", "head.norm.weight"):
        assert names[k] == "no_decay", k
    lr = 0.01
    tx = training.make_optimizer(cfg, lambda step: lr, groups)
    flat = {".".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def first_update(grad_value):
        grads = jax.tree.map(lambda x: jnp.full_like(x, grad_value), params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        return {".".join(path_names(p)): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}

    # Zero gradients: AdamW moves only decayed weights, by -lr * wd * p (torch: p *= 1 - lr * wd).
    for k, u in first_update(0.0).items():
        expected = -lr * 0.05 * flat[k] if names[k] == "decay" else np.zeros_like(flat[k])
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-12, err_msg=k)
    # Unit gradients: the first Adam step is g / (|g| + eps) = 1 / (1 + 1e-8); positions get 5x the lr.
    for k, u in first_update(1.0).items():
        step = 1 / (1 + 1e-8)
        expected = {"decay": -lr * (step + 0.05 * flat[k]), "no_decay": np.full_like(flat[k], -lr * step),
                    "position": np.full_like(flat[k], -5 * lr * step)}[names[k]]
        np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-12, err_msg=k)   # float32 Adam arithmetic


def test_lr_schedule_matches_convnext():
    cfg = configs.Config(lr=4e-3, lr_base_batch=4096, batch_size=2048, min_lr=1e-6, warmup_epochs=2)
    spe, epochs = 5, 10
    sched = training.lr_schedule(cfg, epochs * spe, spe)
    # ConvNeXt utils.cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs)
    base, warm = 2e-3, 2 * spe
    iters = np.arange(epochs * spe - warm)
    ref = np.concatenate([np.linspace(0, base, warm),
                          1e-6 + 0.5 * (base - 1e-6) * (1 + np.cos(np.pi * iters / len(iters)))])
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(jnp.arange(epochs * spe))), ref, rtol=1e-5, atol=1e-10)


def test_repulsive_loss_matches_convnext_dcls():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    ps = [rng.normal(0, 1.0, (2, 6, 1, 5)).astype(np.float32), rng.normal(0, 0.3, (2, 4, 2, 7)).astype(np.float32)]
    ps[1][:, 0, 0, 1] = ps[1][:, 0, 0, 0]   # two coincident positions

    def reference(params):   # ConvNeXt-dcls utils.get_dcls_loss_rep
        loss = 0.0
        for param in params:
            chout, chin, k_count = param.size(1), param.size(2), param.size(3)
            P = param.view(2, chout * chin, k_count).permute(1, 2, 0).contiguous()
            distances_triu = (1 - torch.cdist(P, P, p=2)).triu(diagonal=1)
            loss = loss + 2 * torch.sum(torch.clamp_min(distances_triu, min=0)) / (k_count * (k_count - 1) * chout * chin)
        return loss / len(params)

    expected = reference([torch.from_numpy(p) for p in ps]).item()
    tree = {"a": {"P": jnp.asarray(ps[0]), "weight": jnp.ones(3)}, "b": {"P": jnp.asarray(ps[1])}}
    np.testing.assert_allclose(float(training.repulsive_loss(tree)), expected, rtol=1e-5)
    grads = jax.jit(jax.grad(training.repulsive_loss))(tree)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------------------------
# Input pipeline: host sharding and resume position


def test_hosts_read_their_rows_and_resume_position(folder):
    """data.pipeline.Loader on an ImageFolder: two hosts' rows make the one-host batch; a start step, worker
    processes or threads give the same data; an epoch is the permutation default_rng((seed, epoch)) of the split;
    evaluation pads the last batch (valid False, index -1)."""
    transform = imagenet.Transform(train=True, image_size=16)
    source = imagenet.ImageFolder(folder, "train")
    one = pipeline.Loader(source, transform, 8, seed=3)
    halves = [pipeline.Loader(source, transform, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    whole = list(one.iterate(0, 6))                 # 6 steps: crosses the epoch boundary (4 steps per epoch)
    parts = [list(h.iterate(0, 6)) for h in halves]
    for step, batch in enumerate(whole):
        for key in ("image", "label", "erase", "index"):
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])
    for step, batch in enumerate(one.iterate(3, 3), start=3):
        np.testing.assert_array_equal(batch["image"], whole[step]["image"])
    for threads in (False, True):                   # 2 grain worker processes / threads
        workers = pipeline.Loader(source, transform, 8, seed=3, workers=2, threads=threads)
        for step, batch in enumerate(workers.iterate(2, 3), start=2):
            for key in ("image", "erase", "index"):
                np.testing.assert_array_equal(batch[key], whole[step][key])
    order = np.concatenate([np.random.default_rng((3, e)).permutation(32) for e in range(2)])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in whole]), order[:48])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in whole]), source.labels[order[:48]])
    assert not np.array_equal(whole[0]["image"], whole[4]["image"])      # ... reshuffled every epoch
    assert one.resume_step(one.state(6)) == 6
    with pytest.raises(ValueError, match="seed 3 then, 4 now"):
        pipeline.Loader(source, transform, 8, seed=4).resume_step(one.state(6))
    evaluation = pipeline.Loader(imagenet.ImageFolder(folder, "val"), imagenet.Transform(train=False, image_size=16),
                                 6, seed=0)
    batches = list(evaluation.iterate())
    assert len(batches) == 2 and batches[1]["valid"].tolist() == [True, True, False, False, False, False]
    assert batches[1]["index"].tolist() == [6, 7, -1, -1, -1, -1] and not batches[1]["image"][2:].any()


# ------------------------------------------------------------------------------------------------------------
# Augmentations against timm, replaying timm's random draws


class PyRandom:
    """numpy Generator's methods on Python's `random` and numpy's legacy global generator (what timm uses)."""
    uniform = staticmethod(random.uniform)
    normal = staticmethod(random.gauss)
    random = staticmethod(random.random)

    @staticmethod
    def integers(low, high):
        return random.randint(low, high - 1)

    @staticmethod
    def choice(n, size):
        return np.random.choice(n, size, replace=True)


class NpLegacy:
    """numpy Generator's methods on numpy's legacy global generator (timm's Mixup)."""
    random = staticmethod(np.random.rand)
    beta = staticmethod(np.random.beta)
    integers = staticmethod(np.random.randint)


def _photo(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size[1], :size[0]]
    img = np.stack([x * 5, y * 6, (x + y) * 3], -1) + rng.integers(0, 30, (size[1], size[0], 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _old_pil_posterize(img, bits_to_keep, **_):
    """timm's posterize on PIL < 11, which accepted 0 bits (a black image); PIL 11 raises instead."""
    mask = ~(2 ** (8 - bits_to_keep) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def test_rand_augment_matches_timm(monkeypatch):
    from timm.data import auto_augment
    from timm.data.auto_augment import rand_augment_transform
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, _old_pil_posterize)
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104), "interpolation": Image.Resampling.BICUBIC}
    timm_ra = rand_augment_transform("rand-m9-mstd0.5-inc1", dict(hparams))
    ours = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert [op.name for op in timm_ra.ops] == list(ours.ops) and timm_ra.num_layers == ours.num_layers
    img = _photo()
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        expected = np.asarray(timm_ra(img))
        random.seed(seed)
        np.random.seed(seed)
        np.testing.assert_array_equal(np.asarray(ours(img, PyRandom)), expected, err_msg=f"seed {seed}")
    # every op, both signs (timm negates when random() > 0.5: seed 0 draws 0.84, seed 1 draws 0.13)
    from timm.data.auto_augment import AugmentOp
    for name in ours.ops:
        for seed, negate in ((0, True), (1, False)):
            random.seed(seed)
            expected = np.asarray(AugmentOp(name, prob=1.0, magnitude=7, hparams=hparams)(img))
            got = augment.apply_op(img, name, augment.op_argument(name, 7, negate), (124, 116, 104))
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{name} negate={negate}")


def test_crops_match_timm():
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from timm.data.transforms_factory import transforms_imagenet_eval
    import torchvision.transforms.functional as F
    img = _photo(1, (60, 44))
    rrc = RandomResizedCropAndInterpolation(24, interpolation="bicubic")
    for seed in range(30):
        random.seed(seed)
        expected = rrc.get_params(img, rrc.scale, rrc.ratio)
        random.seed(seed)
        assert augment.rrc_params(img.width, img.height, PyRandom) == expected
    for scale in ((0.08, 1.0), (3.0, 4.0)):   # the second forces the fallback
        random.seed(5)
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(img, scale, rrc.ratio)
        expected = np.asarray(F.resized_crop(img, i, j, h, w, [24, 24], F.InterpolationMode.BICUBIC))
        random.seed(5)
        got = augment.random_resized_crop(img, 24, PyRandom, scale, hflip=0.0)
        np.testing.assert_array_equal(np.asarray(got), expected)
    for crop_pct in (0.875, 0.95):
        t = transforms_imagenet_eval(32, crop_pct=crop_pct, interpolation="bicubic")
        expected = np.asarray(t.transforms[1](t.transforms[0](img)))   # Resize, CenterCrop (before ToTensor)
        np.testing.assert_array_equal(np.asarray(augment.resize_center_crop(img, 32, crop_pct)), expected)


def test_random_erasing_matches_timm():
    import torch
    from timm.data.random_erasing import RandomErasing
    re_ = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    hits = 0
    for seed in range(200):
        random.seed(seed)
        x = torch.full((3, 20, 28), 7.0)
        re_(x)
        erased = (x[0] != 7.0).numpy()
        random.seed(seed)
        top, left, h, w = augment.erase_box(20, 28, PyRandom, 0.25)
        box = np.zeros((20, 28), bool)
        box[top:top + h, left:left + w] = True
        np.testing.assert_array_equal(box, erased, err_msg=f"seed {seed}")
        hits += h > 0
    assert 30 < hits < 70
    x = jnp.zeros((2, 20, 28, 3))
    boxes = jnp.asarray([[2, 3, 5, 7], [0, 0, 0, 0]])
    y = np.asarray(augment.random_erase(x, boxes, jax.random.key(0)))
    assert (y[0, 2:7, 3:10] != 0).all() and (y[0] != 0).sum() == 3 * 5 * 7
    assert (y[1] == 0).all() and abs(y[0, 2:7, 3:10].std() - 1) < 0.3


def test_mixup_cutmix_match_timm():
    import torch
    from timm.data.mixup import Mixup
    mixer = augment.Mixup(num_classes=5, label_smoothing=0.1)
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=0.1, num_classes=5)
    x = np.random.default_rng(0).normal(size=(6, 10, 12, 3)).astype(np.float32)
    labels = np.asarray([0, 1, 2, 3, 4, 1])
    kinds = set()
    for seed in range(12):
        np.random.seed(seed)
        tx, ty = timm_mix(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
        np.random.seed(seed)
        lam, cut, box = mixer.params(NpLegacy, 1, 10, 12)
        kinds.add(bool(cut[0]))
        gx, gy = mixer.apply(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(lam), jnp.asarray(cut), jnp.asarray(box))
        np.testing.assert_allclose(np.asarray(gx), tx.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gy), ty.numpy(), rtol=1e-6, atol=1e-6)
    assert kinds == {True, False}
    # groups mix only among themselves: two groups of 3 equal each group mixed alone
    lam, cut, box = mixer.params(np.random.default_rng(1), 2, 10, 12)
    gx, gy = mixer.apply(jnp.asarray(x), jnp.asarray(labels), *map(jnp.asarray, (lam, cut, box)))
    for g in range(2):
        sx, sy = mixer.apply(jnp.asarray(x[3 * g:3 * g + 3]), jnp.asarray(labels[3 * g:3 * g + 3]),
                             *(jnp.asarray(a[g:g + 1]) for a in (lam, cut, box)))
        np.testing.assert_array_equal(np.asarray(gx[3 * g:3 * g + 3]), np.asarray(sx))
        np.testing.assert_array_equal(np.asarray(gy[3 * g:3 * g + 3]), np.asarray(sy))
