"""Every registered model name, swept.

In depth, on the tiny `test_*` variants (one per family, plain and DCLS; models.entry.register_test): the forward
pass (logits shape, finite), gradients of every parameter (finite and nonzero: DCLS positions included), every CAM
method of cam.methods at the entry's CAM target (Grad-CAM, HiResCAM and LayerCAM against maps written out here
from forward_features / forward_head and jax.vjp), and a conversion round trip (model -> PyTorch-layout state
dict -> models.convert.from_state_dict -> the same parameters, config and logits as the original model).

Cheaply, on the real names (building and running them full size on CPU costs seconds each): abstract builds with
one block per stage (the full widths; jax.eval_shape, nothing computed) whose forward is traced at the entry's input
size (logits (1, num_classes), features at the CAM target), whose state keys are a fixed point of the entry's key
remapping (timm layout) and whose inferred overrides agree with the model's own config.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cam.methods
import models
from dcls_jax import Dcls2d
from models import convert, registry
from models.layers import ConvSpec

# The names the family files register, read in a fresh interpreter: other test modules add their own toy entries to
# this process's registry (at import or in fixtures), which are not the registry's to sweep.
NAMES = json.loads(subprocess.run([sys.executable, "-c", "import json, models; print(json.dumps(models.list_models()))"],
                                  capture_output=True, text=True, check=True, cwd=Path(models.__file__).parents[1],
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout)
TESTS = [n for n in NAMES if n.startswith("test_")]
REAL = [n for n in NAMES if not n.startswith("test_")]
BATCH = 2


def test_every_family_file_is_listed():
    """models.registry.FAMILIES names exactly the files of models/ that register entries (a new family file that is
    not listed would silently register nothing)."""
    root = Path(models.__file__).parent
    registering = {p.stem for p in root.glob("*.py")
                   if p.stem != "entry" and re.search(r"\bregister(_test)?\(", p.read_text())}
    assert registering == set(registry.FAMILIES)


def test_registry_lists():
    """16 study models; one plain and one DCLS test variant per family; every name's entry is consistent."""
    study = [n for n in NAMES if models.get_entry(n).in_study]
    assert len(study) == 16 and not set(study) & set(TESTS)
    for family in registry.FAMILIES:
        names = [n for n in TESTS if models.get_entry(n).family == family]
        assert any(n.endswith("_dcls") for n in names) and any(not n.endswith("_dcls") for n in names), family
    for name in NAMES:
        entry = models.get_entry(name)
        assert entry.name == name and entry.family in registry.FAMILIES
        assert entry.builder.args[0].conv.is_dcls == ("_dcls" in name), name     # the preset's Config.conv


def _blocks_per_stage(entry, n: int) -> dict:
    """The override that leaves n blocks per stage (the preset's `depths` or `layers`), else none."""
    cfg = entry.builder.args[0]
    field = next((f for f in ("depths", "layers") if hasattr(cfg, f)), None)
    return {} if field is None else {field: (n,) * len(getattr(cfg, field))}


def test_conv_spec_is_the_one_injection():
    """Config.conv decides dense or DCLS in every family; its fields can be overridden one by one (JSON-friendly)."""
    for family in registry.FAMILIES:
        plain = next(n for n in TESTS if models.get_entry(n).family == family and "_dcls" not in n)
        spec = ConvSpec.dcls(3, 5, "gauss")
        two = _blocks_per_stage(models.get_entry(plain), 2)
        m = nnx.eval_shape(lambda: models.create_model(plain, conv=spec, kernel_count=4, **two))
        layers = [(path, v) for path, v in nnx.iter_graph(m) if isinstance(v, Dcls2d)]
        assert layers and m.config.conv == dataclasses.replace(spec, kernel_count=4), family
        assert all(layer.kernel_count == 4 and layer.version == "gauss" and layer.dilated_kernel_size == (5, 5)
                   for _, layer in layers), family
        stages = {}       # stage -> the ids of its layers' P and SIG: one of each per stage, shared by its layers
        for path, layer in layers:
            stages.setdefault(path[:2] if path[0] == "stages" else path[:1], set()).add((id(layer.P), id(layer.SIG)))
        assert all(len(ids) == 1 for ids in stages.values()) and len(set().union(*stages.values())) == len(stages)
    with pytest.raises(ValueError, match="unknown config override"):
        models.create_model("test_resnet", kernel_cnt=3)
    for bad in (dict(kind="sparse"), dict(version="v2"), dict(init="uniform"), dict(kernel_count=0)):
        with pytest.raises(ValueError, match="ConvSpec"):
            ConvSpec(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Real names: abstract builds, one block per stage


@pytest.mark.parametrize("name", REAL)
def test_real_names_abstract(name):
    entry = models.get_entry(name)
    x = jax.ShapeDtypeStruct((1, entry.input_size, entry.input_size, 3), jnp.float32)

    static = {}

    def run(x):
        m = models.create_model(name, **_blocks_per_stage(entry, 1))
        m.eval()
        static.update(target=m.target_layer, layers=m.layer_names, name=registry.model_name(m), cfg=m.config)
        a = m.forward_features(x)
        return a, m.forward_head(a), nnx.state(m)

    a, logits, state = jax.eval_shape(run, x)
    cfg = static["cfg"]
    assert static["target"] == entry.target_layer and entry.target_layer in static["layers"] and static["name"] == name
    assert logits.shape == (1, entry.num_classes)
    assert a.ndim == 4 and a.shape[0] == 1 and a.shape[1] == a.shape[2] >= 7     # NHWC, >= 7 x 7 at the CAM target
    sd = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    if entry.remap_keys is not None:
        assert entry.remap_keys(sd).keys() == sd.keys()                              # identity on timm keys
    inferred = entry.infer_overrides(sd) if entry.infer_overrides is not None else {}
    for key, value in inferred.items():
        actual = getattr(cfg, key) if hasattr(cfg, key) else getattr(cfg.conv, key)
        assert actual == value, (key, actual, value)


# ---------------------------------------------------------------------------------------------------------------
# Test variants: in depth


LABELS = (3, 7)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sweep(graphdef, layer, params, rest, x, cotangent, labels):
    """One compiled call per model: logits, parameter gradients, every CAM method at `layer` (feature resolution),
    and Grad-CAM / HiResCAM / LayerCAM written out here from A = forward_features(x) and
    G = d sum_b logits[b, label_b] / dA."""
    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        m.eval()
        logits = m(x)
        return jnp.sum(logits * cotangent), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    m = nnx.merge(graphdef, params, rest)
    m.eval()
    a = m.forward_features(x, layer)
    out, vjp = jax.vjp(lambda a: m.forward_head(a, layer), a)
    (g,) = vjp(jax.nn.one_hot(labels, out.shape[-1]))
    hand = {"gradcam": jax.nn.relu((a * g.mean(axis=(1, 2), keepdims=True)).mean(-1)),
            "hirescam": jax.nn.relu((g * a).sum(-1)),
            "layercam": jax.nn.relu((jax.nn.relu(g) * a).sum(-1))}
    cams = cam.methods.make_cams_fn(graphdef, cam.methods.METHOD_NAMES, layer=layer, output_size=a.shape[1:3])
    return logits, grads, cams(nnx.merge_state(params, rest), x, labels), hand


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)


