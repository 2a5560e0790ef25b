"""ConvNeXt T/S/B and their DCLS twins against timm 1.0.31 (DCLS: + dcls 0.1.1) with random weights.

Each reference goes through torch.save -> models.convert.read_checkpoint -> from_state_dict, in timm's and in
FAIR's key layout; timm's own `checkpoint_filter_fn` checks our FAIR renaming independently.
CPU time: every registered model is compared numerically with the registry's widths and kernel counts but
fewer blocks (REDUCED), its full-depth layout strictly converted from timm's full state dict (shapes only),
and one full model (convnext_tiny_dcls) compared numerically end to end.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models.convnext import checkpoint_filter_fn

from models import convnext
from models.convert import from_state_dict, read_checkpoint
from models.registry import create_model, get_entry
from tests.torch_ref import (check_cut_points, dclsify, initial_values, random_images, randomize_params,
                             save_state_dict)

KERNEL_COUNT = {"tiny": 34, "small": 40, "base": 40}   # the published ConvNeXt-dcls checkpoints
LAYERS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
NAMES = ["convnext_tiny", "convnext_tiny_dcls", "convnext_small", "convnext_small_dcls", "convnext_base",
         "convnext_base_dcls"]
SMALL = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
REDUCED = dict(depths=(2, 1, 2, 1))


def timm_model(name: str, kernel_count: int | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """timm's ConvNeXt; DCLS: its depthwise convs -> dcls.Dcls2d (17, kernel_count, v0), positions shared per
    stage."""
    size = name.split("_")[1]
    torch.manual_seed(seed)
    model = timm.create_model(f"convnext_{size}", **overrides)
    if name.endswith("_dcls"):
        dclsify([[(block, "conv_dw") for block in stage.blocks] for stage in model.stages],
                kernel_count=kernel_count or KERNEL_COUNT[size], dilated_kernel_size=17, version="v0", seed=seed)
    return model


def reference(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """timm_model in eval mode with random layer scales, biases, norm weights and positions (timm's init leaves
    them trivial)."""
    model = timm_model(name, seed=seed, **overrides)
    if name.endswith("_dcls"):
        randomize_params(model, ("P",), seed=seed + 1, scale=4.0)   # spread over the whole 17 x 17 grid
    randomize_params(model, ("gamma",), seed=seed)
    randomize_params(model, ("bias",), seed=seed + 2, scale=0.1)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith(".P"):
                p.clamp_(-8, 8)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
    return model.eval()


def convert(name: str, model: torch.nn.Module, path, fair: bool = False, **overrides):
    """The reference's state dict saved as the published checkpoint is (inside "model"), read back, converted."""
    sd = model.state_dict()
    if fair:
        sd = to_fair(sd)
    key = get_entry(name).checkpoint.key
    save_state_dict(sd, path, container=key)
    return from_state_dict(name, read_checkpoint(path, key), **overrides)


def to_fair(sd):
    """timm names -> the original FAIR ConvNeXt names (written here as the inverse of timm's mapping)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            k = "downsample_layers.0." + ".".join(parts[1:])
        elif parts[0] == "stages" and parts[2] == "downsample":
            k = f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
        elif parts[0] == "stages":
            k = f"stages.{parts[1]}.{parts[3]}." + ".".join(parts[4:])
            k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
        elif parts[0] == "head":
            k = {"norm": "norm.", "fc": "head."}[parts[1]] + parts[2]
        out[k] = v
    return out





@pytest.mark.parametrize("name", NAMES)
def test_matches_timm_at_every_layer(name, tmp_path):
    """Logits, the activations at every layer name (the default being the CAM target: the last stage, before the
    head's norm) and forward_head from each of them; the registry's widths and kernel counts, REDUCED depth."""
    ref = reference(name, **REDUCED)
    model = convert(name, ref, tmp_path / "model.pth", **REDUCED)
    assert model.layer_names == LAYERS and get_entry(name).target_layer == "stages.3"
    assert isinstance(ref.norm_pre, torch.nn.Identity)   # so timm's forward_features is the stages.3 output
    check_cut_points(model, ref, random_images(64), {layer: layer for layer in LAYERS}, "stages.3")


def test_full_model_matches_timm(tmp_path):
    ref = reference("convnext_tiny_dcls")
    check_cut_points(convert("convnext_tiny_dcls", ref, tmp_path / "model.pth"), ref, random_images(64, seed=1),
                     {"stages.3": "stages.3"}, "stages.3")


@pytest.mark.parametrize("name", NAMES)
def test_full_architecture_loads_the_original_layout(name):
    """The registered architecture at full depth takes every tensor of the FAIR-named full state dict, each
    with its shape (strict conversion; zero-stride arrays, timm's model on the meta device: shapes only)."""
    ref = timm_model(name, device="meta")
    sd = ref.state_dict()
    fair = to_fair(sd)
    assert checkpoint_filter_fn(fair, ref).keys() == sd.keys()   # timm's mapping inverts ours at full depth too
    model = from_state_dict(name, {k: np.broadcast_to(np.float32(0), v.shape) for k, v in fair.items()})
    assert sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model))) == sum(
        p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_small_dcls"])
def test_fair_layout_converts_to_the_same_model(name, tmp_path):
    """Same parameters from FAIR's names as from timm's; a DCLS checkpoint's kernel_count (here 34, not the
    registry's 40) is read from its weights."""
    ref = reference(name, **SMALL, kernel_count=34)
    sd = ref.state_dict()
    fair = to_fair(sd)
    assert "head.weight" in fair and "norm.weight" in fair and "downsample_layers.0.0.weight" in fair
    renamed = checkpoint_filter_fn(fair, ref)        # timm's own mapping: our inverse must round-trip through it
    assert renamed.keys() == sd.keys() and all(torch.equal(renamed[k], sd[k]) for k in sd)
    assert convnext.remap_keys(sd).keys() == sd.keys()   # identity on timm names
    a = nnx.to_flat_state(nnx.state(convert(name, ref, tmp_path / "timm.pth", **SMALL)))
    b = nnx.to_flat_state(nnx.state(convert(name, ref, tmp_path / "fair.pth", fair=True, **SMALL)))
    assert [p for p, _ in a] == [p for p, _ in b]
    if name.endswith("_dcls"):
        assert "stages.2.1.dwconv.P" in fair and "stages.2.1.dwconv.weight" in fair
        assert {".".join(map(str, p)): v for p, v in a}["stages.0.blocks.0.conv_dw.weight"].shape == (8, 1, 34)
    for (path, va), (_, vb) in zip(a, b):
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(path))


