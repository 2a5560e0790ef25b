"""Score a model's CAMs against ClickMe human attention maps (the DCLS Grad-CAM study), on every device.

    python evaluate.py --model resnet50_dcls                       # published checkpoint, ClickMe validation
    python evaluate.py --model convnext_tiny_dcls --cam all --limit 2048 --output out.json
    python evaluate.py --models all --table results.md             # the study's table, 16 models x 2 CAMs
    python evaluate.py --model resnet50 --sample --random-init     # offline smoke run on the bundled sample
    python evaluate.py --model resnet50_dcls --image cat.jpg --overlays out/   # the CAMs of any photo
    python evaluate.py --model resnet50_dcls --faithfulness        # also deletion / insertion, drop, ROAD

Each result carries the top-1 / top-5 accuracy of the evaluated images (ClickMe records hold ImageNet labels): a
published checkpoint far below its ImageNet accuracy means a wrong key map or preprocessing, whatever the score.
--precision sets the precision of matmuls and convolutions (default "highest": true float32, which the README's
tolerances assume; "default" lets TPUs and recent GPUs use bfloat16 / TF32 passes; "bfloat16" computes in
bfloat16). The JSON records it with the device, the versions, and the SHA-256 of the checkpoint evaluated.

Data-parallel over all local devices (and all hosts once `jax.distributed` is initialised, see
--distributed): one `Mesh` axis "data", the batch sharded over it, parameters replicated, CAMs and the
Spearman metric computed on the devices. The last partial batch is padded and masked, never dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from evaluation import runtime

DEFAULT_CAMS = ("gradcam", "threshold_gradcam")
# --precision: "highest" (the default) runs float32 matmuls/convolutions at full float32 precision on every backend,
# the setting of the tests and of the README's tolerances (on CPU all three float32 settings compute alike, while TPUs
# and Ampere+ GPUs otherwise use bfloat16 / TF32 passes that move per-image rho); "default" is the backend's default;
# "bfloat16" casts the parameters and images to bfloat16 (CAMs and metrics stay float32).
PRECISIONS = ("highest", "default", "bfloat16")
# Below this top-1 accuracy on >= ACCURACY_MIN_IMAGES images a trained ImageNet checkpoint is suspect (published
# ones reach 76-84 % on ImageNet validation).
ACCURACY_WARN_TOP1, ACCURACY_MIN_IMAGES = 0.5, 20


class UsageError(Exception):
    """A problem with the command line, the checkpoint or the data: reported in one line, exit code 2."""


# ------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a registry name (python evaluate.py --list-models)")
    which.add_argument("--models", help="comma-separated names, or 'all' for the 16 models of the study")
    which.add_argument("--list-models", action="store_true", help="print the model names and exit")
    p.add_argument("--cam", default=",".join(DEFAULT_CAMS),
                   help="CAM method(s): a name, a comma-separated list, or 'all' (default: %(default)s)")
    p.add_argument("--checkpoint", help="checkpoint file, orbax directory or URL (default: the model's "
                   "published checkpoint, downloaded to the cache and converted once)")
    p.add_argument("--random-init", action="store_true", help="random weights, no checkpoint (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    p.add_argument("--clickme-dir", help="directory holding the ClickMe TFRecord shards (else downloaded)")
    p.add_argument("--clickme-url", help="download the shards from this mirror instead of the official bucket "
                   "(files <url>/val/val-<i>.tfrecords, i = 0..16)")
    p.add_argument("--data-dir", help="tensorflow-datasets data directory (default: ~/tensorflow_datasets)")
    p.add_argument("--sample", action="store_true",
                   help="use the bundled sample (a few synthetic-heatmap records): runs offline")
    p.add_argument("--split", default="validation", choices=("validation", "train"))
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, help="global batch (default 32 per device); a multiple of the "
                   "device count")
    p.add_argument("--protocol", default="study", choices=("study", "corrected"),
                   help="study: the CAM of the cropped input stretched to 224x224 as the study did; corrected: "
                        "compared inside the crop window only")
    p.add_argument("--output", help="write the results and the full configuration to this JSON file")
    p.add_argument("--table", help="with --models: write the Markdown table to this file")
    p.add_argument("--overlays", help="write PNG overlays of the first --num-overlays images to this directory")
    p.add_argument("--num-overlays", type=int, default=8)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--cache-dir", help="checkpoint cache (default: $DCLS_JAX_CACHE or ~/.cache/dcls_jax)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() even when no cluster is detected (configuration from "
                        "the multi-host flags, else from the environment)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show the dataset builder's own output")
    runtime.add_distributed_flags(p)
    p.add_argument("--precision", default="highest", choices=PRECISIONS,
                   help="matmul/convolution precision (default: %(default)s, exact float32 as the README's "
                        "tolerances assume; 'default' lets TPUs/GPUs use bfloat16 or TF32 passes; 'bfloat16' "
                        "computes the network in bfloat16)")
    p.add_argument("--image", nargs="+", metavar="PATH",
                   help="with --model: the CAMs of these image files (JPEG, PNG, ...) with the model's own "
                        "preprocessing, written as figures to --overlays DIR (no ClickMe data)")
    p.add_argument("--label", type=int, help="with --image: the ImageNet class to explain (default: the top "
                   "prediction of each image)")
    p.add_argument("--plot", help="write a plot of the results table (alignment per architecture, with and "
                   "without DCLS) to this PNG; `python -m cam.figures table` plots saved JSONs")
    p.add_argument("--faithfulness", action="store_true",
                   help="also score each CAM's faithfulness to the model (cam.faithfulness): deletion and insertion "
                        "AUC, average drop, increase in confidence, ROAD (most/least relevant first, combined)")
    p.add_argument("--faithfulness-steps", type=int, default=32,
                   help="points of the deletion / insertion curves (default %(default)s)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.batch_size is not None and hasattr(os, "sysconf"):
        need = args.batch_size * 224 * 224 * 4 * 4 * 3   # image + human map, float32, ~3 batches in flight
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > memory:
            p.error(f"--batch-size {args.batch_size} needs about {need / 2**30:.0f} GiB of host memory for its "
                    f"input batches; this host has {memory / 2**30:.0f} GiB")
    if args.num_overlays < 0:
        p.error(f"--num-overlays must be >= 0, got {args.num_overlays}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.num_processes is not None and args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or 1 << 30):
        p.error(f"--process-id must be in [0, --num-processes), got {args.process_id}")
    if args.faithfulness_steps < 1:
        p.error("--faithfulness-steps must be >= 1")
    if args.random_init and args.checkpoint:
        p.error("--random-init and --checkpoint exclude each other")
    if args.image:
        if not args.model:
            p.error("--image needs --model (one model)")
        if args.sample or args.clickme_dir or args.clickme_url or args.table or args.plot or args.limit:
            p.error("--image takes no dataset flags (--sample, --clickme-dir, --clickme-url, --limit, --table, "
                    "--plot)")
        if not args.overlays and not args.output:
            p.error("--image needs --overlays DIR (the figures) and/or --output FILE (the predictions, JSON)")
    elif args.label is not None:
        p.error("--label goes with --image (ClickMe records carry their own labels)")
    if args.clickme_dir and args.clickme_url:
        p.error("--clickme-dir and --clickme-url exclude each other")
    try:
        runtime.check_distributed_flags(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_outputs(args) -> None:
    """Before anything is built: every path the run will write (--output, --table, --plot, --overlays) can be
    written. Creates nothing: a temporary file is created and removed in the nearest existing directory on each
    path (the run creates the missing ones when it writes). Process 0 only (the others write nothing). Raises
    UsageError naming the flag."""
    if args.process_id not in (None, 0):
        return
    targets = [(f"--{flag}", Path(getattr(args, flag)), False) for flag in ("output", "table", "plot")
               if getattr(args, flag, None)]
    if args.overlays:
        targets.append(("--overlays", Path(args.overlays), True))
    for flag, path, is_dir in targets:
        if not is_dir and path.is_dir():
            raise UsageError(f"{flag} {path} is a directory, not a file")
        if is_dir and path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a directory")
        if not is_dir and path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} cannot be written (permission denied)")
        existing = (path if is_dir else path.parent).absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{flag} {path} cannot be written: {existing} is not a directory")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise UsageError(f"{flag} {path} cannot be written: {e.strerror or e} ({existing})") from None


def json_safe(value):
    """`value` with every non-finite float (NaN, +-Inf, also numpy's) replaced by None: JSON null, so the file
    parses with any JSON reader (json.dumps(..., allow_nan=False) then cannot fail on numbers)."""
    import math
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:   # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def non_finite_scores(results: list[dict]) -> list[str]:
    """'model / cam' of every result whose score or mean rho is not a finite number."""
    import math
    bad = []
    for r in results:
        for m, c in r.get("cams", {}).items():
            if any(not isinstance(c.get(k), (int, float)) or not math.isfinite(c[k]) for k in ("score", "mean_rho")):
                bad.append(f"{r['model']} / {m} ({c.get('n_evaluated')} images evaluated, {c.get('n_skipped')} "
                           "skipped)")
    return bad


def resolve_models(args) -> list[str]:
    import models
    names = models.list_models(study_only=True) if args.models == "all" else [n.strip() for n in (args.model or args.models).split(",")]
    for n in names:
        models.get_entry(n)  # raises ValueError listing the valid names
    return names


def resolve_cams(spec: str) -> list[str]:
    import cam
    names = list(cam.METHOD_NAMES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in cam.METHOD_NAMES:
            raise ValueError(f"unknown CAM method {n!r}; valid names: {', '.join(cam.METHOD_NAMES)}, all")
    if not names:
        raise ValueError("--cam names no method")
    return names


# ------------------------------------------------------------------------------------------------------------
# Model


def cache_dir(args) -> Path:
    from data.download import default_cache_dir
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def load_model(name: str, args):
    """(model, source, sha256): random weights, a given checkpoint (file, orbax directory or URL), or the published
    checkpoint, converted once into an orbax directory under the cache and restored from there afterwards.
    `sha256` is that of the bytes evaluated (see checkpoint_sha256; None for --random-init), checked against the
    registry's pinned hash of the published checkpoint, if any, on every load."""
    from flax import nnx

    import models
    from models import convert
    if args.random_init:
        return models.create_model(name, rngs=nnx.Rngs(args.seed)), "random-init", None
    from data import download
    if args.checkpoint:
        path = args.checkpoint
        if path.startswith(("http://", "https://")):
            path = download.cached_download(path, cache_dir(args))
        if not Path(path).exists():
            raise UsageError(f"--checkpoint {path} does not exist")
        digest = checkpoint_sha256(path)
        return convert.load(name, path), args.checkpoint, digest
    entry = models.get_entry(name)
    ckpt = entry.checkpoint
    if ckpt is None:
        raise UsageError(f"{name} has no published checkpoint: pass --checkpoint or --random-init")
    pinned = pinned_sha256(entry)
    raw = download.cache_path(ckpt.url, cache_dir(args), filename=ckpt.filename)
    if raw.is_file():   # bytes already cached: a pinned hash they fail is refused before any conversion
        verify_sha256(download.sha256_file(raw), pinned, f"{name}'s checkpoint {raw} (from {ckpt.url})")
    # downloads (pinned hash checked), converts once under a lock shared by concurrent runs, verifies the cache
    model = convert.load_published(name, cache_dir(args))
    record = download.read_record(raw)   # the SHA-256 of the bytes the conversion was made from
    return model, ckpt.url, record["sha256"] if record else None


def checkpoint_sha256(path) -> str:
    """The SHA-256 of a checkpoint file; of a directory (an orbax checkpoint), the SHA-256 of the sorted lines
    "<sha256 of the file>  <path relative to the directory>" of all its files (as `sha256sum` prints them)."""
    import hashlib
    path = Path(path)

    from data.download import sha256_file as of_file
    if path.is_dir():
        lines = sorted(f"{of_file(p)}  {p.relative_to(path).as_posix()}\n" for p in path.rglob("*") if p.is_file())
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    return of_file(path)


def pinned_sha256(entry) -> str | None:
    """The SHA-256 a registry entry pins for its published checkpoint (Checkpoint.sha256 or Entry.sha256), if any."""
    pinned = getattr(entry.checkpoint, "sha256", None) or getattr(entry, "sha256", None)
    return pinned.lower() if pinned else None


def verify_sha256(digest: str, pinned: str | None, what: str) -> str:
    """`digest`, or a UsageError when the registry pins another hash."""
    if pinned and digest.lower() != pinned.lower():
        raise UsageError(f"SHA-256 mismatch for {what}: got {digest}, the registry pins {pinned}. The file is "
                         "corrupt or not the published checkpoint; delete it to download it again, or pass the "
                         "right file with --checkpoint")
    return digest


# ------------------------------------------------------------------------------------------------------------
# Data


SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"


def data_source(args):
    """The split as a tfds data source, prepared on first use (from --clickme-dir, else downloaded). With several
    processes, process 0 prepares it first; the others then open it (or prepare their own copy when --data-dir
    is not shared)."""
    import jax
    from jax.experimental import multihost_utils

    from data import clickme
    if args.no_progress or not args.verbose:
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
    if args.sample:
        kwargs = dict(data_dir=cache_dir(args) / "sample_tfds", clickme_dir=SAMPLE_DIR, num_shards={args.split: 1})
    elif args.clickme_dir:
        if not Path(args.clickme_dir).is_dir():
            raise UsageError(f"--clickme-dir {args.clickme_dir} is not a directory")
        kwargs = dict(data_dir=args.data_dir, clickme_dir=args.clickme_dir)
    else:
        kwargs = dict(data_dir=args.data_dir, **({"base_url": args.clickme_url} if args.clickme_url else {}))

    def prepare():
        try:
            with quiet(not args.verbose):
                return clickme.data_source(args.split, **kwargs)
        except OSError as e:
            if "clickme_dir" in kwargs or e.__cause__ is None:     # not a download failure (those are chained)
                raise
            prefix, count = clickme.SHARDS[args.split]
            url = kwargs.get("base_url", clickme.BASE_URL)
            raise UsageError(f"could not download the ClickMe {args.split} shards from {url}/{prefix}/ "
                             f"({getattr(e.__cause__, 'reason', e.__cause__)}). Without network access, download "
                             f"{prefix}-0.tfrecords ... {prefix}-{count - 1}.tfrecords from "
                             f"{clickme.BASE_URL}/{prefix}/ elsewhere and pass their directory with --clickme-dir DIR "
                             "(or a mirror with --clickme-url URL)") from e

    if jax.process_count() == 1:
        return prepare()
    source = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("clickme prepared")
    return source if source is not None else prepare()


# ------------------------------------------------------------------------------------------------------------
# The evaluation step: CAMs, alignment with the human maps and the metrics, on the devices


def feature_size(model, entry) -> tuple[int, int]:
    """(h, w) of the model's CAM target activations for its input size (shape inference only)."""
    import jax
    s = entry.input_size
    return jax.eval_shape(model.forward_features, jax.ShapeDtypeStruct((1, s, s, 3), "float32")).shape[1:3]


def make_step(graphdef, methods, entry, protocol, feature_hw, faithfulness: dict | None = None):
    """step(state, image, heatmap, label) -> {method: {"rho", "dice", "iou"}} per image; pure and jit-able.

    As in the study, CAMs are resized once, from the feature resolution `feature_hw` (h, w) to 224 x 224, by
    data.protocols.align_cam (saliency: from the input resolution). With `faithfulness` (options of
    cam.faithfulness.make_faithfulness_fn), each method also gets cam.faithfulness.METRIC_NAMES per image, the CAM
    bilinearly resized to the model's input."""
    import cam
    from cam import metrics
    from data import protocols
    features = [m for m in methods if m != "saliency"]
    cams = [cam.make_cams_fn(graphdef, features, output_size=feature_hw)] if features else []
    if "saliency" in methods:
        cams.append(cam.make_cams_fn(graphdef, ["saliency"]))
    if faithfulness is not None:
        from cam import faithfulness as ff
        faithful = ff.make_faithfulness_fn(graphdef, **faithfulness)

    def step(state, image, heatmap, label):
        human = protocols.align_heatmap(heatmap, entry, protocol)
        maps = {m: cam_maps for f in cams for m, cam_maps in f(state, image, label).items()}
        out = {}
        for method in methods:
            aligned = protocols.align_cam(maps[method], entry, protocol)
            out[method] = {"rho": metrics.spearman(aligned, human), "dice": metrics.dice(aligned, human),
                           "iou": metrics.iou(aligned, human)}
            if faithfulness is not None:
                out[method].update(faithful(state, image, maps[method], label))
        return out

    return step


def top_k(logits, labels, k: int = 5) -> dict:
    """Per image: the predicted class, whether it is the label (top-1), whether the label is among the k highest
    logits (top-k; ties broken towards the lower class index, as lax.top_k)."""
    import jax
    import jax.numpy as jnp
    _, top = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))
    labels = jnp.asarray(labels)
    return {"predicted": top[:, 0].astype(jnp.int32), "top1": top[:, 0] == labels,
            "top5": (top == labels[:, None]).any(axis=-1)}


