"""cam/figures.py: each figure is written as a PNG of the expected pixel size, and the pixels of each panel read back
from the PNG equal the array the figure says it drew, which in turn equals an independent overlay computed here with
matplotlib's own jet colormap. The table plot's bars hold the scores of the result rows."""
from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from PIL import Image

from cam import figures


# matplotlib's jet is a 256-entry table (x -> bin floor(256 x)): up to one bin off the exact piecewise-linear jet of
# cam.overlay, i.e. alpha * 255 * (max slope 0.5 / 0.11) / 256 = 2.27 grey levels, plus 0.5 for the uint8 rounding.
JET_TOL = 2.8


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def expected_overlay(image_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Independent reference: matplotlib's jet of the min-max scaled map, alpha-blended with the image (float)."""
    h = np.asarray(heat, np.float64)
    lo, hi = h.min(), h.max()
    unit = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    return 255 * (alpha * matplotlib.colormaps["jet"](unit)[..., :3] + (1 - alpha) * image_u8 / 255)


def check_panels(fig, path):
    """Every panel's box in the PNG holds exactly the panel's array."""
    img = read_png(path)
    assert (img.shape[1], img.shape[0]) == fig.layout.size
    for p in fig.layout.panels:
        t, l, h, w = p.box
        assert p.array.shape == (h, w, 3)
        np.testing.assert_array_equal(img[t:t + h, l:l + w], p.array, err_msg=p.name)
    return img


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224] / 224
    image = np.stack([255 * xx, 255 * yy, 128 + 0 * xx], -1).astype(np.uint8)
    model_map = rng.random((7, 7))                      # feature resolution: bilinearly resized for display
    human = np.exp(-((xx - 0.3) ** 2 + (yy - 0.6) ** 2) / 0.02)
    return image, model_map, human


def test_overlay_figure(data, tmp_path):
    image, model_map, human = data
    fig = figures.overlay_figure(image, model_map, human, label=281, predicted=285, rho=0.4123, method="gradcam",
                                 model="resnet50")
    path = figures.save(fig, tmp_path / "sub" / "o.png")
    img = check_panels(fig, path)
    assert fig.layout.size == (8 + 3 * 224 + 2 * 8 + 100, 3 * 16 + 6 + 224 + 8)
    assert [p.name for p in fig.layout.panels] == ["image", "model", "human"]
    np.testing.assert_array_equal(fig.layout.panel("image").array, image)
    np.testing.assert_allclose(fig.layout.panel("human").array, expected_overlay(image, human), atol=JET_TOL)
    # the 7 x 7 map is bilinearly upsampled (PIL) before colouring
    up = np.asarray(Image.fromarray(model_map.astype(np.float32), "F").resize((224, 224), Image.BILINEAR))
    np.testing.assert_allclose(fig.layout.panel("model").array, expected_overlay(image, up), atol=JET_TOL)
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "tabby (281)" in texts and "Egyptian cat (285)" in texts and "rho = 0.412" in texts
    assert "Grad-CAM" in texts and "resnet50" in texts
    # a colour bar right of the panels: jet from blue (bottom) to dark red (top)
    t, l, h, w = fig.layout.panel("human").box
    bar = img[t + 5:t + h - 5, l + w + 12:l + w + 20].astype(int)
    assert bar[-1].mean(0)[2] > 100 and bar[-1].mean(0)[0] < 60     # bottom: blue
    assert bar[0].mean(0)[0] > 100 and bar[0].mean(0)[2] < 60       # top: red


def test_overlay_figure_without_human_map_and_constant_map(data, tmp_path):
    image, _, _ = data
    fig = figures.overlay_figure(image / 255.0, np.zeros((7, 7)), None, label=None, predicted=3, method="eigencam")
    check_panels(fig, figures.save(fig, tmp_path / "o.png"))
    assert fig.layout.size == (8 + 2 * 224 + 8 + 100, 3 * 16 + 6 + 224 + 8)
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "(constant)" in texts and "class: not given" in texts and "tiger shark (3)" in texts
    np.testing.assert_allclose(fig.layout.panel("model").array, expected_overlay(image, np.zeros((224, 224))),
                               atol=1.0)


