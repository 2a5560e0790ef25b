"""ResNet-50 and ResNet-50-DCLS against timm 1.0.31 (DCLS: + dcls 0.1.1) with random weights and BatchNorm stats.

Each reference goes through torch.save (or safetensors, as the resnet50.a1_in1k baseline is published) ->
models.convert.read_checkpoint -> from_state_dict. CPU time: both models are compared numerically at every
layer with the registry's widths but fewer blocks (REDUCED), their full-depth layout strictly converted from
timm's full state dict (shapes only), and resnet50_dcls compared numerically in full.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx

from models.convert import from_state_dict, read_checkpoint
from models.registry import create_model, get_entry
from tests.torch_ref import (check_cut_points, dclsify, initial_values, random_images, randomize_batchnorm,
                             randomize_params)

LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")
TORCH_LAYERS = {"stem": "maxpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}
SMALL = dict(layers=(1, 2, 1, 1), channels=(8, 16, 24, 32), num_classes=10)
REDUCED = dict(layers=(2, 1, 1, 1))
TOL = 1e-4


def timm_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """timm's resnet50; DCLS: every bottleneck conv2 -> dcls.Dcls2d (7, 5, v0, no bias), positions shared per
    stage."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet50", **overrides)
    if name.endswith("_dcls"):
        dclsify([[(block, "conv2") for block in getattr(model, f"layer{i}")] for i in range(1, 5)],
                kernel_count=5, dilated_kernel_size=7, version="v0", bias=False, seed=seed)
    return model


def reference(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """timm_model in eval mode with random BatchNorm statistics and affine parameters (timm zero-initialises bn3's
    weight) and positions."""
    model = timm_model(name, seed=seed, **overrides)
    if name.endswith("_dcls"):
        randomize_params(model, ("P",), seed=seed + 1, scale=2.0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".P"):
                    p.clamp_(-3, 3)
    randomize_batchnorm(model, seed=seed)
    return model.eval()


def convert(name: str, model: torch.nn.Module, path, **overrides):
    """The reference's state dict saved as the published checkpoint is, read back, converted."""
    key = get_entry(name).checkpoint.key
    if key is None:   # the baseline is published as safetensors
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path.with_suffix(".safetensors")))
        path = path.with_suffix(".safetensors")
    else:             # a timm training checkpoint: the EMA weights beside other (here zeroed) weights and metadata
        sd = model.state_dict()
        torch.save({"epoch": 3, "arch": "resnet50", "state_dict": {k: torch.zeros_like(v) for k, v in sd.items()},
                    key: sd, "args": argparse.Namespace(model="resnet50", lr=0.1)}, path)
    return from_state_dict(name, read_checkpoint(path, key), **overrides)





@pytest.mark.parametrize("name", ["resnet50", "resnet50_dcls"])
def test_matches_timm_at_every_layer(name, tmp_path):
    """Logits, the activations at every layer name (the default being the CAM target: layer4 after its last
    ReLU) and forward_head from each of them; the registry's widths, REDUCED depth."""
    ref = reference(name, **REDUCED)
    model = convert(name, ref, tmp_path / "model.pth.tar", **REDUCED)
    assert model.layer_names == LAYERS and get_entry(name).target_layer == "layer4"
    check_cut_points(model, ref, random_images(64), {layer: TORCH_LAYERS[layer] for layer in LAYERS}, "layer4")


def test_full_model_matches_timm(tmp_path):
    ref = reference("resnet50_dcls")
    check_cut_points(convert("resnet50_dcls", ref, tmp_path / "model.pth.tar"), ref, random_images(64, seed=1),
                     {"layer4": "layer4"}, "layer4")


@pytest.mark.parametrize("name", ["resnet50", "resnet50_dcls"])
def test_full_architecture_loads_timm_layout(name):
    """The registered architecture takes every tensor of timm's full state dict (num_batches_tracked included,
    as published checkpoints carry it), each with its shape (strict; zero-stride arrays, meta device)."""
    ref = timm_model(name, device="meta")
    sd = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in ref.state_dict().items()}
    model = from_state_dict(name, sd)
    assert sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))) == sum(
        p.numel() for p in ref.parameters())


