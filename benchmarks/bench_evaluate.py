"""Images/s of the ClickMe evaluation: JAX against the study's PyTorch pipeline, measured in the same run.

    python benchmarks/bench_evaluate.py                                       # resnet50, batch 2, 1 step (CPU)
    python benchmarks/bench_evaluate.py --models all --batch 64 --steps 10    # a GPU: the 16 models
    python benchmarks/bench_evaluate.py --e2e                                 # + the data pipeline on the sample

JAX: evaluation.evaluator.Evaluator's step (as evaluate.py runs it, on one device), jitted: Grad-CAM and
Threshold-Grad-CAM from one backward pass, resized to 224, Spearman, Dice and IoU (every registered metric) against
the human maps, and the top-5 predictions, all on the device. PyTorch, as the study (DCLS-GradCAM-Eval):
the timm model (+ dcls for the _dcls variants, built as the tests build them, random weights), the CAM layer's
activations from a forward hook and their gradient by torch.autograd.grad (to the features only: the study's
`output.backward()` and its second forward pass for the activations cost more), the two CAMs, torchvision
Resize((224, 224)) per map, then scipy.stats.spearmanr per image on the CPU. Both on synthetic inputs at the
model's input size (images N(0, 1), human maps U(0, 1), random labels); the first step (compilation) is not timed.

--e2e adds the whole pipeline over the bundled sample (data/sample, 12 records, repeated --steps times): JAX with
data.pipeline.batches; PyTorch with the study's steps per image: decode and resize (data.preprocess standing in
for Harmonization's TensorFlow loader), PIL and the model's torchvision transform, then the step above.

Prints img/s per model and the ratio JAX / PyTorch (> 1: JAX is faster). PyTorch runs on CUDA when available.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("gradcam", "threshold_gradcam")


# ------------------------------------------------------------------------------------------------------------
# PyTorch: the study's pipeline


def torch_model(name: str, **overrides):
    """The timm (+ dcls) model of `name` with random weights, as the parity tests build it, in eval mode;
    `overrides` go to timm.create_model (e.g. drop_path_rate)."""
    from models import get_entry
    family = get_entry(name).family
    if family == "resnet":
        from tests.test_resnet import reference
    elif family == "convnext" and name.endswith("_gauss"):   # test_convnext's reference would build a plain
        from tests.test_convnext_gauss import reference          # convnext_tiny for it (no "_dcls" suffix)
        return reference(**overrides)
    elif family == "convnext":
        from tests.test_convnext import reference
    elif family == "metaformer":
        from tests.test_metaformer import timm_model as reference
    else:
        from tests.test_fastvit import reference
    return reference(name, **overrides)


def torch_cams(model, layer, x, labels):
    """{method: (B, 224, 224) CAMs} as the study computes them (its GradCAM.py, thresholding_GradCAM.py)."""
    import torch
    import torchvision.transforms as T

    from tests.torch_ref import torch_activation_and_grad
    a, g = torch_activation_and_grad(model, layer, x, labels)
    alpha = g.mean(dim=(2, 3), keepdim=True)
    grad_cam = torch.relu((a * alpha).mean(1))
    t = torch.relu(a * alpha).mean(1)
    lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
    threshold = torch.clamp((t - lo) / (hi - lo), min=0.3)
    resize = T.Resize(size=(224, 224))
    return {m: torch.stack([resize(h) for h in maps[:, None]])[:, 0]
            for m, maps in (("gradcam", grad_cam), ("threshold_gradcam", threshold))}


def scipy_rhos(maps, humans) -> list[float]:
    """The study's metric: scipy.stats.spearmanr per image on the CPU, constant maps skipped."""
    from scipy.stats import spearmanr
    out = []
    for m, h in zip(maps.cpu().numpy(), humans):
        out.append(float("nan") if np.std(m) == 0 or np.std(h) == 0 else spearmanr(m.ravel(), h.ravel())[0])
    return out


class TorchPipeline:
    def __init__(self, name: str):
        import torch
        from models import get_entry
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = torch_model(name).to(self.device)
        self.layer = self.model.get_submodule(get_entry(name).target_layer)
        self.sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)

    def step(self, x, humans: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """One batch (x: NCHW torch tensor); returns (CAM seconds, metric seconds)."""
        import torch
        t0 = time.perf_counter()
        maps = torch_cams(self.model, self.layer, x.to(self.device), torch.from_numpy(labels).long().to(self.device))
        self.sync()
        t1 = time.perf_counter()
        for m in METHODS:
            scipy_rhos(maps[m], humans)
        return t1 - t0, time.perf_counter() - t1


@functools.cache
def torch_pipeline(name: str) -> TorchPipeline:
    return TorchPipeline(name)


# ------------------------------------------------------------------------------------------------------------
# JAX: the evaluation library's step


@functools.cache
def jax_step(name: str):
    """evaluation.evaluator.Evaluator of `name` on one device, random weights: ev(image, heatmap, label) runs its
    jitted step."""
    import jax
    from flax import nnx

    import models
    from evaluation.evaluator import Evaluator
    model = models.create_model(name, rngs=nnx.Rngs(0))
    model.eval()
    return Evaluator(model, methods=METHODS, protocol="study", precision="highest",
                     mesh=jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))


