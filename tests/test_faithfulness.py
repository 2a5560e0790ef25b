"""cam.faithfulness against pytorch-grad-cam 1.5.7's own metrics (ROAD with its NoisyLinearImputer and scipy's
sparse solver, DropInConfidence, IncreaseInConfidence, ROADCombined) and a direct numpy loop (deletion / insertion,
RISE's CausalMetric written out), all scored by the PyTorch model, on a timm ResNet converted with models.convert.

pytorch-grad-cam's ROAD adds N(0, 0.01^2) noise from torch's generator: the parity tests set its imputer's noise
to 0 and ours to 0 (the noise itself is tested separately). Tolerance: model scores agree to 1e-5 (float32); the
imputation (conjugate gradients in float32 against scipy's float64 direct solve) to 1e-5 of the image scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from flax import nnx

from cam import faithfulness as ff
from tests.torch_ref import randomize_batchnorm, to_nhwc

CONFIG = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=10)


@pytest.fixture(scope="module")
def setup():
    import timm

    from models.convert import from_state_dict
    torch.manual_seed(0)
    tmodel = randomize_batchnorm(timm.create_model("resnet50", **CONFIG), seed=1).eval()
    with torch.no_grad():
        tmodel.fc.weight.mul_(3)                  # logits of order 1: probabilities far from 0, 1 and uniform
    model = from_state_dict("resnet50", {k: v.numpy() for k, v in tmodel.state_dict().items()}, **CONFIG)
    model.train()                                 # the metrics must use an eval-mode clone
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 24, 32, generator=g)    # non-square on purpose
    yy, xx = np.mgrid[:24, :32]
    rng = np.random.default_rng(3)
    # Smooth maps in [0, 1] (a blob each, plus a little noise to break ties), like upsampled CAMs.
    maps = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0) for cy, cx in [(5, 8), (12, 20), (20, 28)]])
    maps = (maps + 1e-3 * rng.random(maps.shape)).astype(np.float32)
    maps = (maps - maps.min((1, 2), keepdims=True)) / np.ptp(maps, (1, 2), keepdims=True)
    with torch.no_grad():
        labels = tmodel(x).argmax(1)
    graphdef, state = nnx.split(model)
    return tmodel, model, graphdef, state, x, maps, labels


def make_apply(graphdef, state):
    def apply(images):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(images)
    return apply


@pytest.fixture(scope="module")
def jitted(setup):
    """Each metric compiled once (module scope), pure over the model state."""
    _, _, graphdef, _, _, _, _ = setup

    def wrap(fn, **static):
        return jax.jit(lambda state, x, m, y: fn(make_apply(graphdef, state), x, m, y, **static))
    return wrap


def torch_scores(tmodel, x, labels, score):
    with torch.no_grad():
        logits = tmodel(x)
    out = torch.softmax(logits, -1) if score == "softmax" else logits
    return out[torch.arange(len(labels)), labels].numpy()


def pgc_target(score, label):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
    return (ClassifierOutputSoftmaxTarget if score == "softmax" else ClassifierOutputTarget)(int(label))


# ---------------------------------------------------------------------------------------------------------------
# Imputation and masks


@pytest.mark.parametrize("percentile, morf", [(10, True), (80, True), (35, False)])
def test_imputation_is_pytorch_grad_cam(setup, percentile, morf):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    _, _, _, _, x, maps, _ = setup
    keep = np.asarray(ff.road_mask(jnp.asarray(maps), percentile, morf))
    ours = np.asarray(ff.noisy_linear_impute(jnp.asarray(to_nhwc(x)), keep, noise=0.0))
    ref = np.stack([to_nhwc(NoisyLinearImputer(noise=0.0)(x[i], torch.from_numpy(keep[i].astype(np.float32)))[None])[0]
                    for i in range(len(x))])
    np.testing.assert_array_equal(ours[keep], to_nhwc(x)[keep])       # kept pixels untouched
    assert (ours[~keep] != to_nhwc(x)[~keep]).mean() > 0.99             # removed pixels replaced
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("percentile, morf", [(10, True), (50, True), (90, False), (20, False)])
def test_road_mask_is_pytorch_grad_cam(setup, percentile, morf):
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
    _, _, _, _, x, maps, _ = setup
    cls = RemoveMostRelevantFirst if morf else RemoveLeastRelevantFirst
    remover = cls(percentile, lambda img, mask: mask)                    # the imputer sees the binary mask
    ref = np.stack([remover(x[i], torch.from_numpy(maps[i])).numpy() for i in range(len(x))]) > 0.5
    np.testing.assert_array_equal(np.asarray(ff.road_mask(jnp.asarray(maps), percentile, morf)), ref)


def test_imputation_noise_and_degenerate():
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.standard_normal((2, 40, 40, 3)), jnp.float32)
    keep = jnp.asarray(rng.random((2, 40, 40)) < 0.5).at[1].set(False)   # image 1: nothing kept
    clean = np.asarray(ff.noisy_linear_impute(img, keep, noise=0.0))
    noisy = np.asarray(ff.noisy_linear_impute(img, keep, noise=0.5, key=jax.random.key(1)))
    k = np.asarray(keep[0])
    diff = noisy[0] - clean[0]
    assert (diff[k] == 0).all()
    assert abs(diff[~k].std() - 0.5) < 0.03 and abs(diff[~k].mean()) < 0.03
    assert np.isnan(clean[1]).all() and np.isnan(noisy[1]).all()       # no pixel to impute from
    other = np.asarray(ff.noisy_linear_impute(img, keep, noise=0.5, key=jax.random.key(2)))
    assert not np.allclose(other[0], noisy[0])


# ---------------------------------------------------------------------------------------------------------------
# Metrics against pytorch-grad-cam


def test_road_is_pytorch_grad_cam(setup, jitted, monkeypatch):
    from pytorch_grad_cam.metrics import road as pgc_road
    monkeypatch.setattr(pgc_road.NoisyLinearImputer.__init__, "__defaults__", (0.0, pgc_road.neighbors_weights))
    tmodel, _, _, state, x, maps, labels = setup
    xj, mj, yj = jnp.asarray(to_nhwc(x)), jnp.asarray(maps), jnp.asarray(labels.numpy())
    percentiles = (20, 70)
    # Probabilities: each order on its own.
    targets = [pgc_target("softmax", y) for y in labels]
    for morf, cls in ((True, pgc_road.ROADMostRelevantFirst), (False, pgc_road.ROADLeastRelevantFirst)):
        ours = np.asarray(jitted(ff.road_average, percentiles=percentiles, most_relevant_first=morf, noise=0.0,
                                 score="softmax")(state, xj, mj, yj))
        ref = np.mean([cls(percentile=p)(x, maps, targets, tmodel) for p in percentiles], axis=0)
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * max(1, np.abs(ref).max()), err_msg=str(morf))
    # Logits: ROADCombined.
    targets = [pgc_target("logit", y) for y in labels]
    combined = jitted(ff.road_combined, percentiles=percentiles, noise=0.0, score="logit")(state, xj, mj, yj)
    ref = pgc_road.ROADCombined(percentiles=list(percentiles))(x, maps, targets, tmodel)
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(combined, ref, rtol=0, atol=2e-5 * max(1, np.abs(ref).max()))


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_confidence_change_is_pytorch_grad_cam(setup, score):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    tmodel, model, _, _, x, maps, labels = setup
    targets = [pgc_target(score, y) for y in labels]
    for m in (maps, maps ** 3):     # two maps: the increase flag differs between them
        c = ff.confidence_change(model, jnp.asarray(to_nhwc(x)), jnp.asarray(m), labels.numpy(), score=score)
        drop, inc = DropInConfidence()(x, m, targets, tmodel), IncreaseInConfidence()(x, m, targets, tmodel)
        np.testing.assert_allclose(c["drop"], drop, rtol=0, atol=1e-5 * max(1, np.abs(drop).max()))
        np.testing.assert_array_equal(c["increase"], inc)
        y = torch_scores(tmodel, x, labels, score)
        np.testing.assert_allclose(c["drop_relative"], np.maximum(y - c["score_masked"], 0) / y, rtol=1e-5)
    top = ff.confidence_change(model, jnp.asarray(to_nhwc(x)), jnp.asarray(m), None, score=score)   # labels=None
    np.testing.assert_array_equal(top["labels"], labels.numpy())
    np.testing.assert_allclose(top["drop"], c["drop"], rtol=1e-6, atol=1e-7)
    assert not model.bn1.use_running_average      # the caller's model stays in train mode


# ---------------------------------------------------------------------------------------------------------------
# Deletion / insertion against a direct loop


def reference_curve(tmodel, x, maps, labels, mode, step, baseline, score):
    """RISE's CausalMetric as a numpy loop: per image, move `step` pixels at a time in decreasing map order (stable
    ties) from `start` to `finish`, scoring before each move and after the last."""
    b, c, h, w = x.shape
    n = -(-h * w // step)
    curves = np.zeros((b, n + 1))
    for i in range(b):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        img, base = x[i].numpy().reshape(c, -1), baseline[i].reshape(c, -1)
        start, finish = (img.copy(), base) if mode == "deletion" else (base.copy(), img)
        for k in range(n + 1):
            curves[i, k] = torch_scores(tmodel, torch.from_numpy(start.reshape(1, c, h, w)), labels[i:i + 1], score)[0]
            idx = order[k * step:(k + 1) * step]
            start[:, idx] = finish[:, idx]
    auc = (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / n
    return curves, auc


def scipy_blur(x, sigma=5.0, size=11):
    r = np.arange(size) - (size - 1) / 2
    k = np.exp(-r ** 2 / (2 * sigma ** 2))
    k = np.outer(k, k) / np.outer(k, k).sum()
    return np.stack([[scipy.ndimage.correlate(ch, k, mode="constant", cval=0.0) for ch in img] for img in x])


@pytest.mark.parametrize("mode, step, score", [("deletion", 100, "softmax"), ("insertion", 77, "logit")])
def test_curves_are_a_direct_loop(setup, jitted, mode, step, score):
    tmodel, _, _, state, x, maps, labels = setup
    baseline = np.zeros(x.shape, np.float32) if mode == "deletion" else scipy_blur(x.numpy().astype(np.float64))
    curves, auc = reference_curve(tmodel, x, maps, labels, mode, step, baseline.astype(np.float32), score)
    fn = jitted(ff.deletion if mode == "deletion" else ff.insertion, step=step, score=score, batch_steps=3)
    out = fn(state, jnp.asarray(to_nhwc(x)), jnp.asarray(maps), jnp.asarray(labels.numpy()))
    assert out["curve"].shape == (3, -(-24 * 32 // step) + 1)
    np.testing.assert_allclose(out["curve"], curves, rtol=0, atol=2e-5 * max(1, np.abs(curves).max()))
    np.testing.assert_allclose(out["auc"], auc, rtol=0, atol=2e-5 * max(1, np.abs(auc).max()))
    assert np.ptp(curves) > 1e-2      # the curve moves: the comparison means something


def test_blur_is_scipy():
    x = np.random.default_rng(0).standard_normal((2, 20, 30, 3)).astype(np.float32)
    ref = scipy_blur(x.transpose(0, 3, 1, 2).astype(np.float64)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ff.gaussian_blur(jnp.asarray(x)), ref, rtol=0, atol=1e-5)


def test_evaluate_jit_batch_and_top_prediction(setup, jitted):
    _, model, _, state, x, maps, labels = setup
    xj, mj = jnp.asarray(to_nhwc(x)), jnp.asarray(maps * 5 + 1)     # evaluate() normalises the maps itself
    fn = jitted(ff.evaluate, num_steps=6, percentiles=(30, 60), noise=0.0)
    out = fn(state, xj, mj, None)                  # labels=None: the top prediction == labels here
    assert set(out) == set(ff.METRIC_NAMES)
    for k in ff.METRIC_NAMES:
        assert out[k].shape == (3,) and np.isfinite(out[k]).all(), k
    # The metrics one by one (eagerly: the same definitions, other code paths through jit).
    m01 = jnp.asarray(maps)
    np.testing.assert_allclose(out["deletion_auc"], ff.deletion(model, xj, m01, labels.numpy(), num_steps=6)["auc"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["road_morf"], ff.road_average(model, xj, m01, labels.numpy(), percentiles=(30, 60),
                                                                 noise=0.0), rtol=1e-4, atol=1e-6)
    # Images are independent: the batch reversed gives the values reversed (the same compiled function).
    rev = fn(state, xj[::-1], mj[::-1], None)
    for k in ff.METRIC_NAMES:
        np.testing.assert_allclose(rev[k][::-1], out[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not model.bn1.use_running_average


def test_bad_arguments(setup):
    _, model, _, _, x, maps, _ = setup
    xj = jnp.asarray(to_nhwc(x))
    with pytest.raises(ValueError, match=r"maps must be \(B, H, W\) = \(3, 24, 32\)"):
        ff.deletion(model, xj, jnp.zeros((3, 12, 16)))
    with pytest.raises(ValueError, match="score must be"):
        ff.confidence_change(model, xj, jnp.asarray(maps), score="prob")
    with pytest.raises(ValueError, match="mode must be"):
        ff.perturbation_curve(model, xj, jnp.asarray(maps), mode="both")
    with pytest.raises(ValueError, match="percentiles must lie"):
        ff.road_average(model, xj, jnp.asarray(maps), percentiles=(120,))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        ff.confidence_change(model, xj, jnp.asarray(maps), np.array([1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py --faithfulness


def test_evaluate_cli_faithfulness(tmp_path, capsys, monkeypatch):
    """The flag end to end on the bundled sample (random weights: Grad-CAM's maps are often all zero there, so
    Threshold-Grad-CAM, whose maps are not). ROAD at one percentile: its nine 224 x 224 imputations (conjugate
    gradients to 1e-6) were most of this test's time, and are checked against the reference above."""
    import functools
    import json

    import evaluate
    monkeypatch.setattr(ff, "make_faithfulness_fn", functools.partial(ff.make_faithfulness_fn, percentiles=(50,)))
    from models import registry
    from tests.test_evaluate import TINY, register_tiny
    register_tiny()
    try:
        out = tmp_path / "out.json"
        code = evaluate.main(["--model", TINY, "--sample", "--random-init", "--limit", "3", "--batch-size", "2",
                              "--cam", "threshold_gradcam", "--faithfulness", "--faithfulness-steps", "3",
                              "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    finally:
        registry.MODELS.pop(TINY, None)
    assert code == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model "))
    assert "alignment score" in header and "deletion AUC" in header and "ROAD" in header
    row = json.loads(out.read_text())["results"][0]["cams"]["threshold_gradcam"]
    f = row["faithfulness"]
    assert set(f) == set(ff.METRIC_NAMES) | {"n_evaluated"}
    assert f["n_evaluated"] == 3 and np.isfinite(row["score"])             # next to the alignment score
    assert 0 <= f["deletion_auc"] <= 1 and 0 <= f["insertion_auc"] <= 1     # probabilities
    assert f["average_drop"] >= 0 and 0 <= f["increase_in_confidence"] <= 1
    assert all(np.isfinite(f[k]) for k in ff.METRIC_NAMES)