def with_predictions(step, graphdef, precision: str = "highest"):
    """step(state, image, heatmap, label) -> the step's output plus out["predictions"] (top_k of the model's logits).
    The extra forward pass is the one inside the CAM's VJP: XLA merges the two (common subexpressions; the
    compiled step of the reduced test ResNet held as many convolutions and dots as without, CPU). With precision
    "bfloat16" the floating parameters and the images are cast to bfloat16 first."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def fn(state, image, heatmap, label):
        state, image = cast_for_precision(state, image, precision)
        out = dict(step(state, image, heatmap, label))
        model = nnx.merge(graphdef, state)
        model.eval()
        out["predictions"] = top_k(model(image), label)
        return out

    return fn


def cast_for_precision(state, image, precision: str):
    """(state, image) with floating parameters and the image cast to bfloat16 for precision "bfloat16"."""
    import jax
    import jax.numpy as jnp
    if precision != "bfloat16":
        return state, image
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return state, image.astype(jnp.bfloat16)


def precision_context(precision: str):
    """The jax.default_matmul_precision context for --precision (trace and lowering happen inside it)."""
    import jax
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return jax.default_matmul_precision("highest" if precision == "highest" else "default")


class WithPrecision:
    """A jitted function called (and lowered) under precision_context(precision)."""

    def __init__(self, fn, precision: str):
        self.fn, self.precision = fn, precision

    def __call__(self, *args):
        with precision_context(self.precision):
            return self.fn(*args)

    def lower(self, *args):
        with precision_context(self.precision):
            return self.fn.lower(*args)


def build_step(model, entry, methods, protocol: str, precision: str, mesh, faithfulness: dict | None = None):
    """The jitted, sharded evaluation step of `model` (see make_step, with_predictions) under `precision`."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    graphdef, _ = nnx.split(model)
    fn = with_predictions(make_step(graphdef, methods, entry, protocol, feature_size(model, entry), faithfulness),
                          graphdef, precision)
    return WithPrecision(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                                               out_specs=P("data"))), precision)


