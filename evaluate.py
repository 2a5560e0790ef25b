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

This file is the command line and its orchestration (data, figures, tables, JSON). The evaluation itself is the
library's: evaluation.evaluator.Evaluator (the jitted, sharded step and its results), evaluation.metrics (the metric
registry: a metric registered there is computed, written to the JSON and, with columns, to the table),
evaluation.protocols, evaluation.checkpoints (published checkpoints: download, verify, convert once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from evaluation import PRECISIONS, PROTOCOLS, SAMPLE_DIR, STUDY_METHODS, runtime


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
    p.add_argument("--cam", default=",".join(STUDY_METHODS),
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
    p.add_argument("--protocol", default="study", choices=PROTOCOLS,
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
            if any(not isinstance(c[k], (int, float)) or not math.isfinite(c[k])
                   for k in ("score", "mean_rho") if k in c):
                bad.append(f"{r['model']} / {m} ({c.get('n_evaluated')} images evaluated, {c.get('n_skipped')} "
                           "skipped)")
    return bad


def resolve_models(args) -> list[str]:
    import models
    names = models.list_models(study_only=True) if args.models == "all" else [n.strip() for n in (args.model or args.models).split(",")]
    for n in names:
        models.get_entry(n)  # raises ValueError listing the valid names
    return names


# ------------------------------------------------------------------------------------------------------------
# Model


def cache_dir(args) -> Path:
    from evaluation.checkpoints import cache_root
    return cache_root(args.cache_dir)


def load_model(name: str, args):
    """(model, source, sha256) of the flags: evaluation.checkpoints.load_model (random weights, --checkpoint, or the
    published checkpoint converted once into the cache, its pinned SHA-256 checked)."""
    from evaluation import checkpoints
    return checkpoints.load_model(name, args.checkpoint, random_init=args.random_init, seed=args.seed,
                                  cache_dir=cache_dir(args))


# ------------------------------------------------------------------------------------------------------------
# Data


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
# One model: the library's Evaluator over the data, with progress and overlays


def evaluate_model(name: str, args, methods: list[str], mesh, source) -> dict:
    """One model over the data source: evaluation.evaluator.Evaluator's step on every batch of data.pipeline, the
    progress bar, the overlays; the result row of the JSON."""
    import jax

    import models
    from data import pipeline
    from evaluation.evaluator import Evaluator, accuracy_warning

    entry = models.get_entry(name)
    model, source_name, checkpoint_sha = load_model(name, args)
    model.eval()
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    batch = args.batch_size or 32 * n_dev
    if batch % n_dev:
        raise UsageError(f"--batch-size {batch} is not a multiple of the {n_dev} devices")
    faith = dict(num_steps=args.faithfulness_steps) if getattr(args, "faithfulness", False) else None
    evaluator = Evaluator(model, entry, methods=methods, protocol=args.protocol, precision=args.precision, mesh=mesh,
                          faithfulness=faith)

    n = len(source) if args.limit is None else min(args.limit, len(source))
    if n == 0:
        raise UsageError(f"the {args.split} split holds no records")
    overlays_left = args.num_overlays if args.overlays and jax.process_index() == 0 else 0
    shown = []
    progress = runtime.Progress(n, enabled=not args.no_progress and jax.process_index() == 0, desc=name)
    start = time.perf_counter()
    batches = pipeline.batches(source, entry, batch_size=batch // n_proc, limit=n, process_index=jax.process_index(),
                               process_count=n_proc, workers=args.workers)
    for b, out in evaluator.run(batches):
        if overlays_left:
            overlays_left = collect_overlays(args, model, methods, entry, b, out, out["index"], overlays_left, shown)
        progress.update(int(out["valid"].sum()))
    progress.close()
    elapsed = time.perf_counter() - start

    summary = evaluator.summary(n)
    acc = summary["accuracy"]
    warning = accuracy_warning(name, acc, source_name)
    if warning and jax.process_index() == 0:
        print(f"warning: {warning}", file=sys.stderr)
    if shown:
        write_overlay_figures(args, name, methods, shown)
    return {"model": name, "checkpoint": source_name, "checkpoint_sha256": checkpoint_sha, "images": n,
            "seconds": elapsed, "images_per_second": n / elapsed, "devices": n_dev, "processes": n_proc,
            "batch_size": batch, "precision": args.precision,
            "accuracy": acc, "warnings": [warning] if warning else [],
            "predicted_per_image": summary["predicted_per_image"], "cams": summary["cams"], "_shown": shown}


def collect_overlays(args, model, methods, entry, batch, out, index, left: int, shown: list) -> int:
    """Keeps, for the first `left` images of the batch (process 0), what the figures show: the model input back in
    [0, 1], the human map as the metric compares it (evaluation.protocols.align_heatmap), each method's map at
    224 x 224, its rho, the label and the prediction. Returns how many are still wanted."""
    import numpy as np

    import cam
    from data.preprocess import SIZE
    from evaluation import protocols
    from evaluation.evaluator import precision_context
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
                      "label": int(batch["label"][i]), "predicted": int(out["predictions"]["predicted"][r]),
                      "maps": {m: maps[m][i] for m in methods},
                      "rho": {m: float(out[m]["rho"][r]) if "rho" in out[m] else None for m in methods}})
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


COLUMNS = ("model", "CAM", "top-1", "top-5", "images evaluated", "images skipped", "img/s")
FAITHFULNESS_COLUMNS = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC",
                        "average_drop": "avg drop", "increase_in_confidence": "increase", "road_combined": "ROAD"}