def test_grid_figure(data, tmp_path):
    image, model_map, human = data
    images = [image, image[::-1].copy(), image[:, ::-1].copy()]
    maps = {"gradcam": [model_map, model_map.T, np.zeros((7, 7))], "threshold_gradcam": [human, human.T, human]}
    fig = figures.grid_figure(images, maps, humans=[human] * 3, labels=[1, 2, 3], predicted=[1, 5, 9],
                              rhos={"gradcam": [0.25, -0.125, None], "threshold_gradcam": [0.5, 0.75, 1.0]},
                              cell=112, title="grid")
    check_panels(fig, figures.save(fig, tmp_path / "g.png"))
    assert fig.layout.size == (8 + 4 * 112 + 3 * 6 + 90, 16 + 8 + 16 + 3 * (112 + 16 + 4) + 4)
    assert len(fig.layout.panels) == 12
    small = [np.asarray(Image.fromarray(x).resize((112, 112), Image.BILINEAR)) for x in images]
    for i in range(3):
        np.testing.assert_array_equal(fig.layout.panel(f"image/{i}").array, small[i])
    # overlays are computed at the image's size, then the cell is resized like the image
    want = np.asarray(Image.fromarray(np.round(expected_overlay(images[1], human.T)).astype(np.uint8))
                      .resize((112, 112), Image.BILINEAR)).astype(float)
    np.testing.assert_allclose(fig.layout.panel("threshold_gradcam/1").array, want, atol=3.5)
    texts = [t.get_text() for t in fig.texts]
    assert "rho = -0.125" in texts and "rho: skipped (constant map)" in texts and "Threshold-Grad-CAM" in texts
    with pytest.raises(ValueError, match="holds 1 maps for 3 images"):
        figures.grid_figure(images, {"gradcam": [model_map]})


def test_twin_figure(data, tmp_path):
    image, model_map, human = data
    fig = figures.twin_figure([image, image], ("resnet50", [model_map, model_map]),
                              ("resnet50_dcls", [human, human.T]), humans=[human, human], labels=[834, 834],
                              rhos=([0.1, 0.2], [0.3, 0.4]), method="threshold_gradcam", cell=None)
    check_panels(fig, figures.save(fig, tmp_path / "t.png"))
    assert fig.layout.size == (8 + 4 * 224 + 3 * 6 + 90, 16 + 8 + 16 + 2 * (224 + 16 + 4) + 4)
    np.testing.assert_allclose(fig.layout.panel("b/1").array, expected_overlay(image, human.T), atol=JET_TOL)
    np.testing.assert_allclose(fig.layout.panel("human/0").array, expected_overlay(image, human), atol=JET_TOL)
    texts = [t.get_text() for t in fig.texts]
    assert "resnet50" in texts and "resnet50_dcls" in texts and "rho = 0.400" in texts
    assert "Threshold-Grad-CAM: resnet50 vs resnet50_dcls" in texts


def result(model, scores, n=12):
    return {"model": model, "cams": {m: {"score": s, "n_evaluated": n} for m, s in scores.items()}}


def test_table_figure_from_jsons(tmp_path):
    """Two result files (as two runs would write), 3 architectures, one baseline missing its DCLS twin."""
    a = [result("resnet50", {"gradcam": 0.31, "threshold_gradcam": 0.52}),
         result("resnet50_dcls", {"gradcam": 0.35, "threshold_gradcam": 0.6}, n=11)]
    b = [result("convnext_tiny_dcls", {"gradcam": -0.05, "threshold_gradcam": 0.4}),
         result("caformer_s18", {"gradcam": 0.02, "threshold_gradcam": 0.45})]
    paths = []
    for i, rows in enumerate((a, b)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"config": {}, "results": rows}))
    out = tmp_path / "plot.png"
    assert figures.main(["table", str(out), *map(str, paths), "--title", "t"]) == 0
    fig = figures.table_figure(figures.load_results(paths), title="t")
    img = read_png(out)
    assert (img.shape[1], img.shape[0]) == fig.layout.size == (560, 100 + 15 + 2 * 230)   # one title line
    assert fig.layout.values == {("resnet50", False, "gradcam"): 0.31, ("resnet50", True, "gradcam"): 0.35,
                                 ("resnet50", False, "threshold_gradcam"): 0.52,
                                 ("resnet50", True, "threshold_gradcam"): 0.6,
                                 ("convnext_tiny", True, "gradcam"): -0.05,
                                 ("convnext_tiny", True, "threshold_gradcam"): 0.4,
                                 ("caformer_s18", False, "gradcam"): 0.02,
                                 ("caformer_s18", False, "threshold_gradcam"): 0.45}
    # bars: heights and positions as plotted, architectures in the study's order
    for ax, method in zip(fig.axes, ("gradcam", "threshold_gradcam")):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["resnet50", "convnext_tiny", "caformer_s18"]
        bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
        for (arch, dcls, m), v in fig.layout.values.items():
            if m == method:
                assert bars[f"{arch}|{int(dcls)}|{m}"].get_height() == pytest.approx(v)
        labels = [t.get_text() for t in ax.texts]
        assert labels.count("n/a") == 2 and "11" in labels
    with pytest.raises(ValueError, match="more than one result"):
        figures.table_figure(a + a)
    assert figures.main(["table", str(tmp_path / "x.png"), str(tmp_path / "missing.json")]) == 2