def accuracy(predictions: dict, valid) -> dict:
    """{"top1", "top5", "n"} over the valid rows of the gathered predictions."""
    import numpy as np
    valid = np.asarray(valid, bool)
    n = int(valid.sum())
    mean = (lambda k: float(np.asarray(predictions[k])[valid].mean()) if n else float("nan"))
    return {"top1": mean("top1"), "top5": mean("top5"), "n": n}


def accuracy_warning(name: str, acc: dict, source: str) -> str | None:
    """A warning line when a trained checkpoint's top-1 is implausibly low (None for random weights)."""
    if source == "random-init" or acc["n"] < ACCURACY_MIN_IMAGES or not acc["top1"] < ACCURACY_WARN_TOP1:
        return None
    return (f"{name}: top-1 accuracy {acc['top1']:.1%} on {acc['n']} images is implausibly low for a trained ImageNet "
            f"checkpoint (published ones reach 76-84 %): check the checkpoint, its key mapping and the preprocessing "
            f"before trusting its alignment score")


def evaluate_model(name: str, args, methods: list[str], mesh, source) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import models
    from cam import metrics
    from data import pipeline

    entry = models.get_entry(name)
    model, source_name, checkpoint_sha = load_model(name, args)
    model.eval()
    graphdef, state = nnx.split(model)
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    batch = args.batch_size or 32 * n_dev
    if batch % n_dev:
        raise UsageError(f"--batch-size {batch} is not a multiple of the {n_dev} devices")
    local_batch = batch // n_proc
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(state, replicated)
    # Each device evaluates its slice of the batch with replicated parameters: no collectives.
    faith = dict(num_steps=args.faithfulness_steps) if getattr(args, "faithfulness", False) else None
    step = build_step(model, entry, methods, args.protocol, args.precision, mesh, faith)

    n = len(source) if args.limit is None else min(args.limit, len(source))
    if n == 0:
        raise UsageError(f"the {args.split} split holds no records")
    steps = pipeline.num_batches(n, local_batch, n_proc)
    results = {m: {k: [] for k in ("rho", "dice", "iou") + faithfulness_names(args)} for m in methods}
    predictions = {k: [] for k in ("predicted", "top1", "top5")}
    seen_index, seen_valid = [], []
    overlays_left = args.num_overlays if args.overlays and jax.process_index() == 0 else 0
    shown = []
    progress = runtime.Progress(n, enabled=not args.no_progress and jax.process_index() == 0, desc=name)
    start = time.perf_counter()
    for b in pipeline.batches(source, entry, batch_size=local_batch, limit=n, process_index=jax.process_index(),
                              process_count=n_proc, workers=args.workers):
        glob = [jax.make_array_from_process_local_data(sharded, b[k]) for k in ("image", "heatmap", "label")]
        out = step(state, *glob)
        if n_proc > 1:  # index and valid take the same path as the images, so their rows match the results'
            where = [jax.make_array_from_process_local_data(sharded, b[k]) for k in ("index", "valid")]
            out, index, valid = multihost_utils.process_allgather((out, *where), tiled=True)
        else:
            out, index, valid = jax.device_get(out), b["index"], b["valid"]
        for m in methods:
            for k in results[m]:
                results[m][k].append(np.asarray(out[m][k]))
        for k in predictions:
            predictions[k].append(np.asarray(out["predictions"][k]))
        seen_index.append(np.asarray(index))
        seen_valid.append(np.asarray(valid))
        if overlays_left:
            overlays_left = collect_overlays(args, model, methods, entry, b, out, np.asarray(index), overlays_left,
                                             shown)
        progress.update(int(np.asarray(valid).sum()))
    progress.close()
    elapsed = time.perf_counter() - start

    index, valid = np.concatenate(seen_index), np.concatenate(seen_valid)
    got = np.sort(index[valid])
    if not np.array_equal(got, np.arange(n)):
        raise RuntimeError(f"evaluated images do not match the requested {n} (lost or duplicated records)")
    predictions = {k: np.concatenate(v) for k, v in predictions.items()}
    acc = accuracy(predictions, valid)
    warning = accuracy_warning(name, acc, source_name)
    if warning and jax.process_index() == 0:
        print(f"warning: {warning}", file=sys.stderr)
    rows = {}
    for m in methods:
        rho, dice, iou = (np.concatenate(results[m][k]) for k in ("rho", "dice", "iou"))
        score = metrics.alignment_score(rho, valid)
        ok = valid & np.isfinite(rho)
        rows[m] = {**score, "dice": float(dice[ok].mean()) if ok.any() else float("nan"),
                   "iou": float(iou[ok].mean()) if ok.any() else float("nan"),
                   "skipped_reason": "constant or non-finite map (CAM or human map)" if score["n_skipped"] else "",
                   "rho_per_image": {int(i): (float(r) if np.isfinite(r) else None)
                                     for i, r in zip(index[valid], rho[valid])}}
        rows[m].update(top1=acc["top1"], top5=acc["top5"])       # next to each score, as the table shows them
        if faithfulness_names(args):
            rows[m]["faithfulness"] = faithfulness_summary(results[m], valid)
    if shown:
        write_overlay_figures(args, name, methods, shown)
    return {"model": name, "checkpoint": source_name, "checkpoint_sha256": checkpoint_sha, "images": n,
            "seconds": elapsed, "images_per_second": n / elapsed, "devices": n_dev, "processes": n_proc,
            "batch_size": batch, "precision": args.precision,
            "accuracy": acc, "warnings": [warning] if warning else [],
            "predicted_per_image": {int(i): int(p) for i, p in zip(index[valid], predictions["predicted"][valid])},
            "cams": rows, "_shown": shown}