def metric_columns(results: list[dict]) -> dict[str, str]:
    """{field: header} of the registered metrics' table columns (evaluation.metrics) that the results hold."""
    from evaluation.metrics import METRICS
    fields = {k for r in results for c in r["cams"].values() for k in c}
    return {k: v for m in METRICS.values() for k, v in m.columns.items() if k in fields}


def columns(results: list[dict]) -> tuple[str, ...]:
    """model, CAM, the metrics' columns (alignment score, mean rho, ...), the accuracy and counts, and the
    faithfulness columns when the results have them (--faithfulness)."""
    has = any("faithfulness" in c for r in results for c in r["cams"].values())
    return (COLUMNS[:2] + tuple(metric_columns(results).values()) + COLUMNS[2:]
            + (tuple(FAITHFULNESS_COLUMNS.values()) if has else ()))


def table_rows(results: list[dict]) -> list[tuple]:
    fields = metric_columns(results)
    rows = []
    for r in results:
        for m, c in r["cams"].items():
            acc = r.get("accuracy") or {}
            rows.append((r["model"], m) + tuple(_number(c.get(k)) for k in fields)
                        + (_percent(acc.get("top1")), _percent(acc.get("top5")), str(c["n_evaluated"]),
                           f"{c['n_skipped']}" + (f" ({c['skipped_reason']})" if c["n_skipped"] else ""),
                           f"{r['images_per_second']:.1f}")
                        + tuple(f"{c['faithfulness'][k]:.4f}" for k in FAITHFULNESS_COLUMNS if "faithfulness" in c))
    return rows


def _number(x) -> str:
    return "-" if x is None else f"{x:.4f}"


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
    import numpy as np

    import cam
    import models
    from data.preprocess import model_input
    from evaluation.evaluator import Explainer
    entry = models.get_entry(args.model)
    if args.label is not None and not 0 <= args.label < entry.num_classes:
        raise UsageError(f"--label {args.label} is outside [0, {entry.num_classes})")
    pictures = [read_image(p) for p in args.image]          # every file is readable before the model loads
    model, source, digest = load_model(args.model, args)
    model.eval()
    explainer = Explainer(model, methods, precision=args.precision)
    from cam import figures
    stems = [Path(p).stem for p in args.image]
    records = []
    for i, (path, rgb) in enumerate(zip(args.image, pictures)):
        x = model_input(rgb, entry)[None]
        probs = np.asarray(explainer.probabilities(x))[0]
        top = np.argsort(-probs, kind="stable")[:5]
        label = int(top[0]) if args.label is None else args.label
        maps = {m: np.asarray(v)[0] for m, v in explainer.cams(x, np.array([label], np.int32)).items()}
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
    from evaluation.evaluator import resolve_methods
    try:
        methods = resolve_methods(args.cam)
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
        from evaluation.evaluator import resolve_methods
        names, methods = resolve_models(args), resolve_methods(args.cam)
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
    runtime.keep_freed_memory()   # before JAX allocates: see its docstring
    sys.exit(main())