def test_remap_keys_rejects_colliding_names():
    with pytest.raises(ValueError, match="collide"):
        convnext.remap_keys({"head.weight": np.zeros(1), "head.fc.weight": np.zeros(1)})


def test_init_sharing_and_drop_path_follow_timm():
    overrides = dict(SMALL, drop_path_rate=0.3, head_init_scale=0.5)
    model = nnx.eval_shape(lambda: create_model("convnext_small_dcls", **overrides))
    ref = timm.create_model("convnext_small", **overrides)
    rates = [b.drop_path.rate for s in model.stages for b in s.blocks]
    rates_ref = [getattr(b.drop_path, "drop_prob", 0.0) for s in ref.stages for b in s.blocks]
    np.testing.assert_allclose(rates, rates_ref, rtol=1e-6)
    convs = [[b.conv_dw for b in s.blocks] for s in model.stages]
    for stage in convs:
        assert all(c.P is stage[0].P for c in stage) and stage[0].kernel_count == 40
        assert stage[0].dilated_kernel_size == (17, 17) and stage[0].padding == (8, 8) and stage[0].version == "v0"
    assert len({id(stage[0].P) for stage in convs}) == 4
    plain = nnx.eval_shape(lambda: create_model("convnext_tiny", **SMALL))
    assert plain.stages[2].blocks[1].conv_dw.weight.shape == (24, 1, 7, 7)

    v = initial_values("convnext_small_dcls", ("stages.2.blocks.1.conv_dw.weight", "stages.2.blocks.1.conv_dw.bias",
                                               "stages.2.blocks.0.conv_dw.P", "stages.2.blocks.1.gamma",
                                               "head.fc.weight", "head.fc.bias"), **overrides)
    assert 0 < np.abs(v["stages.2.blocks.0.conv_dw.P"]).max() <= 8
    assert abs(v["stages.2.blocks.1.conv_dw.weight"].std() / 0.02 - 1) < 0.3      # trunc_normal(.02)
    assert np.all(v["stages.2.blocks.1.conv_dw.bias"] == 0) and np.all(v["head.fc.bias"] == 0)
    assert np.all(v["stages.2.blocks.1.gamma"] == np.float32(1e-6))
    w = v["head.fc.weight"]                                                        # head_init_scale * trunc_normal
    assert abs(w.std() / (0.5 * 0.02) - 1) < 0.3


def test_train_mode_drops_whole_residual_branches():
    model = nnx.eval_shape(lambda: create_model("convnext_tiny", **SMALL, drop_path_rate=0.5))
    model.train()
    assert all(not b.drop_path.deterministic for s in model.stages for b in s.blocks)
    model.eval()
    assert all(b.drop_path.deterministic for s in model.stages for b in s.blocks)

    block = convnext.Block(8, convnext.DENSE, convnext.Config(ls_init_value=0.5), 0.5,
                           rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 5, 5, 8), dtype=np.float32))
    block.eval()
    branch = np.asarray(forward(block, x) - x)
    block.train()
    kept = np.asarray(forward(block, x) - x)
    dropped = np.all(kept == 0, axis=(1, 2, 3))
    assert 0 < dropped.sum() < 16                                       # per sample, about half
    np.testing.assert_allclose(kept[~dropped], branch[~dropped] / 0.5, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    model = nnx.eval_shape(lambda: create_model("convnext_tiny", **SMALL))
    with pytest.raises(ValueError, match="unknown layer"):
        model.forward_features(jnp.zeros((1, 32, 32, 3)), "stages.4")
    with pytest.raises(ValueError, match="unknown config override"):
        create_model("convnext_tiny", depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="4 depths"):
        create_model("convnext_tiny", depths=(1, 1, 1))
