"""Figures a researcher can show: labelled CAM overlays, image x method grids, a model next to its DCLS twin, and a
plot of the study's table (matplotlib Figures rendered by Agg, no pyplot, no display; nothing here reads
ClickMe data).

    from cam import figures
    fig = figures.overlay_figure(image, model_map, human_map, label=281, predicted=285, rho=0.41, method="gradcam")
    figures.save(fig, "cam.png")                                   # exact pixel size: fig.layout.size
    figures.grid_figure(images, {"gradcam": maps, ...}, humans=..., rhos={...})
    figures.twin_figure(images, ("resnet50", maps_a), ("resnet50_dcls", maps_b), humans=..., rhos=...)
    figures.table_figure(results)                                  # evaluate.py's JSON "results" (one or more runs)

    python -m cam.figures table OUT.png RESULT.json [RESULT.json ...]   # the table plot from result JSONs

Every image panel is drawn at one screen pixel per array pixel (nearest neighbour), at integer pixel positions:
`fig.layout.panels` lists, for each panel, its name, the uint8 (H, W, 3) array drawn and its box (top, left,
height, width) in the saved PNG, so that a test (or a user) can read the pixels of a panel back. Overlays are
cam.overlay.overlay: jet colours of the map min-max scaled per map, alpha-blended with the image; the colour bar
gives that relative scale (a map's own units differ between methods: Grad-CAM is raw, Threshold-Grad-CAM in
[0.3, 1]). Constant maps (the metric skips them) are drawn as all-minimum and marked "constant".
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # pyplot-free: PNGs render through Agg, the global backend is left alone
from PIL import Image

from cam import overlay as _overlay

DPI = 100
# The study's eight architectures, each with and without DCLS (registry names; the DCLS twin adds "_dcls").
STUDY_ARCHITECTURES = ("resnet50", "convnext_tiny", "convnext_small", "convnext_base", "caformer_s18",
                       "convformer_s18", "fastvit_sa24", "fastvit_sa36")
METHOD_TITLES = {"gradcam": "Grad-CAM", "threshold_gradcam": "Threshold-Grad-CAM", "gradcam++": "Grad-CAM++",
                 "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "eigencam": "EigenCAM",
                 "saliency": "Saliency"}

_FONT = 9          # points; at DPI 100 a line of text takes ~14 px
_TEXT = 16         # pixels reserved for one line of text


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order (first WordNet lemma of each synset, as timm lists them)."""
    names = (Path(__file__).with_name("imagenet_classes.txt")).read_text().splitlines()
    assert len(names) == 1000, len(names)
    return tuple(names)


def class_name(label) -> str:
    """'tabby (281)'; the bare number outside [0, 1000)."""
    if label is None:
        return "?"
    label = int(label)
    return f"{imagenet_classes()[label]} ({label})" if 0 <= label < 1000 else str(label)


def method_title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


# ----------------------------------------------------------------------------------------------------------------
# Pixel layout


@dataclasses.dataclass
class Panel:
    name: str
    array: np.ndarray                    # (H, W, 3) uint8, as drawn
    box: tuple[int, int, int, int]       # (top, left, height, width) in the PNG, pixels


@dataclasses.dataclass
class Layout:
    size: tuple[int, int]                                 # (width, height) of the PNG in pixels
    panels: list[Panel] = dataclasses.field(default_factory=list)
    values: dict = dataclasses.field(default_factory=dict)  # what a plot shows (table_figure)

    def panel(self, name: str) -> Panel:
        for p in self.panels:
            if p.name == name:
                return p
        raise KeyError(f"no panel {name!r}; panels: {[p.name for p in self.panels]}")


def _figure(width: int, height: int) -> Figure:
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    fig.layout = Layout((width, height))
    return fig


def _axes(fig: Figure, top: int, left: int, height: int, width: int):
    """Axes at a pixel box (top-left origin), no ticks or frame."""
    w, h = fig.layout.size
    ax = fig.add_axes((left / w, 1 - (top + height) / h, width / w, height / h))
    ax.set_axis_off()
    return ax


def _draw(fig: Figure, name: str, array: np.ndarray, top: int, left: int) -> None:
    array = np.asarray(array, np.uint8)
    h, w = array.shape[:2]
    ax = _axes(fig, top, left, h, w)
    ax.imshow(array, interpolation="nearest", aspect="auto", extent=(0, w, h, 0), resample=False)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    fig.layout.panels.append(Panel(name, array, (top, left, h, w)))