def test_train_mode_batchnorm_matches_timm(tmp_path):
    """Train mode: BatchNorm normalises with batch statistics and updates the running ones as PyTorch does."""
    ref = reference("resnet50_dcls", **SMALL)
    model = convert("resnet50_dcls", ref, tmp_path / "model.pth.tar", **SMALL)
    x = random_images(32, seed=2)
    ref.train()
    with torch.no_grad():
        logits_ref = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    model.train()
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m, nnx.BatchStat)

    logits, stats = f(state, jnp.asarray(x))
    np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=TOL)
    sd = ref.state_dict()
    for path, var in nnx.to_flat_state(stats):
        key = ".".join(map(str, path))
        np.testing.assert_allclose(var.get_value(), sd[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_init_sharing_and_drop_path_follow_timm():
    model = nnx.eval_shape(lambda: create_model("resnet50_dcls", **SMALL, drop_path_rate=0.2))
    ref = timm.create_model("resnet50", **SMALL, drop_path_rate=0.2)
    blocks = [[b for b in getattr(model, f"layer{i}")] for i in range(1, 5)]
    blocks_ref = [b for i in range(1, 5) for b in getattr(ref, f"layer{i}")]
    rates = [b.drop_path.rate for stage in blocks for b in stage]
    rates_ref = [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in blocks_ref]
    np.testing.assert_allclose(rates, rates_ref, rtol=1e-6)
    for stage in blocks:
        first = stage[0].conv2
        assert all(b.conv2.P is first.P for b in stage) and first.bias is None and first.kernel_count == 5
        assert first.dilated_kernel_size == (7, 7) and first.padding == (3, 3) and first.version == "v0"
    assert [b[0].conv2.stride for b in blocks] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert len({id(stage[0].conv2.P) for stage in blocks}) == 4

    v = initial_values("resnet50_dcls", ("conv1.weight", "layer2.1.bn3.weight", "layer2.0.conv2.P"), **SMALL)
    assert np.all(v["layer2.1.bn3.weight"] == 0)                                    # zero_init_last
    assert 0 < np.abs(v["layer2.0.conv2.P"]).max() <= 3
    assert abs(v["conv1.weight"].std() / np.sqrt(2 / (64 * 49)) - 1) < 0.1         # kaiming_normal, fan_out


def test_train_and_eval_reach_every_batchnorm_and_drop_path():
    model = nnx.eval_shape(lambda: create_model("resnet50", **SMALL, drop_path_rate=0.5))
    modules = [m for _, m in nnx.iter_modules(model)]
    model.train()
    assert all(not m.use_running_average for m in modules if hasattr(m, "use_running_average"))
    assert all(not m.deterministic for m in modules if hasattr(m, "deterministic"))
    model.eval()
    assert all(m.use_running_average for m in modules if hasattr(m, "use_running_average"))
    assert all(m.deterministic for m in modules if hasattr(m, "deterministic"))
    assert sum(hasattr(m, "use_running_average") for m in modules) == 3 * 5 + 4 + 1


def test_bad_arguments_raise_clear_errors():
    model = nnx.eval_shape(lambda: create_model("resnet50", **SMALL))
    with pytest.raises(ValueError, match="unknown layer"):
        model.forward_head(jnp.zeros((1, 2, 2, 128)), "layer5")
    with pytest.raises(ValueError, match="unknown config override"):
        create_model("resnet50", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="4 stages"):
        create_model("resnet50", layers=(1, 1, 1))


def test_train_mode_batchnorm_gradients_match_pytorch():
    """BatchNorm2d in train mode (statistics and affine over (rows, channels), channel_affine's own gradient):
    the values, running statistics and the gradients of input, weight and bias against torch.nn.BatchNorm2d."""
    from models.layers import BatchNorm2d
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 5, 7, 12)).astype(np.float32) * 2 + 1
    g = rng.normal(size=x.shape).astype(np.float32)
    w, b = rng.normal(size=12).astype(np.float32), rng.normal(size=12).astype(np.float32)
    bn = BatchNorm2d(12)
    bn.weight[...], bn.bias[...] = jnp.asarray(w), jnp.asarray(b)

    @nnx.jit
    def grads(bn, x):   # nnx's transforms: the running statistics update in place
        return nnx.grad(lambda m, x: jnp.sum(m(x) * g), argnums=(0, 1))(bn, x)
    dp, dx = grads(bn, jnp.asarray(x))
    ref = torch.nn.BatchNorm2d(12)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    (ref(xt) * torch.from_numpy(g).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["weight"].get_value(), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["bias"].get_value(), ref.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.get_value(), ref.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.running_mean.get_value(), ref.running_mean.numpy(), rtol=1e-6, atol=1e-7)
