"""ConvNeXt T/S/B (Liu et al. 2022) as timm 1.0.31 defines it, and the DCLS variants of the ICLR 2023 paper.

Attribute names follow timm's state-dict paths (`stem.0`, `stages.1.downsample.1`,
`stages.2.blocks.5.conv_dw`, `head.norm`, `head.fc`), so a timm state dict maps one to one onto
`nnx.state(model)`. The depthwise convolution of every block is an injected factory: the plain models use a 7x7
Conv2d; the `_dcls` models a `dcls_jax.Dcls2d` (dilated kernel 17, version "v0") whose positions are shared
within each stage; `convnext_tiny_dcls_gauss` a Dcls2d "gauss" (23 / 26) sharing P and SIG per stage (arXiv
2306.00817). `remap_keys` maps the original FAIR (and ConvNeXt-dcls) state-dict names to timm's.
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

from dcls_jax import Dcls2d
from models.layers import (Conv2d, CutModel, DropPath, Dropout, LayerNorm, Linear, Mlp, Sequential, gelu,
                           global_avg_pool, identity, share_positions, trunc_normal)
from models.entry import Checkpoint, Entry, infer_kernel_count, override, register

zeros = jax.nn.initializers.zeros


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
    kernel_size: int = 7                 # the plain depthwise conv
    kernel_count: int = 34               # the DCLS depthwise conv (`_dcls` models): elements per kernel
    dilated_kernel_size: int = 17        # ... and the size of the dense kernel they are placed in

    @classmethod
    def tiny(cls, **kw):
        return cls(**kw)

    @classmethod
    def small(cls, **kw):
        return cls(**{"depths": (3, 3, 27, 3), "kernel_count": 40, **kw})

    @classmethod
    def base(cls, **kw):
        return cls(**{"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024), "kernel_count": 40, **kw})


def dense_conv_dw(cfg: Config) -> Callable[..., nnx.Module]:
    """The plain depthwise conv factory: kxk Conv2d, trunc_normal(.02) weight, zero bias (timm's init)."""
    return functools.partial(Conv2d, kernel_size=cfg.kernel_size, padding=cfg.kernel_size // 2,
                             weight_init=trunc_normal(0.02), bias_init=zeros)


def dcls_conv_dw(cfg: Config, version: str = "v0") -> Callable[..., nnx.Module]:
    """The DCLS depthwise conv factory of ConvNeXt-dcls: Dcls2d (v0; "gauss" for the Gaussian models), weight
    trunc_normal(.02), zero bias (as that repository's `_init_weights`); its positions keep Dcls2d's own init
    N(0, 0.5) clamped to +-d//2 (and SIG 0.23 for gauss)."""
    def build(in_channels, out_channels, *, groups, rngs, P=None, SIG=None):
        layer = Dcls2d(in_channels, out_channels, kernel_count=cfg.kernel_count,
                       dilated_kernel_size=cfg.dilated_kernel_size, padding=cfg.dilated_kernel_size // 2,
                       groups=groups, bias=True, version=version, rngs=rngs, P=P, SIG=SIG)
        layer.weight.set_value(trunc_normal(0.02)(rngs.params(), layer.weight.get_value().shape))
        layer.bias.set_value(jnp.zeros_like(layer.bias.get_value()))
        return layer
    return build


class Block(nnx.Module):
    """conv_dw -> LayerNorm -> Linear -> GELU -> Linear -> * gamma -> drop_path, plus the residual."""

    def __init__(self, dim: int, conv_dw: Callable[..., nnx.Module], cfg: Config, drop_path: float, *,
                 rngs: nnx.Rngs):
        self.conv_dw = conv_dw(dim, dim, groups=dim, rngs=rngs)
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

    def __init__(self, in_dim: int, dim: int, stride: int, conv_dw: Callable[..., nnx.Module], cfg: Config,
                 drop_paths: list[float], *, rngs: nnx.Rngs):
        if in_dim != dim or stride > 1:
            self.downsample = Sequential([
                LayerNorm(in_dim, eps=1e-6),
                Conv2d(in_dim, dim, stride, stride=stride, rngs=rngs, weight_init=trunc_normal(0.02),
                       bias_init=zeros)])
        else:
            self.downsample = identity
        conv_dw = share_positions(conv_dw)
        self.blocks = Sequential([Block(dim, conv_dw, cfg, dp, rngs=rngs) for dp in drop_paths])

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
    """ConvNeXt on NHWC inputs. `conv_dw(in, out, *, groups, rngs[, P]) -> module` builds the depthwise convs.
    Cut points: the stem and each stage; the CAM target is the last stage's output, before the head's norm."""

    layer_names = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
    target_layer = "stages.3"

    def __init__(self, cfg: Config = Config(), *, conv_dw: Callable[..., nnx.Module] | None = None,
                 rngs: nnx.Rngs):
        if len(cfg.depths) != 4 or len(cfg.dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 depths and 4 dims, got depths={cfg.depths} dims={cfg.dims}")
        conv_dw = conv_dw or dense_conv_dw(cfg)
        self.config = cfg
        self.stem = Sequential([
            Conv2d(3, cfg.dims[0], 4, stride=4, rngs=rngs, weight_init=trunc_normal(0.02), bias_init=zeros),
            LayerNorm(cfg.dims[0], eps=1e-6)])
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = np.cumsum((0,) + tuple(cfg.depths))
        dims_in = (cfg.dims[0],) + tuple(cfg.dims[:-1])
        self.stages = Sequential([
            Stage(dims_in[i], cfg.dims[i], 1 if i == 0 else 2, conv_dw, cfg, rates[starts[i]:starts[i + 1]],
                  rngs=rngs)
            for i in range(4)])
        self.head = Head(cfg.dims[-1], cfg, rngs=rngs)

    def _parts(self):
        return (self.stem, *self.stages)


# ---------------------------------------------------------------------------------------------------------------
# Registry entries

def _build(preset: Config, conv_dw: Callable[[Config], Callable[..., nnx.Module]], *, rngs: nnx.Rngs,
           **overrides) -> ConvNeXt:
    cfg = override(preset, overrides)
    return ConvNeXt(cfg, conv_dw=conv_dw(cfg), rngs=rngs)


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
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _FAIR_RULES:
            new = pattern.sub(repl, new)
        if new in out:
            raise ValueError(f"state-dict keys collide after renaming: {key!r} -> {new!r}")
        out[new] = value
    return out


_FAIR_URL = "https://dl.fbaipublicfiles.com/convnext/convnext_{}_1k_224_ema.pth"
_DCLS_URL = "https://zenodo.org/record/7112021/files/convnext_dcls_{}_1k_224_ema.pth"


def _register(name: str, config: Config, conv_dw, url: str, *, dcls: bool, in_study: bool = True):
    register(Entry(
        name=name,
        builder=functools.partial(_build, config, conv_dw),
        family="convnext",
        target_layer=ConvNeXt.target_layer,
        resize_size=256,
        input_size=224,
        checkpoint=Checkpoint(url=url, key="model", filename=url.rsplit("/", 1)[1]),
        remap_keys=remap_keys,
        infer_overrides=infer_kernel_count("stages.0.blocks.0.conv_dw.weight") if dcls else None,
        in_study=in_study,
    ))


for _size in ("tiny", "small", "base"):
    _register(f"convnext_{_size}", getattr(Config, _size)(), dense_conv_dw, _FAIR_URL.format(_size), dcls=False)
    _register(f"convnext_{_size}_dcls", getattr(Config, _size)(), dcls_conv_dw, _DCLS_URL.format(_size), dcls=True)


# Gaussian-interpolation ConvNeXt-dcls (arXiv 2306.00817): every depthwise conv -> Dcls2d "gauss", 23 x 23 with 26
# taps, P and SIG shared per stage. Only the tiny model is published (FAIR key layout, inside "model"); small and
# base would have no checkpoint, so only tiny is registered. Not one of the study's 16 (`--models all`).
_GAUSS_URL = "https://zenodo.org/record/8029747/files/convnext_dcls_gauss_{}_1k_224_ema.pth"
_register("convnext_tiny_dcls_gauss", Config.tiny(kernel_count=26, dilated_kernel_size=23),
          functools.partial(dcls_conv_dw, version="gauss"), _GAUSS_URL.format("tiny"), dcls=True, in_study=False)
