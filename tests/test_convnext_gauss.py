"""The Gaussian ConvNeXt-dcls (convnext_tiny_dcls_gauss) against timm 1.0.31 + dcls 0.1.1 (every depthwise conv a
Dcls2d "gauss" 23 / 26, P and SIG shared per stage), converted from the published checkpoint's FAIR key layout;
and one training step of configs/gauss.py on it."""
from __future__ import annotations

import io
import os

import jax
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from PIL import Image

import train
from models.registry import get_entry
from tests.test_convnext import convert
from tests.torch_ref import check_cut_points, dclsify, random_images, randomize_params
from dcls_jax.optim import path_names
from evaluation import training

NAME = "convnext_tiny_dcls_gauss"
REDUCED = dict(depths=(2, 1, 2, 1))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("convnext_tiny", **overrides)
    dclsify([[(block, "conv_dw") for block in stage.blocks] for stage in model.stages],
            kernel_count=26, dilated_kernel_size=23, version="gauss", seed=seed)
    randomize_params(model, ("P",), seed=seed + 1, scale=5.0)     # spread over the 23 x 23 grid
    randomize_params(model, ("SIG",), seed=seed + 3, scale=0.5)   # (init 0.23 everywhere)
    randomize_params(model, ("gamma",), seed=seed)
    randomize_params(model, ("bias",), seed=seed + 2, scale=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
    return model.eval()


def test_registry_entry():
    entry = get_entry(NAME)
    assert entry.checkpoint.url == "https://zenodo.org/record/8029747/files/convnext_dcls_gauss_tiny_1k_224_ema.pth"
    assert entry.checkpoint.key == "model" and entry.target_layer == "stages.3"


def test_matches_timm_dcls_gauss(tmp_path):
    """Logits and every cut point, from the FAIR-named state dict (the published checkpoint's layout); the
    reference's P and SIG are shared per stage, so the checkpoint repeats them under every block's key."""
    ref = reference(**REDUCED)
    sd = ref.state_dict()
    assert torch.equal(sd["stages.2.blocks.1.conv_dw.SIG"], sd["stages.2.blocks.0.conv_dw.SIG"])
    model = convert(NAME, ref, tmp_path / "model.pth", fair=True, **REDUCED)
    layer = model.stages[2].blocks[1].conv_dw
    assert layer.version == "gauss" and layer.dilated_kernel_size == (23, 23) and layer.padding == (11, 11)
    assert layer.P is model.stages[2].blocks[0].conv_dw.P and layer.SIG is model.stages[2].blocks[0].conv_dw.SIG
    layers = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
    check_cut_points(model, ref, random_images(64), {name: name for name in layers}, "stages.3")


def _folder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(4):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(n):
                img = np.full((36, 40, 3), 30, np.uint8)
                img[..., c % 3] = 200
                img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG")
                (root / split / f"class{c}" / f"{i}.JPEG").write_bytes(buf.getvalue())
    return str(root)


def test_config_trains_a_step(tmp_path):
    """configs/gauss.py:runlocal at toy size: P and SIG (both in the position group) move and are not clamped."""
    kwargs = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_count": 3, "dilated_kernel_size": 3}
    sets = [f"data_dir={_folder(tmp_path / 'data')}", "num_classes=4", f"model_kwargs={kwargs}", "batch_size=8",
            "total_steps=2", "warmup_steps=0", "lr=0.05", "lr_base_batch=0", "position_lr_mult=100",
            "val_split=none", "log_every=1", "checkpoint_every=0", f"workdir={tmp_path / 'work'}"]
    argv = ["--config", os.path.join(ROOT, "configs", "gauss.py:runlocal")]
    for s in sets:
        argv += ["--set", s]
    _, cfg = train.parse_args(argv)
    assert cfg.model == NAME and not cfg.clamp_positions
    init = nnx.state(training.build_model(cfg), nnx.Param)
    init = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(init)}
    state, _ = train.main(argv)
    final = {".".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for k in ("stages.1.blocks.0.conv_dw.P", "stages.1.blocks.0.conv_dw.SIG"):
        assert not np.array_equal(final["params." + k], init[k]), k
    assert np.abs(final["params.stages.1.blocks.0.conv_dw.P"]).max() > 1   # moved past +-d//2: no clamp
    assert all(np.isfinite(v).all() for v in final.values() if v.dtype.kind == "f")


def test_config_arguments():
    from configs.gauss import get_config
    assert get_config().model == NAME and get_config("runlocal").model == NAME
    with pytest.raises(ValueError, match="tiny or runlocal"):
        get_config("small")