def _nonzero_init(model, seed: int = 0):
    """Parameters initialised to exactly zero (biases, ResNet's last BatchNorm weights) get small random values, so
    that no gradient vanishes only because of the initialisation."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = np.asarray(var.get_value())
        if not value.any():
            var.set_value(jnp.asarray(0.1 * rng.standard_normal(value.shape), value.dtype))
    return model


@pytest.fixture(scope="module", params=TESTS)
def tiny(request):
    """(name, entry, model, x, results of _sweep) for one test variant."""
    name = request.param
    entry = models.get_entry(name)
    model = _nonzero_init(nnx.jit(lambda: models.create_model(name, rngs=nnx.Rngs(1)))())
    model.eval()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, entry.input_size, entry.input_size, 3)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((BATCH, entry.num_classes)), jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    results = _sweep(graphdef, entry.target_layer, params, rest, x, cotangent, jnp.array(LABELS))
    return name, entry, model, x, results


def test_forward_and_gradients(tiny):
    name, entry, model, x, (logits, grads, _, _) = tiny
    assert logits.shape == (BATCH, entry.num_classes) and bool(jnp.isfinite(logits).all())
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in flat:
        g = np.asarray(var.get_value())
        key = ".".join(map(str, path))
        assert np.isfinite(g).all(), f"{name}: non-finite gradient of {key}"
        assert np.abs(g).max() > 0, f"{name}: zero gradient of {key}"
    if model.config.conv.is_dcls:
        assert any(path[-1] == "P" for path, _ in flat), name


def test_cam_methods(tiny):
    """Every method of cam.methods at the entry's target, at feature resolution (no resize to compare through)."""
    name, entry, model, x, (_, _, maps, hand) = tiny
    size = jax.eval_shape(model.forward_features, x).shape[1:3]
    assert model.target_layer == entry.target_layer
    assert set(maps) == set(cam.methods.METHOD_NAMES)
    for method, m in maps.items():
        assert m.shape == (BATCH, *size) and bool(jnp.isfinite(m).all()), f"{name} {method}"
    scale = max(float(jnp.abs(ref).max()) for ref in hand.values())
    assert scale > 0, f"{name}: every reference map is zero"          # (one alone may be: no positive evidence)
    for method, ref in hand.items():
        np.testing.assert_allclose(maps[method], ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name} {method}")


def test_conversion_round_trip(tiny):
    """model -> PyTorch-layout state dict (numpy, '.'-joined timm keys; shared DCLS positions repeated under every
    layer that uses them, as PyTorch's state_dict does) -> from_state_dict -> the same model and logits."""
    name, entry, model, x, _ = tiny
    sd = {key: np.array(var.get_value()) for key, var in _all_paths(model)}
    loaded = convert.from_state_dict(name, sd)
    assert registry.model_name(loaded) == name and loaded.config == model.config
    for key, var in _all_paths(loaded):
        np.testing.assert_array_equal(np.asarray(var.get_value()), sd[key], err_msg=key)
    assert {key for key, _ in _all_paths(loaded)} == sd.keys()
    graphdef = nnx.graphdef(model)          # (the loaded model's differs only by the overrides it records)
    np.testing.assert_array_equal(np.asarray(_logits(graphdef, nnx.state(loaded), x)),
                                  np.asarray(_logits(graphdef, nnx.state(model), x)))


def _all_paths(model):
    """(key, variable) for every Param / BatchStat under every attribute path that reaches it."""
    out = []

    def walk(node, prefix):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            out.append((".".join(prefix), node))
        elif isinstance(node, (list, tuple, nnx.List)):
            for i, v in enumerate(node):
                walk(v, prefix + (str(i),))
        elif isinstance(node, nnx.Module):
            for k, v in vars(node).items():
                if not k.startswith("_"):
                    walk(v, prefix + (k,))

    walk(model, ())
    return out