def faithfulness_names(args) -> tuple[str, ...]:
    if not getattr(args, "faithfulness", False):
        return ()
    from cam.faithfulness import METRIC_NAMES
    return METRIC_NAMES


def faithfulness_summary(per_method: dict, valid):
    """{metric: mean over the evaluated images (valid, finite: degenerate maps skipped)} and the count."""
    import numpy as np

    from cam.faithfulness import METRIC_NAMES
    out = {}
    for k in METRIC_NAMES:
        v = np.concatenate(per_method[k])
        ok = valid & np.isfinite(v)
        out[k] = float(v[ok].mean()) if ok.any() else float("nan")
    out["n_evaluated"] = int((valid & np.isfinite(np.concatenate(per_method[METRIC_NAMES[0]]))).sum())
    return out


def collect_overlays(args, model, methods, entry, batch, out, index, left: int, shown: list) -> int:
    """Keeps, for the first `left` images of the batch (process 0), what the figures show: the model input back in
    [0, 1], the human map as the metric compares it (data.protocols.align_heatmap), each method's map at 224 x 224,
    its rho, the label and the prediction. Returns how many are still wanted."""
    import numpy as np

    import cam
    from data import protocols
    from data.preprocess import SIZE
    k = min(left, int(batch["valid"].sum()))
    if k == 0:
        return left
    images = batch["image"][:k]
    display = np.clip(images * np.asarray(entry.std) + np.asarray(entry.mean), 0, 1)   # back to [0, 1]
    humans = np.asarray(protocols.align_heatmap(batch["heatmap"][:k], entry, args.protocol))
    with precision_context(args.precision):
        maps = {m: np.asarray(cam.compute(model, images, batch["label"][:k], m, output_size=(SIZE, SIZE)))
                for m in methods}
    row_of = {int(i): r for r, i in enumerate(index)}
    for i in range(k):
        r = row_of[int(batch["index"][i])]
        shown.append({"index": int(batch["index"][i]), "image": display[i], "human": humans[i],
                      "label": int(batch["label"][i]), "predicted": int(np.asarray(out["predictions"]["predicted"])[r]),
                      "maps": {m: maps[m][i] for m in methods},
                      "rho": {m: float(np.asarray(out[m]["rho"])[r]) for m in methods}})
    return left - k