def _text(fig: Figure, x: float, y: float, s: str, **kw) -> None:
    """Text at pixel (x, y) from the top-left (anchored at its centre unless ha/va say otherwise)."""
    w, h = fig.layout.size
    kw = {"ha": "center", "va": "center", "fontsize": _FONT, **kw}
    fig.text(x / w, 1 - y / h, s, **kw)


def _colorbar(fig: Figure, top: int, left: int, height: int, width: int = 12) -> None:
    """The jet scale of the overlays, 0 (map minimum) to 1 (map maximum)."""
    ax = _axes(fig, top, left, height, width)
    ax.set_axis_on()
    ramp = np.linspace(1, 0, 256)[:, None]
    ax.imshow(np.round(_overlay.jet(ramp) * 255).astype(np.uint8), aspect="auto", extent=(0, 1, 0, 1),
              interpolation="nearest")
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([0, 0.5, 1])
    ax.set_yticklabels(["min", "", "max"], fontsize=_FONT - 1)
    ax.set_ylabel("map value, min-max per map", fontsize=_FONT - 1, rotation=270, labelpad=12)
    ax.yaxis.set_label_position("right")


def _rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 for display (uint8, floats in [0, 1], or other floats min-max scaled)."""
    return np.round(_overlay._image_rgb(image) * 255).astype(np.uint8)


def _fit(array: np.ndarray, size: int | None) -> np.ndarray:
    """Resize an (H, W, 3) uint8 panel to size x size (bilinear), or keep it (None)."""
    if size is None or array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))


def _constant(m) -> bool:
    m = np.asarray(m, np.float64)
    return not np.isfinite(m).all() or m.max() == m.min()


def _rho_text(rho) -> str:
    if rho is None or (isinstance(rho, float) and not math.isfinite(rho)):
        return "rho: skipped (constant map)"
    return f"rho = {float(rho):.3f}"


def _map_panel(image, m, cell: int | None, alpha: float) -> np.ndarray:
    image = _rgb(image)
    return _fit(_overlay.overlay(image, np.asarray(m, np.float64), alpha=alpha), cell)


def save(fig: Figure, path) -> Path:
    """Writes the figure as a PNG of exactly fig.layout.size pixels; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Figures of maps


def overlay_figure(image, model_map, human_map=None, *, label=None, predicted=None, rho=None, method="gradcam",
                   model: str | None = None, alpha: float = 0.5, title: str | None = None) -> Figure:
    """image | image + model map | image + human map (when given), with the class, the prediction, rho and the
    colour scale. Panels are named "image", "model", "human"; the maps are resized to the image (bilinear)."""
    img = _rgb(image)
    h, w = img.shape[:2]
    gap, left, top = 8, 8, 2 * _TEXT + 6 + _TEXT
    cols = 3 if human_map is not None else 2
    width = left + cols * w + (cols - 1) * gap + 100
    height = top + h + 8
    fig = _figure(width, height)
    what = [f"{model}" if model else None, method_title(method)]
    head = title or " - ".join(s for s in what if s)
    _text(fig, width / 2, _TEXT / 2 + 2, head, fontsize=_FONT + 2, weight="bold")
    line = [f"class: {class_name(label)}" if label is not None else "class: not given",
            f"predicted: {class_name(predicted)}" if predicted is not None else None,
            _rho_text(rho) if human_map is not None else None]
    _text(fig, width / 2, _TEXT * 1.5 + 4, "   ".join(s for s in line if s))
    names = [("image", "image", img), ("model", f"{method_title(method)}" + (" (constant)" if _constant(model_map)
                                                                           else ""),
                                      _overlay.overlay(img, np.asarray(model_map, np.float64), alpha=alpha))]
    if human_map is not None:
        names.append(("human", "human map" + (" (constant)" if _constant(human_map) else ""),
                      _overlay.overlay(img, np.asarray(human_map, np.float64), alpha=alpha)))
    for i, (name, caption, array) in enumerate(names):
        x = left + i * (w + gap)
        _text(fig, x + w / 2, top - _TEXT / 2, caption)
        _draw(fig, name, array, top, x)
    _colorbar(fig, top, left + cols * w + (cols - 1) * gap + 10, h)
    return fig