def timed(fn, steps: int) -> float:
    """Seconds per call of fn() over `steps` calls, after one untimed call."""
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_step(name: str, batch: int, steps: int) -> dict:
    import jax
    import torch
    from models import get_entry
    s = get_entry(name).input_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, s, s, 3), np.float32)
    humans = rng.random((batch, 224, 224), np.float32)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    ev = jax_step(name)
    args = [jax.device_put(a, ev.data_sharding) for a in (x, humans, labels)]
    t_jax = timed(lambda: jax.block_until_ready(ev(*args)), steps)
    pipe = torch_pipeline(name)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(pipe.device)
    parts = []
    timed(lambda: parts.append(pipe.step(xt, humans, labels)), steps)
    cam_s, metric_s = np.mean(parts[1:], axis=0)
    return {"jax": batch / t_jax, "torch_cam": batch / cam_s, "scipy": batch / metric_s,
            "torch": batch / (cam_s + metric_s)}


def bench_e2e(name: str, batch: int, steps: int) -> dict:
    """Passes over the bundled sample: JAX with data.pipeline, PyTorch with the study's per-image steps."""
    import jax
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from data import clickme, pipeline
    from evaluation import SAMPLE_DIR
    from data.preprocess import clickme_heatmap, clickme_image
    from models import get_entry
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    entry = get_entry(name)
    with tempfile.TemporaryDirectory() as tmp:
        source = clickme.data_source("validation", data_dir=tmp, clickme_dir=SAMPLE_DIR,
                                     num_shards={"validation": 1})
        examples = [source[i] for i in range(len(source))]
    n = len(examples)
    ev = jax_step(name)

    def jax_pass():
        out = [ev(b["image"], b["heatmap"], b["label"])
               for b in pipeline.batches(examples, entry, batch_size=batch, workers=min(8, os.cpu_count() or 1))]
        jax.block_until_ready(out)

    pipe = torch_pipeline(name)
    transform = T.Compose([T.Resize(entry.resize_size, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(entry.input_size), T.ToTensor(), T.Normalize(entry.mean, entry.std)])

    def torch_pass():
        for i in range(0, n, batch):
            chunk = examples[i:i + batch]
            images = [clickme_image(ex["image"]) for ex in chunk]          # the study: TensorFlow, in tf.data
            humans = np.stack([clickme_heatmap(ex["heatmap"]) for ex in chunk])
            x = torch.stack([transform(Image.fromarray(im.astype(np.uint8))) for im in images])
            pipe.step(x, humans, np.array([int(ex["label"]) for ex in chunk]))

    return {"jax": n / timed(jax_pass, steps), "torch": n / timed(torch_pass, steps)}


# ------------------------------------------------------------------------------------------------------------


def table(rows: list[tuple], header: tuple) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50", help="comma-separated registry names, or 'all'")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed steps (--e2e: passes over the sample)")
    ap.add_argument("--e2e", action="store_true", help="also time the whole pipeline on the bundled sample")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)   # dcls logs CUDA / implicit-GEMM notices
    import jax
    import torch

    import models
    names = models.list_models(study_only=True) if args.models == "all" else [n.strip() for n in args.models.split(",")]
    for n in names:
        models.get_entry(n)
    cuda = torch.cuda.is_available()
    torch_device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; PyTorch {torch.__version__} on {torch_device}; "
          f"scipy on one CPU core. Batch {args.batch}, {args.steps} timed step(s), CAMs: {', '.join(METHODS)}")
    rows, e2e_rows = [], []
    for name in names:
        r = bench_step(name, args.batch, args.steps)
        rows.append((name, f"{r['jax']:.1f}", f"{r['torch_cam']:.1f}", f"{r['scipy']:.1f}", f"{r['torch']:.1f}",
                     f"{r['jax'] / r['torch']:.2f}"))
        if args.e2e:
            e = bench_e2e(name, args.batch, args.steps)
            e2e_rows.append((name, f"{e['jax']:.1f}", f"{e['torch']:.1f}", f"{e['jax'] / e['torch']:.2f}"))
    print(table(rows, ("model", "JAX step img/s", "torch CAMs img/s", "scipy rho img/s", "torch img/s",
                       "JAX/torch")))
    if e2e_rows:
        print("\nEnd to end on the bundled sample (decode, preprocess, CAMs, metric):")
        print(table(e2e_rows, ("model", "JAX img/s", "torch img/s", "JAX/torch")))


if __name__ == "__main__":
    main()
