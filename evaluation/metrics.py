"""The registry of alignment metrics: how an aligned CAM is scored against the human map, and how the per-image
values become the reported figures.

    from evaluation import metrics
    metrics.register_metric("mae", lambda cam, human: jnp.abs(cam - human).mean((1, 2)), columns={"mae": "MAE"})
    metrics.METRICS["rho"].fn(cam, human)          # (B,) per-image Spearman rho (cam.metrics.spearman)

An entry is one `Metric`: `fn(cam, human) -> (B,)`, jit-able, on the maps as the protocol aligns them
(evaluation.protocols: both (B, 224, 224) float32), run on the devices inside the evaluation step; `reduce(values,
images) -> {field: value}` (or one number, stored under the metric's name) on the host over every evaluated row, the
fields going into the JSON row of each CAM method; `columns` ({field: header}) the fields evaluate.py's table shows.
Registering is all it takes: evaluation.evaluator.Evaluator computes every registered metric by default, and
evaluate.py writes them to its JSON and, with columns, to its table.

The registered metrics (those of the study and of Harmonization, cam/metrics.py):
  rho   Spearman rho; reduced to the study's alignment score, mean rho / 0.65753 ("score"), "mean_rho" and
        "rho_per_image" (None where skipped)
  dice  Harmonization's Dice of the maps binarised at their 90th percentile; the mean over the evaluated images
  iou   Harmonization's IoU of the same binarised maps; the mean over the evaluated images
The evaluated images are the valid (non-padding) rows whose two maps are finite and not constant (the maps Spearman
is defined for, the study's `np.std == 0` skip); the others are counted as skipped.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from cam import metrics as cam_metrics

__all__ = ["METRICS", "RESERVED", "Images", "Metric", "alignment", "get_metric", "mean", "register_metric",
           "resolve_metrics", "unregister_metric"]

# Names a metric cannot take: the step's other per-method outputs and the JSON fields the evaluator writes itself.
RESERVED = frozenset({"evaluated", "n_evaluated", "n_skipped", "skipped_reason", "top1", "top5", "faithfulness"})


@dataclasses.dataclass(frozen=True)
class Images:
    """The rows of an evaluation gathered on the host, padding included, in step order: `index` (N,) the dataset
    indices, `valid` (N,) not padding, `evaluated` (N,) valid with both maps finite and non-constant."""
    index: np.ndarray
    valid: np.ndarray
    evaluated: np.ndarray


def mean(values, images: Images) -> float:
    """The default reducer: the mean over the evaluated images (NaN when none)."""
    values = np.asarray(values)
    return float(values[images.evaluated].mean()) if images.evaluated.any() else float("nan")


def alignment(rhos, images: Images) -> dict:
    """rho's reducer: the study's alignment score (cam.metrics.alignment_score: mean rho / 0.65753 over the valid
    images with a finite rho), the mean rho, and every valid image's rho (None where skipped)."""
    rhos = np.asarray(rhos)
    score = cam_metrics.alignment_score(rhos, images.valid)
    return {"score": score["score"], "mean_rho": score["mean_rho"],
            "rho_per_image": {int(i): (float(r) if np.isfinite(r) else None)
                              for i, r in zip(images.index[images.valid], rhos[images.valid])}}


@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered metric: its name, the per-image function on the aligned (CAM, human) maps, its reducer and the
    table columns it fills."""
    name: str
    fn: Callable
    reduce: Callable = mean
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def summarize(self, values, images: Images) -> dict:
        """{field: value} of the reducer (a plain number goes under the metric's name)."""
        out = self.reduce(np.asarray(values), images)
        return dict(out) if isinstance(out, Mapping) else {self.name: out}


METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable, reduce: Callable = mean, *, columns: Mapping[str, str] | None = None,
                    overwrite: bool = False) -> Metric:
    """Adds a metric (see the module docstring); ValueError for a name already taken (unless overwrite) or
    reserved. Returns the entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a metric name must be an identifier, got {name!r}")
    if name in RESERVED:
        raise ValueError(f"{name!r} is reserved (the evaluator writes it): choose another metric name")
    if name in METRICS and not overwrite:
        raise ValueError(f"metric {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(fn) or not callable(reduce):
        raise ValueError(f"metric {name!r}: fn and reduce must be callables")
    METRICS[name] = metric = Metric(name, fn, reduce, dict(columns or {}))
    return metric


def unregister_metric(name: str) -> Metric:
    """Removes a metric (KeyError if absent); returns it."""
    return METRICS.pop(name)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}") from None


def resolve_metrics(spec: str | Iterable[str | Metric] | None = None) -> tuple[Metric, ...]:
    """The metrics named by `spec`: None or "all" (every registered one, in registration order), a comma-separated
    string, or names / Metric entries. ValueError for unknown or repeated names, or none."""
    if spec is None or spec == "all":
        out = tuple(METRICS.values())
    else:
        items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
        out = tuple(m if isinstance(m, Metric) else get_metric(m) for m in items)
    names = [m.name for m in out]
    if not out:
        raise ValueError("no metric to compute")
    if len(set(names)) != len(names):
        raise ValueError(f"a metric is named twice: {names}")
    return out


register_metric("rho", cam_metrics.spearman, alignment, columns={"score": "alignment score", "mean_rho": "mean rho"})
register_metric("dice", cam_metrics.dice)
register_metric("iou", cam_metrics.iou)
