"""ConvNeXt T/S/B (Liu et al. 2022) as timm 1.0.31 defines it, and the DCLS variants of the ICLR 2023 paper.

Attribute names follow timm's state-dict paths (`stem.0`, `stages.1.downsample.1`,
`stages.2.blocks.5.conv_dw`, `head.norm`, `head.fc`), so a timm state dict maps one to one onto
`nnx.state(model)`. The depthwise convolution of every block is `Config.conv` (a `models.layers.ConvSpec`):
the plain models use a 7x7 Conv2d; the `_dcls` models a `dcls_jax.Dcls2d` (dilated kernel 17, version "v0") whose
positions are shared within each stage; `convnext_tiny_dcls_gauss` a Dcls2d "gauss" (23 / 26) sharing P and SIG
per stage (arXiv 2306.00817). `remap_keys` maps the original FAIR (and ConvNeXt-dcls) state-dict names to timm's.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (Conv2d, ConvSpec, CutModel, DropPath, Dropout, LayerNorm, Linear, Mlp, Sequential, gelu,
                           build_stages, check_stages, global_avg_pool, identity, share_positions,
                           trunc_normal)
from models.entry import (TEST_CLASSES, Checkpoint, Entry, build, infer_kernel_count, register, register_test,
                          rename_keys)

zeros = jax.nn.initializers.zeros


DENSE = ConvSpec.dense(7)                                  # the plain models' 7x7 conv_dw
# ConvNeXt-dcls: 34 (tiny) or 40 (small, base) taps in a 17x17 kernel, trunc_normal(.02) weights as that repository
# initialises them; the Gaussian model (arXiv 2306.00817): 26 taps in 23x23, P and SIG shared per stage.
DCLS = {size: ConvSpec.dcls(count, 17, "v0", "trunc_normal") for size, count in (("tiny", 34), ("small", 40),
                                                                                 ("base", 40))}
GAUSS = ConvSpec.dcls(26, 23, "gauss", "trunc_normal")


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6   # layer-scale `gamma` init; None: no layer scale
    head_init_scale: float = 1.0
    drop_rate: float = 0.0               # dropout before the classifier
    drop_path_rate: float = 0.0          # stochastic depth, linear in the block index from 0 to this
    conv: ConvSpec = DENSE               # every block's depthwise conv_dw (models.layers.ConvSpec)

    @classmethod
    def tiny(cls, **kw):
        return cls(**kw)

    @classmethod
    def small(cls, **kw):
        return cls(**{"depths": (3, 3, 27, 3), **kw})

    @classmethod
    def base(cls, **kw):
        return cls(**{"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024), **kw})


class Block(nnx.Module):
    """conv_dw -> LayerNorm -> Linear -> GELU -> Linear -> * gamma -> drop_path, plus the residual."""

    def __init__(self, dim: int, conv: Callable[..., nnx.Module], cfg: Config, drop_path: float, *,
                 rngs: nnx.Rngs):
        self.conv_dw = conv(dim, dim, groups=dim, bias=True, rngs=rngs, weight_init=trunc_normal(0.02),
                            bias_init=zeros)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(cfg.mlp_ratio * dim), act=gelu, rngs=rngs, weight_init=trunc_normal(0.02),
                       bias_init=zeros)
        self.gamma = nnx.Param(jnp.full((dim,), cfg.ls_init_value)) if cfg.ls_init_value is not None else None
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        y = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        return x + self.drop_path(y)


class Stage(nnx.Module):
    """Downsample (LayerNorm + stride x stride conv; none in the first stage), then blocks whose depthwise convs
    share DCLS positions (the first block's conv owns them)."""

    def __init__(self, in_dim: int, dim: int, stride: int, cfg: Config, drop_paths: list[float], *,
                 rngs: nnx.Rngs):
        if in_dim != dim or stride > 1:
            self.downsample = Sequential([
                LayerNorm(in_dim, eps=1e-6),
                Conv2d(in_dim, dim, stride, stride=stride, rngs=rngs, weight_init=trunc_normal(0.02),
                       bias_init=zeros)])
        else:
            self.downsample = identity
        conv = share_positions(cfg.conv)
        self.blocks = Sequential([Block(dim, conv, cfg, dp, rngs=rngs) for dp in drop_paths])

    def __call__(self, x):
        return self.blocks(self.downsample(x))


class Head(nnx.Module):
    """timm's NormMlpClassifierHead without hidden layer: global average pool -> LayerNorm -> dropout -> fc."""

    def __init__(self, dim: int, cfg: Config, *, rngs: nnx.Rngs):
        s = cfg.head_init_scale
        self.norm = LayerNorm(dim, eps=1e-6)
        self.drop = Dropout(cfg.drop_rate, rngs=rngs)
        self.fc = Linear(dim, cfg.num_classes, rngs=rngs,
                         weight_init=lambda k, shape, dtype=jnp.float32: s * trunc_normal(0.02)(k, shape, dtype),
                         bias_init=zeros)

    def __call__(self, x, pre_logits: bool = False):
        x = self.drop(self.norm(global_avg_pool(x)))
        return x if pre_logits else self.fc(x)


class ConvNeXt(CutModel):
    """ConvNeXt on NHWC inputs (the surface: `models.layers.CutModel`); `cfg.conv` builds the depthwise convs.
    Cut points: the stem and each stage. CAM target: the last stage's output, before the head's norm."""

    layer_names = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
    target_layer = "stages.3"

    def __init__(self, cfg: Config = Config(), *, rngs: nnx.Rngs):
        check_stages("ConvNeXt", cfg, ("depths", "dims"))
        self.config = cfg
        self.stem = Sequential([
            Conv2d(3, cfg.dims[0], 4, stride=4, rngs=rngs, weight_init=trunc_normal(0.02), bias_init=zeros),
            LayerNorm(cfg.dims[0], eps=1e-6)])
        self.stages = build_stages(
            cfg, lambda i, dim_in, rates: Stage(dim_in, cfg.dims[i], 1 if i == 0 else 2, cfg, rates, rngs=rngs))
        self.head = Head(cfg.dims[-1], cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Registry entries

_build = functools.partial(build, model_cls=ConvNeXt)  # (preset, *, rngs, **overrides) -> ConvNeXt


# Original FAIR ConvNeXt (and ConvNeXt-dcls) names -> timm names, as timm's `checkpoint_filter_fn`. Every rule is
# anchored so that it cannot match a timm name: the mapping is the identity on timm state dicts.
_FAIR_RULES = (
    (re.compile(r"^downsample_layers\.0\.(\d+)\."), r"stem.\1."),
    (re.compile(r"^downsample_layers\.(\d+)\.(\d+)\."), r"stages.\1.downsample.\2."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv(\d)\."), r".mlp.fc\1."),
    (re.compile(r"^norm\."), "head.norm."),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
)


def remap_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FAIR ConvNeXt / ConvNeXt-dcls key names -> timm names (identity on timm names). FAIR's pointwise convs are
    already Linear (2-D) weights and its layer norms have timm's shapes, so values pass through unchanged."""
    return rename_keys(state_dict, _FAIR_RULES)


_FAIR_URL = "https://dl.fbaipublicfiles.com/convnext/convnext_{}_1k_224_ema.pth"
_DCLS_URL = "https://zenodo.org/record/7112021/files/convnext_dcls_{}_1k_224_ema.pth"


def _register(name: str, config: Config, url: str | None, *, test: bool = False, in_study: bool = True):
    infer = infer_kernel_count("stages.0.blocks.0.conv_dw.weight") if config.conv.is_dcls else None
    fields = dict(remap_keys=remap_keys, infer_overrides=infer)
    if test:
        register_test(name, functools.partial(_build, config), "convnext", ConvNeXt.target_layer, **fields)
        return
    register(Entry(name=name, builder=functools.partial(_build, config), family="convnext",
                   target_layer=ConvNeXt.target_layer, resize_size=256, input_size=224,
                   checkpoint=Checkpoint(url=url, key="model", filename=url.rsplit("/", 1)[1]), in_study=in_study,
                   **fields))


for _size in ("tiny", "small", "base"):
    _register(f"convnext_{_size}", getattr(Config, _size)(), _FAIR_URL.format(_size))
    _register(f"convnext_{_size}_dcls", getattr(Config, _size)(conv=DCLS[_size]), _DCLS_URL.format(_size))


# Gaussian-interpolation ConvNeXt-dcls (arXiv 2306.00817): every depthwise conv -> Dcls2d "gauss", 23 x 23 with 26
# taps, P and SIG shared per stage. Only the tiny model is published (FAIR key layout, inside "model"); small and
# base would have no checkpoint, so only tiny is registered. Not one of the study's 16 (`--models all`).
_GAUSS_URL = "https://zenodo.org/record/8029747/files/convnext_dcls_gauss_{}_1k_224_ema.pth"
_register("convnext_tiny_dcls_gauss", Config.tiny(conv=GAUSS), _GAUSS_URL.format("tiny"), in_study=False)

# Tiny variants for tests (models.entry.register_test): one block per stage, 8..32 wide, small DCLS kernels.
_TEST = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=TEST_CLASSES)
for _name, _conv in (("test_convnext", DENSE), ("test_convnext_dcls", ConvSpec.dcls(5, 7, "v0", "trunc_normal"))):
    _register(_name, Config(**_TEST, conv=_conv), None, test=True)