def write_overlay_figures(args, name: str, methods, shown: list) -> None:
    """DIR/<model>_<index>_<method>.png (image | model map | human map, labelled) and DIR/<model>_grid.png
    (the images x the methods)."""
    from cam import figures
    out = Path(args.overlays)
    for s in shown:
        for m in methods:
            figures.save(figures.overlay_figure(s["image"], s["maps"][m], s["human"], label=s["label"],
                                                predicted=s["predicted"], rho=s["rho"][m], method=m, model=name),
                         out / f"{name}_{s['index']:06d}_{m}.png")
    figures.save(figures.grid_figure([s["image"] for s in shown], {m: [s["maps"][m] for s in shown] for m in methods},
                                     humans=[s["human"] for s in shown], labels=[s["label"] for s in shown],
                                     predicted=[s["predicted"] for s in shown],
                                     rhos={m: [s["rho"][m] for s in shown] for m in methods}, title=name),
                 out / f"{name}_grid.png")


def write_twin_figures(args, results: list[dict], methods) -> list[Path]:
    """DIR/<model>_vs_<model>_dcls_<method>.png for each evaluated model whose DCLS twin was evaluated too."""
    from cam import figures
    by_name = {r["model"]: r.get("_shown") or [] for r in results}
    written = []
    for name, a in by_name.items():
        b = by_name.get(name + "_dcls")
        if not a or not b:
            continue
        common = sorted({s["index"] for s in a} & {s["index"] for s in b})
        a = [s for s in a if s["index"] in common]
        b = {s["index"]: s for s in b}
        b = [b[s["index"]] for s in a]
        for m in methods:
            fig = figures.twin_figure([s["image"] for s in a], (name, [s["maps"][m] for s in a]),
                                      (name + "_dcls", [s["maps"][m] for s in b]), humans=[s["human"] for s in a],
                                      labels=[s["label"] for s in a],
                                      rhos=([s["rho"][m] for s in a], [s["rho"][m] for s in b]), method=m)
            written.append(figures.save(fig, Path(args.overlays) / f"{name}_vs_{name}_dcls_{m}.png"))
    return written


