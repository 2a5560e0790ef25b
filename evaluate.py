"""Score a model's CAMs against ClickMe human attention maps (the DCLS Grad-CAM study), on every device.

    python evaluate.py --model resnet50_dcls                       # published checkpoint, ClickMe validation
    python evaluate.py --model convnext_tiny_dcls --cam all --limit 2048 --output out.json
    python evaluate.py --models all --table results.md             # the study's table, 16 models x 2 CAMs
    python evaluate.py --model resnet50 --sample --random-init     # offline smoke run on the bundled sample
    python evaluate.py --model resnet50_dcls --faithfulness        # also deletion / insertion, drop, ROAD

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

DEFAULT_CAMS = ("gradcam", "threshold_gradcam")


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
                   help="call jax.distributed.initialize() (multi-host; configuration from the flags below, else "
                        "from the environment: JAX_COORDINATOR_ADDRESS or a supported cluster)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (implies --distributed, as do the next two)")
    p.add_argument("--num-processes", type=int, help="number of processes")
    p.add_argument("--process-id", type=int, help="this process's index in [0, --num-processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if args.faithfulness_steps < 1:
        p.error("--faithfulness-steps must be >= 1")
    if args.random_init and args.checkpoint:
        p.error("--random-init and --checkpoint exclude each other")
    if args.table and not args.models:
        p.error("--table needs --models")
    if args.clickme_dir and args.clickme_url:
        p.error("--clickme-dir and --clickme-url exclude each other")
    args.distributed = args.distributed or any(v is not None for v in (args.coordinator, args.num_processes,
                                                                        args.process_id))
    return args


def resolve_models(args) -> list[str]:
    import models
    names = models.list_models() if args.models == "all" else [n.strip() for n in (args.model or args.models).split(",")]
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
    """Random weights, a given checkpoint (file, orbax directory or URL), or the published checkpoint,
    converted once into an orbax directory under the cache and restored from there afterwards."""
    from flax import nnx

    import models
    from models import convert
    if args.random_init:
        return models.create_model(name, rngs=nnx.Rngs(args.seed)), "random-init"
    from data.download import cached_download
    if args.checkpoint:
        path = args.checkpoint
        if path.startswith(("http://", "https://")):
            path = cached_download(path, cache_dir(args))
        return convert.load(name, path), args.checkpoint
    ckpt = models.get_entry(name).checkpoint
    if ckpt is None:
        raise UsageError(f"{name} has no published checkpoint: pass --checkpoint or --random-init")
    converted = cache_dir(args) / "converted" / name
    if not converted.is_dir():
        path = cached_download(ckpt.url, cache_dir(args), filename=ckpt.filename)
        convert.save(convert.load(name, path, key=ckpt.key), converted, name)
    return convert.restore(name, converted), ckpt.url


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
    if args.no_progress:
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
    model, source_name = load_model(name, args)
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
    fn = make_step(graphdef, methods, entry, args.protocol, feature_size(model, entry),
                   dict(num_steps=args.faithfulness_steps) if getattr(args, "faithfulness", False) else None)
    step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P("data")))

    n = len(source) if args.limit is None else min(args.limit, len(source))
    if n == 0:
        raise UsageError(f"the {args.split} split holds no records")
    steps = pipeline.num_batches(n, local_batch, n_proc)
    results = {m: {k: [] for k in ("rho", "dice", "iou") + faithfulness_names(args)} for m in methods}
    seen_index, seen_valid = [], []
    overlays_left = args.num_overlays if args.overlays and jax.process_index() == 0 else 0
    progress = Progress(steps, n, enabled=not args.no_progress and jax.process_index() == 0)
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
        seen_index.append(np.asarray(index))
        seen_valid.append(np.asarray(valid))
        if overlays_left:
            overlays_left = write_overlays(args, model, methods, entry, b, overlays_left)
        progress.update(int(np.asarray(valid).sum()))
    progress.close()
    elapsed = time.perf_counter() - start

    index, valid = np.concatenate(seen_index), np.concatenate(seen_valid)
    got = np.sort(index[valid])
    if not np.array_equal(got, np.arange(n)):
        raise RuntimeError(f"evaluated images do not match the requested {n} (lost or duplicated records)")
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
        if faithfulness_names(args):
            rows[m]["faithfulness"] = faithfulness_summary(results[m], valid)
    return {"model": name, "checkpoint": source_name, "images": n, "seconds": elapsed,
            "images_per_second": n / elapsed, "devices": n_dev, "processes": n_proc, "batch_size": batch,
            "cams": rows}


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


def write_overlays(args, model, methods, entry, batch, left: int) -> int:
    """PNGs of image | CAM | human map for the first images (process 0)."""
    import numpy as np

    import cam
    from cam import overlay
    from data.preprocess import SIZE
    out = Path(args.overlays)
    out.mkdir(parents=True, exist_ok=True)
    k = min(left, int(batch["valid"].sum()))
    images = batch["image"][:k]
    shown = images * np.asarray(entry.std) + np.asarray(entry.mean)   # back to [0, 1] for display
    for m in methods:
        maps = np.asarray(cam.compute(model, images, batch["label"][:k], m, output_size=(SIZE, SIZE)))
        for i in range(k):
            overlay.save_overlay(out / f"{int(batch['index'][i]):06d}_{m}.png", shown[i], maps[i],
                                 batch["heatmap"][i])
    return left - k


class Progress:
    """A one-line progress bar with images/s, on stderr."""

    def __init__(self, steps: int, images: int, enabled: bool = True):
        self.steps, self.images, self.enabled = steps, images, enabled and steps > 0
        self.done, self.step, self.start = 0, 0, time.perf_counter()

    def update(self, images: int):
        self.done, self.step = self.done + images, self.step + 1
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            width = 30
            bar = "#" * (width * self.step // self.steps)
            print(f"\r[{bar:<{width}}] {self.done}/{self.images} images  {rate:7.1f} img/s", end="",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# Reporting


COLUMNS = ("model", "CAM", "alignment score", "mean rho", "images evaluated", "images skipped", "img/s")


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
            rows.append((r["model"], m, f"{c['score']:.4f}", f"{c['mean_rho']:.4f}", str(c["n_evaluated"]),
                         f"{c['n_skipped']}" + (f" ({c['skipped_reason']})" if c["n_skipped"] else ""),
                         f"{r['images_per_second']:.1f}")
                        + tuple(f"{c['faithfulness'][k]:.4f}" for k in FAITHFULNESS_COLUMNS if "faithfulness" in c))
    return rows


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


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list_models:
            import models
            print("\n".join(models.list_models()))
            return 0
        names, methods = resolve_models(args), resolve_cams(args.cam)
        if args.output:  # fail before any compute if the output cannot be written
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        import jax
        if args.distributed:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        source = data_source(args)          # first: data problems show before any model is loaded
        results = [evaluate_model(name, args, methods, mesh, source) for name in names]
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print_table(results)
        config = {k: v for k, v in vars(args).items()}
        config.update(cams=methods, models=names, jax_version=jax.__version__,
                      device=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
        if args.output:
            write_atomic(args.output, json.dumps({"config": config, "results": results}, indent=1, allow_nan=True))
        if args.table:
            write_atomic(args.table, markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