def grid_figure(images, maps: Mapping[str, Sequence], *, humans=None, labels=None, predicted=None, rhos=None,
                cell: int | None = 160, alpha: float = 0.5, title: str | None = None) -> Figure:
    """N images (rows) x [image, each method, human map] (columns); `maps` {method: (N, H, W)}, `rhos`
    {method: (N,)}. Panels are named "image/i", "<method>/i", "human/i"; each cell is `cell` pixels square
    (None: the image size)."""
    images = [_rgb(x) for x in images]
    n, methods = len(images), list(maps)
    for m in methods:
        if len(maps[m]) != n:
            raise ValueError(f"maps[{m!r}] holds {len(maps[m])} maps for {n} images")
    if humans is not None and len(humans) != n:
        raise ValueError(f"{len(humans)} human maps for {n} images")
    c = cell or images[0].shape[0]
    cols = 1 + len(methods) + (humans is not None)
    gap, left, top, row_h = 6, 8, (_TEXT + 8 if title else 4) + _TEXT, c + _TEXT + 4
    width = left + cols * c + (cols - 1) * gap + 90
    height = top + n * row_h + 4
    fig = _figure(width, height)
    if title:
        _text(fig, width / 2, _TEXT / 2 + 2, title, fontsize=_FONT + 2, weight="bold")
    heads = ["image", *map(method_title, methods)] + (["human map"] if humans is not None else [])
    for j, head in enumerate(heads):
        _text(fig, left + j * (c + gap) + c / 2, top - _TEXT / 2, head)
    for i, img in enumerate(images):
        y = top + i * row_h + _TEXT
        cap = class_name(labels[i]) if labels is not None else ""
        if predicted is not None:
            cap += f" -> {class_name(predicted[i])}"
        _text(fig, left + c / 2, y - _TEXT / 2 + 1, cap, fontsize=_FONT - 1)
        _draw(fig, f"image/{i}", _fit(img, c), y, left)
        for j, m in enumerate(methods, 1):
            x = left + j * (c + gap)
            if rhos is not None and m in rhos:
                _text(fig, x + c / 2, y - _TEXT / 2 + 1, _rho_text(_nan(rhos[m][i])), fontsize=_FONT - 1)
            _draw(fig, f"{m}/{i}", _map_panel(img, maps[m][i], c, alpha), y, x)
        if humans is not None:
            _draw(fig, f"human/{i}", _map_panel(img, humans[i], c, alpha), y, left + (cols - 1) * (c + gap))
    _colorbar(fig, top + _TEXT, left + cols * c + (cols - 1) * gap + 10, min(c, height - top - _TEXT - 8))
    return fig


def twin_figure(images, a: tuple[str, Sequence], b: tuple[str, Sequence], *, humans=None, labels=None,
                rhos: tuple[Sequence, Sequence] | None = None, method: str = "gradcam", cell: int | None = 160,
                alpha: float = 0.5) -> Figure:
    """A model and its DCLS twin on the same images: rows [image, model a, model b, human map]. `a`, `b`:
    (name, (N, H, W) maps); `rhos`: (rhos of a, rhos of b). Panels "image/i", "a/i", "b/i", "human/i"."""
    (name_a, maps_a), (name_b, maps_b) = a, b
    fig = grid_figure(images, {"a": maps_a, "b": maps_b}, humans=humans, labels=labels,
                      rhos=None if rhos is None else {"a": rhos[0], "b": rhos[1]}, cell=cell, alpha=alpha,
                      title=f"{method_title(method)}: {name_a} vs {name_b}")
    # column heads: the model names instead of the keys a, b
    for t in fig.texts:
        if t.get_text() in ("a", "b"):
            t.set_text(name_a if t.get_text() == "a" else name_b)
    return fig


def _nan(x):
    return float("nan") if x is None else float(x)


# ----------------------------------------------------------------------------------------------------------------
# The study's table


def architecture(model: str) -> tuple[str, bool]:
    """'resnet50_dcls' -> ('resnet50', True)."""
    return (model[:-5], True) if model.endswith("_dcls") else (model, False)