# ------------------------------------------------------------------------------------------------------------
# Reporting


COLUMNS = ("model", "CAM", "alignment score", "mean rho", "top-1", "top-5", "images evaluated", "images skipped",
           "img/s")


FAITHFULNESS_COLUMNS = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC",
                        "average_drop": "avg drop", "increase_in_confidence": "increase", "road_combined": "ROAD"}


def columns(results: list[dict]) -> tuple[str, ...]:
    """COLUMNS, and the faithfulness columns when the results have them (--faithfulness)."""
    has = any("faithfulness" in c for r in results for c in r["cams"].values())
    return COLUMNS + (tuple(FAITHFULNESS_COLUMNS.values()) if has else ())


def table_rows(results: list[dict]) -> list[tuple]:
    rows = []
    for r in results:
        for m, c in r["cams"].items():
            acc = r.get("accuracy") or {}
            rows.append((r["model"], m, f"{c['score']:.4f}", f"{c['mean_rho']:.4f}", _percent(acc.get("top1")),
                         _percent(acc.get("top5")), str(c["n_evaluated"]),
                         f"{c['n_skipped']}" + (f" ({c['skipped_reason']})" if c["n_skipped"] else ""),
                         f"{r['images_per_second']:.1f}")
                        + tuple(f"{c['faithfulness'][k]:.4f}" for k in FAITHFULNESS_COLUMNS if "faithfulness" in c))
    return rows


