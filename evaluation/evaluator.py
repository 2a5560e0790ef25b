"""The evaluation of one model against the ClickMe human maps: one object that builds the jitted, sharded step and
accumulates its named results.

    ev = Evaluator(model, methods=("gradcam", "threshold_gradcam"), protocol="study", precision="highest")
    for batch, out in ev.run(data.pipeline.batches(source, ev.entry, batch_size=64)):
        out["gradcam"]["rho"]            # (B,) per image, gathered over every process; padding rows included
    summary = ev.summary(n)              # {"accuracy", "predicted_per_image", "cams": {method: {"score", ...}}}

The step, f(state, image, heatmap, label), computes on the devices, per image: the CAMs of `methods` at their own
resolution (feature maps: the target layer's; saliency: the input's; cam.make_cams_fn, one forward and backward pass
for all feature methods), each put next to the human map by the protocol (evaluation.protocols), every metric of
`metrics` (evaluation.metrics: rho, dice, iou and whatever is registered), whether the pair is evaluated (both maps
finite and non-constant), optionally the faithfulness metrics (cam.faithfulness), and the top-5 predictions (the
forward pass inside the CAM's VJP: XLA merges the two). Data-parallel: one mesh axis "data", the batch sharded over
it, the parameters replicated, no collectives.

Precision ("highest", "default", "bfloat16"; evaluation.PRECISIONS): the step is traced and lowered under
jax.default_matmul_precision("highest") for "highest", the backend default otherwise; "bfloat16" also casts the
floating parameters and the images to bfloat16 (CAMs and metrics stay float32).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import cam
from dcls_jax.options import compiler_options
from evaluation import PRECISIONS, STUDY_METHODS, metrics as metric_registry, protocols

__all__ = ["ACCURACY_MIN_IMAGES", "ACCURACY_WARN_TOP1", "Evaluator", "Explainer", "WithPrecision", "accuracy",
           "accuracy_warning", "cast_for_precision", "check_precision", "faithfulness_summary", "precision_context",
           "resolve_methods", "top_k"]

# Below this top-1 accuracy on >= ACCURACY_MIN_IMAGES images a trained ImageNet checkpoint is suspect (published
# ones reach 76-84 % on ImageNet validation).
ACCURACY_WARN_TOP1, ACCURACY_MIN_IMAGES = 0.5, 20
SKIPPED_REASON = "constant or non-finite map (CAM or human map)"


# ------------------------------------------------------------------------------------------------------------
# Names


def resolve_methods(spec: str | Iterable[str]) -> list[str]:
    """CAM method names (cam.METHOD_NAMES, the cam layer's registry): "all", a comma-separated string or names.
    ValueError for unknown or repeated names, or none."""
    if isinstance(spec, str):
        names = list(cam.METHOD_NAMES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    for n in names:
        if n not in cam.METHOD_NAMES:
            raise ValueError(f"unknown CAM method {n!r}; valid names: {', '.join(cam.METHOD_NAMES)}, all")
    if not names:
        raise ValueError("no CAM method named")
    if len(set(names)) != len(names):
        raise ValueError(f"a CAM method is named twice: {names}")
    return names


# ------------------------------------------------------------------------------------------------------------
# Precision


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return precision


def precision_context(precision: str):
    """The jax.default_matmul_precision context of `precision` (trace and lowering happen inside it)."""
    check_precision(precision)
    return jax.default_matmul_precision("highest" if precision == "highest" else "default")


def cast_for_precision(state, image, precision: str):
    """(state, image) with floating parameters and the image cast to bfloat16 for precision "bfloat16"."""
    if precision != "bfloat16":
        return state, image
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return state, image.astype(jnp.bfloat16)


class WithPrecision:
    """A jitted function called (and lowered) under precision_context(precision)."""

    def __init__(self, fn, precision: str):
        self.fn, self.precision = fn, check_precision(precision)

    def __call__(self, *args):
        with precision_context(self.precision):
            return self.fn(*args)

    def lower(self, *args):
        with precision_context(self.precision):
            return self.fn.lower(*args)


# ------------------------------------------------------------------------------------------------------------
# Predictions and accuracy


def top_k(logits, labels, k: int = 5) -> dict:
    """Per image: the predicted class, whether it is the label (top-1), whether the label is among the k highest
    logits (top-k; ties broken towards the lower class index, as lax.top_k)."""
    _, top = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))
    labels = jnp.asarray(labels)
    return {"predicted": top[:, 0].astype(jnp.int32), "top1": top[:, 0] == labels,
            "top5": (top == labels[:, None]).any(axis=-1)}


def accuracy(predictions: dict, valid) -> dict:
    """{"top1", "top5", "n"} over the valid rows of the gathered predictions."""
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


def faithfulness_summary(values: dict, valid) -> dict:
    """{faithfulness metric: mean over the valid images where it is finite (degenerate maps skipped)} and
    "n_evaluated" (of the first metric), from {metric: (N,)} values."""
    from cam.faithfulness import METRIC_NAMES
    out = {}
    for k in METRIC_NAMES:
        v = np.asarray(values[k])
        ok = valid & np.isfinite(v)
        out[k] = float(v[ok].mean()) if ok.any() else float("nan")
    out["n_evaluated"] = int((valid & np.isfinite(np.asarray(values[METRIC_NAMES[0]]))).sum())
    return out


# ------------------------------------------------------------------------------------------------------------
# The evaluator


class Evaluator:
    """The jitted, sharded evaluation step of `model` and the accumulation of its results (see the module docstring).

    model: an NNX model of the registry (its entry found by name unless `entry` is given: the transform's
    resize_size / input_size, for the "corrected" protocol). methods: CAM method names (cam.METHOD_NAMES, or "all").
    metrics: names of evaluation.metrics (default: every registered one). protocol: "study" or "corrected".
    precision: see the module docstring. mesh: a Mesh with a "data" axis (default: every device). faithfulness:
    None, or the options of cam.faithfulness.make_faithfulness_fn (e.g. {"num_steps": 32}; {} for the defaults).
    """

    def __init__(self, model: nnx.Module, entry=None, *, methods: str | Sequence[str] = STUDY_METHODS,
                 metrics: str | Sequence | None = None, protocol: str = "study", precision: str = "highest",
                 mesh: jax.sharding.Mesh | None = None, faithfulness: dict | None = None):
        if entry is None:
            from models import registry
            name = registry.model_name(model)
            if name is None:
                raise ValueError("the model was not built by the registry: pass its entry (resize_size, input_size)")
            entry = registry.get_entry(name)
        self.entry = entry
        self.methods = tuple(resolve_methods(methods))
        self.metrics = metric_registry.resolve_metrics(metrics)
        self.protocol = protocols.check_protocol(protocol)
        self.precision = check_precision(precision)
        self.faithfulness = None if faithfulness is None else dict(faithfulness)
        if self.faithfulness is not None:
            from cam.faithfulness import METRIC_NAMES
            taken = set(METRIC_NAMES) & {m.name for m in self.metrics}
            if taken:
                raise ValueError(f"metric names {sorted(taken)} collide with cam.faithfulness.METRIC_NAMES")
        self.mesh = mesh if mesh is not None else jax.make_mesh((jax.device_count(),), ("data",))
        self.data_sharding = NamedSharding(self.mesh, P("data"))     # of the images, human maps and labels
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.mesh, P()))
        fn = self._with_predictions(self._step_fn())
        data = P("data")
        self.step = WithPrecision(jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), data, data, data),
                                                        out_specs=data), compiler_options=compiler_options()),
                                  self.precision)
        self._seen: list[dict] = []

    # -- the step ---------------------------------------------------------------------------------------------

    def _step_fn(self):
        """step(state, image, heatmap, label) -> {method: {metric: (B,), "evaluated": (B,) bool, [faithfulness
        metrics]}}; pure and jit-able. As in the study, each CAM is resized once, from its own resolution to
        224 x 224 (evaluation.protocols.align_cam)."""
        methods, metrics, entry, protocol = self.methods, self.metrics, self.entry, self.protocol
        cams_fn = cam.make_cams_fn(self.graphdef, methods, output_size=cam.NATIVE)
        faithful = None
        if self.faithfulness is not None:
            from cam import faithfulness as ff
            faithful = ff.make_faithfulness_fn(self.graphdef, **self.faithfulness)

        def step(state, image, heatmap, label):
            human = protocols.align_heatmap(heatmap, entry, protocol)
            human_ok = _scorable(human)
            maps = cams_fn(state, image, label)
            out = {}
            for method in methods:
                aligned = protocols.align_cam(maps[method])
                out[method] = {m.name: m.fn(aligned, human) for m in metrics}
                out[method]["evaluated"] = human_ok & _scorable(aligned)
                if faithful is not None:
                    out[method].update(faithful(state, image, maps[method], label))
            return out

        return step

    def _with_predictions(self, step):
        """The step under the precision's casts, plus out["predictions"] (top_k of the model's logits)."""
        graphdef, precision = self.graphdef, self.precision

        def fn(state, image, heatmap, label):
            state, image = cast_for_precision(state, image, precision)
            out = dict(step(state, image, heatmap, label))
            model = nnx.merge(graphdef, state)
            model.eval()
            out["predictions"] = top_k(model(image), label)
            return out

        return fn

    def __call__(self, image, heatmap, label, state=None) -> dict:
        """The step, with the evaluator's replicated state unless `state` is given, on global arrays sharded as
        `data_sharding` (host arrays are put there: in a single process only; run() gathers several processes')."""
        batch = [jax.device_put(a, self.data_sharding) for a in (image, heatmap, label)]
        return self.step(self.state if state is None else state, *batch)

    # -- batches and accumulation ------------------------------------------------------------------------------

    def run(self, batches: Iterable[dict]) -> Iterator[tuple[dict, dict]]:
        """For each host batch (this process's rows: "image", "heatmap", "label", "index", "valid", as
        data.pipeline.batches yields them): the step over the mesh, its outputs gathered from every process to host
        numpy. Yields (batch, out): out = {method: {metric: (B,), "evaluated": (B,)}, "predictions": {...},
        "index": (B,), "valid": (B,)} over the global batch (padding rows included, valid False). Every out is
        kept for summary()."""
        from jax.experimental import multihost_utils
        sharded, n_proc = self.data_sharding, jax.process_count()
        for b in batches:
            glob = [jax.make_array_from_process_local_data(sharded, b[k]) for k in ("image", "heatmap", "label")]
            out = self.step(self.state, *glob)
            if n_proc > 1:  # index and valid take the same path as the images, so their rows match the results'
                where = [jax.make_array_from_process_local_data(sharded, b[k]) for k in ("index", "valid")]
                out, index, valid = multihost_utils.process_allgather((out, *where), tiled=True)
            else:
                out, index, valid = jax.device_get(out), b["index"], b["valid"]
            out = jax.tree.map(np.asarray, out)
            out["index"], out["valid"] = np.asarray(index), np.asarray(valid, bool)
            self._seen.append(out)
            yield b, out

    def reset(self) -> None:
        """Forgets the accumulated batches."""
        self._seen = []

    def summary(self, n: int | None = None) -> dict:
        """The accumulated results: {"accuracy": {"top1", "top5", "n"}, "predicted_per_image": {index: class},
        "cams": {method: {<every metric's reduced fields>, "n_evaluated", "n_skipped", "skipped_reason", "top1",
        "top5", ["faithfulness"]}}}. With `n`, checks that the valid rows are images 0 .. n - 1, each once
        (RuntimeError)."""
        if not self._seen:
            raise ValueError("no batch evaluated yet")
        cat = {k: np.concatenate([o[k] for o in self._seen]) for k in ("index", "valid")}
        index, valid = cat["index"], cat["valid"]
        if n is not None and not np.array_equal(np.sort(index[valid]), np.arange(n)):
            raise RuntimeError(f"evaluated images do not match the requested {n} (lost or duplicated records)")
        predictions = {k: np.concatenate([o["predictions"][k] for o in self._seen])
                       for k in ("predicted", "top1", "top5")}
        acc = accuracy(predictions, valid)
        rows = {}
        for method in self.methods:
            values = {k: np.concatenate([o[method][k] for o in self._seen]) for k in self._seen[0][method]}
            evaluated = valid & values["evaluated"]
            images = metric_registry.Images(index, valid, evaluated)
            row = {}
            for m in self.metrics:
                row.update(m.summarize(values[m.name], images))
            skipped = int((valid & ~evaluated).sum())
            row.update(n_evaluated=int(evaluated.sum()), n_skipped=skipped,
                       skipped_reason=SKIPPED_REASON if skipped else "", top1=acc["top1"], top5=acc["top5"])
            if self.faithfulness is not None:
                row["faithfulness"] = faithfulness_summary(values, valid)
            rows[method] = row
        return {"accuracy": acc,
                "predicted_per_image": {int(i): int(p) for i, p in zip(index[valid], predictions["predicted"][valid])},
                "cams": rows}


class Explainer:
    """The softmax probabilities and the CAMs (at the input resolution) of single images, for any photo
    (evaluate.py --image): two jitted functions of the model under `precision`.

        ex = Explainer(model, ["gradcam"]); probs = ex.probabilities(x); maps = ex.cams(x, labels)["gradcam"]
    """

    def __init__(self, model: nnx.Module, methods: str | Sequence[str] = STUDY_METHODS, *,
                 precision: str = "highest"):
        self.methods = tuple(resolve_methods(methods))
        self.precision = check_precision(precision)
        graphdef, self.state = nnx.split(model)
        cams_fn = cam.make_cams_fn(graphdef, self.methods)   # output_size None: the input's H, W

        def probabilities(state, x):
            state, x = cast_for_precision(state, x, precision)
            m = nnx.merge(graphdef, state)
            m.eval()
            return jax.nn.softmax(m(x).astype(jnp.float32), axis=-1)

        options = compiler_options()
        self._probabilities = WithPrecision(jax.jit(probabilities, compiler_options=options), precision)
        self._cams = WithPrecision(jax.jit(lambda state, x, y: cams_fn(*cast_for_precision(state, x, precision), y),
                                           compiler_options=options), precision)

    def probabilities(self, images) -> jax.Array:
        """(B, num_classes) softmax of the logits (float32)."""
        return self._probabilities(self.state, images)

    def cams(self, images, labels) -> dict:
        """{method: (B, H, W)} maps of `labels` ((B,) ints) at the images' resolution."""
        return self._cams(self.state, images, labels)


def _scorable(maps) -> jax.Array:
    """(B,) True where a (B, H, W) map is finite and not constant: exactly the maps cam.metrics.spearman gives a
    finite rho for (constant as it ranks: -0.0 == 0.0)."""
    flat = maps.reshape(maps.shape[0], -1)
    return jnp.isfinite(flat).all(-1) & ~cam.metrics.constant_maps(flat)