def collect(results: Sequence[Mapping]) -> dict[tuple[str, bool, str], dict]:
    """{(architecture, dcls, method): {"score", "n", "model"}} from evaluate.py result rows (the JSON's
    "results", of one or several runs). The same model and method twice is an error."""
    out = {}
    for r in results:
        arch, dcls = architecture(r["model"])
        for m, c in r["cams"].items():
            key = (arch, dcls, m)
            if key in out:
                raise ValueError(f"{r['model']} / {m} appears in more than one result")
            out[key] = {"score": c["score"], "n": int(c["n_evaluated"]), "model": r["model"]}
    return out


def table_figure(results: Sequence[Mapping], *, title: str | None = None, size: tuple[int, int] | None = None
                 ) -> Figure:
    """Alignment score per architecture, baseline and DCLS side by side, one panel per CAM method, the number of
    images evaluated on each bar. Architectures: the study's eight in its order, then any others. `fig.layout.values`
    holds {(architecture, dcls, method): score} as plotted (missing ones are absent and marked "n/a")."""
    data = collect(results)
    if not data:
        raise ValueError("no results to plot")
    archs = sorted({k[0] for k in data}, key=lambda a: (STUDY_ARCHITECTURES.index(a) if a in STUDY_ARCHITECTURES
                                                         else len(STUDY_ARCHITECTURES), a))
    methods = list(dict.fromkeys(k[2] for k in data))
    lines = len(title.splitlines()) if title else 0
    width, height = size or (max(560, 100 * len(archs) + 120), 100 + 15 * lines + 230 * len(methods))
    fig = _figure(width, height)
    axes = fig.subplots(len(methods), 1, squeeze=False)[:, 0]
    x = np.arange(len(archs))
    colours = {False: "#9e9e9e", True: "#1f77b4"}
    for ax, m in zip(axes, methods):
        labelled = set()
        for dcls, dx in ((False, -0.2), (True, 0.2)):
            for i, a in enumerate(archs):
                d = data.get((a, dcls, m))
                if d is None or not math.isfinite(d["score"]):
                    ax.text(i + dx, 0, "n/a", ha="center", va="bottom", fontsize=_FONT - 2, rotation=90)
                    continue
                variant = "DCLS" if dcls else "baseline"
                ax.bar(i + dx, d["score"], 0.4, color=colours[dcls], label=None if variant in labelled else variant,
                       gid=f"{a}|{int(dcls)}|{m}")
                labelled.add(variant)
                ax.text(i + dx, d["score"], f"{d['n']}", ha="center", va="bottom" if d["score"] >= 0 else "top",
                        fontsize=_FONT - 2)
                fig.layout.values[(a, dcls, m)] = d["score"]
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlim(-0.6, len(archs) - 0.4)
        shown = [v for (a, _, mm), v in fig.layout.values.items() if mm == m]
        lo, hi = min([0.0, *shown]), max([0.0, *shown])
        pad = 0.35 * (hi - lo or 1.0)
        ax.set_ylim(lo - (pad if lo < 0 else 0), hi + pad)
        ax.set_xticks(x, archs, fontsize=_FONT - 1, rotation=15 if len(archs) > 4 else 0)
        ax.set_ylabel("alignment score", fontsize=_FONT)
        ax.set_title(f"{method_title(m)} (numbers: images evaluated)", fontsize=_FONT + 1)
        ax.tick_params(axis="y", labelsize=_FONT - 1)
        ax.legend(fontsize=_FONT - 1, loc="upper left", ncols=2, frameon=False)
    if title:
        _text(fig, width / 2, 6, title, fontsize=_FONT + 1, va="top")
    fig.subplots_adjust(left=70 / width, right=1 - 20 / width, top=1 - (40 + 15 * lines) / height,
                        bottom=(55 if len(archs) > 4 else 40) / height, hspace=0.5)
    return fig


def load_results(paths) -> list[dict]:
    """The "results" rows of one or more evaluate.py JSON files."""
    rows = []
    for p in paths:
        try:
            rows += json.loads(Path(p).read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not an evaluate.py result JSON ({e})") from e
    return rows


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m cam.figures", description="Plot evaluate.py results.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="the study's table (alignment score per architecture, with/without DCLS)")
    t.add_argument("out", help="PNG to write")
    t.add_argument("results", nargs="+", help="evaluate.py --output JSON file(s)")
    t.add_argument("--title")
    args = p.parse_args(argv)
    try:
        save(table_figure(load_results(args.results), title=args.title), args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