def _percent(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def markdown_table(results: list[dict]) -> str:
    cols = columns(results)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: list[dict]) -> None:
    cols = columns(results)
    rows = [cols, *table_rows(results)]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(cols))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ------------------------------------------------------------------------------------------------------------
# Single images (--image)


def read_image(path) -> "np.ndarray":
    """(H, W, 3) uint8 RGB of any image file PIL reads (JPEG, PNG, ...; alpha dropped, greyscale expanded)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read the image {path}: {e}") from None


def evaluate_images(args, methods: list[str]) -> dict:
    """The CAMs of image files: each image through the model's own transform (data.preprocess.model_input: resize
    the shorter side, center crop, normalise), its top-5 predictions, and the maps of `methods` for --label (else
    its top prediction), written as labelled figures to --overlays. Returns the JSON-able record."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import cam
    import models
    from data.preprocess import model_input
    entry = models.get_entry(args.model)
    if args.label is not None and not 0 <= args.label < entry.num_classes:
        raise UsageError(f"--label {args.label} is outside [0, {entry.num_classes})")
    pictures = [read_image(p) for p in args.image]          # every file is readable before the model loads
    model, source, digest = load_model(args.model, args)
    model.eval()
    graphdef, state = nnx.split(model)
    size = entry.input_size

    def logits_fn(state, x):
        state, x = cast_for_precision(state, x, args.precision)
        m = nnx.merge(graphdef, state)
        m.eval()
        return jax.nn.softmax(m(x).astype(jnp.float32), axis=-1)

    cams_fn = cam.make_cams_fn(graphdef, methods, output_size=(size, size))
    predict = WithPrecision(jax.jit(logits_fn), args.precision)
    explain = WithPrecision(jax.jit(lambda state, x, y: cams_fn(*cast_for_precision(state, x, args.precision), y)),
                            args.precision)
    from cam import figures
    stems = [Path(p).stem for p in args.image]
    records = []
    for i, (path, rgb) in enumerate(zip(args.image, pictures)):
        x = model_input(rgb, entry)[None]
        probs = np.asarray(predict(state, x))[0]
        top = np.argsort(-probs, kind="stable")[:5]
        label = int(top[0]) if args.label is None else args.label
        maps = {m: np.asarray(v)[0] for m, v in explain(state, x, np.array([label], np.int32)).items()}
        display = np.clip(x[0] * np.asarray(entry.std) + np.asarray(entry.mean), 0, 1)
        stem = stems[i] if stems.count(stems[i]) == 1 else f"{i:02d}_{stems[i]}"
        written = []
        if args.overlays:
            for m in methods:
                title = f"{args.model} - {figures.method_title(m)} of class {figures.class_name(label)}"
                fig = figures.overlay_figure(display, maps[m], None, label=args.label, predicted=int(top[0]),
                                             method=m, model=args.model, title=title)
                written.append(str(figures.save(fig, Path(args.overlays) / f"{args.model}_{stem}_{m}.png")))
        records.append({"path": str(path), "label": args.label, "explained": label,
                        "top5": [{"class": int(c), "name": figures.class_name(c), "probability": float(probs[c])}
                                 for c in top],
                        "degenerate": {m: bool(np.asarray(cam.is_degenerate(maps[m][None]))[0]) for m in methods},
                        "figures": written})
        print(f"{path}: " + ", ".join(f"{figures.class_name(c)} {probs[c]:.1%}" for c in top)
              + (f"; figures in {args.overlays}" if written else ""))
    return {"model": args.model, "checkpoint": source, "checkpoint_sha256": digest, "precision": args.precision,
            "images": records}


# ------------------------------------------------------------------------------------------------------------
# Main


def run_config(args, methods, names) -> dict:
    """The configuration recorded in the JSON: the flags, the devices, the versions."""
    import flax
    import jax
    config = {k: v for k, v in vars(args).items()}
    config.update(cams=methods, models=names, jax_version=jax.__version__, flax_version=flax.__version__,
                  jaxlib_version=getattr(__import__("jaxlib"), "__version__", None), backend=jax.default_backend(),
                  device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                  device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
                  precision=args.precision)
    return config


def quiet(enabled: bool = True):
    """Silences stdout and absl/tfds logging below ERROR while preparing the dataset (the tfds builder prints
    "Downloading and preparing dataset ..." itself); a no-op when not enabled."""
    import contextlib
    import io
    import logging
    if not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("absl", "tensorflow_datasets"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(max(level, logging.ERROR))
        stack.callback(logger.setLevel, level)
    return stack


def main_images(args) -> int:
    try:
        methods = resolve_cams(args.cam)
        resolve_models(args)
        record = evaluate_images(args, methods)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        runtime.write_atomic(args.output, json.dumps(json_safe({"config": run_config(args, methods, [args.model]), **record}),
                                             indent=1, allow_nan=False))
    return 0


# ------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list_models:
            import models
            print("\n".join(models.list_models()))
            return 0
        check_outputs(args)   # before any model is built or compiled: a bad path costs seconds, not the results
        if args.image:
            return main_images(args)
        names, methods = resolve_models(args), resolve_cams(args.cam)
        import jax
        runtime.init_distributed(args, force=args.distributed)
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        source = data_source(args)          # first: data problems show before any model is loaded
        results = [evaluate_model(name, args, methods, mesh, source) for name in names]
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        if args.overlays:
            write_twin_figures(args, results, methods)
        for r in results:
            r.pop("_shown", None)
        print_table(results)
        config = run_config(args, methods, names)
        if args.plot:
            from cam import figures
            caveats = [c for c, on in (("random weights", args.random_init),
                                       ("bundled sample: SYNTHETIC human maps", args.sample)) if on]
            figures.save(figures.table_figure(results, title="Alignment with human maps" + (
                "\n(" + "; ".join(caveats) + ")" if caveats else "")), args.plot)
        if args.output:
            runtime.write_atomic(args.output, json.dumps(json_safe({"config": config, "results": results}), indent=1,
                                                 allow_nan=False))
        if args.table:
            runtime.write_atomic(args.table, markdown_table(results))
    bad = non_finite_scores(results)   # every process holds the gathered results: all exit alike
    if bad:   # the files are written (null where a number is missing), but the run did not produce a result
        if jax.process_index() == 0:
            print(f"error: non-finite alignment score (NaN/Inf; null in the JSON) for: {'; '.join(bad)}. "
                  "Non-finite weights or inputs, or no image with a non-constant map; check the checkpoint "
                  "and the data", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
