"""CAFormer-S18 and ConvFormer-S18 (MetaFormer baselines, Yu et al. 2022) as timm 1.0.31 defines them, and their
DCLS variants (Chamas et al. 2024).

Attribute names follow timm's state-dict paths (`stem.conv`, `stages.1.downsample.norm`,
`stages.2.blocks.4.token_mixer.qkv`, `head.fc.fc2`), so a timm state dict maps one to one onto `nnx.state(model)`.
timm runs the non-attention stages in NCHW with 1x1-conv MLPs and the attention stages on tokens with Linear
MLPs; here every stage is NHWC, and the parameters keep timm's shapes (1x1 conv weights (O, I, 1, 1) in the
SepConv stages, Linear weights (O, I) in the attention stages). ConvFormer and CAFormer differ only in their
per-stage token mixers. The depthwise conv of every SepConv is `Config.conv` (a `models.layers.ConvSpec`): the
plain models use timm's 7x7 Conv2d, the `_dcls` models a `dcls_jax.Dcls2d` (dilated kernel 17, version "v1")
whose positions are shared within each stage. `remap_keys` maps the original sail-sg MetaFormer state-dict names
to timm's.
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

from dcls_jax.dense import star_relu
import models.layers as layers
from models.layers import (Conv2d, ConvSpec, CutModel, DropPath, Dropout, LayerNorm, Linear, Mlp, Sequential,
                           build_stages, check_stages, cut_cotangent, global_avg_pool, identity, share_positions,
                           trunc_normal)
from models.entry import TEST_CLASSES, Checkpoint, Entry, build, register, register_test, rename_keys

zeros = jax.nn.initializers.zeros
INIT = {"weight_init": trunc_normal(0.02), "bias_init": zeros}   # timm MetaFormer._init_weights
DENSE = ConvSpec.dense(7)                                         # timm's SepConv: 7x7
# The study's DCLS SepConvs (`replace_depthwise_dcls_metaformers`): Dcls2d v1 in 17x17, weight N(0, .02), with 40
# (ConvFormer) or 34 (CAFormer) taps.
DCLS = {"convformer": ConvSpec.dcls(40, 17, "v1"), "caformer": ConvSpec.dcls(34, 17, "v1")}


@dataclasses.dataclass(frozen=True)
class Config:
    """MetaFormer hyper-parameters (timm's MetaFormer arguments); the presets are timm's S18 models."""
    token_mixers: tuple[type, ...] = ()  # per stage: SepConv or Attention (see the presets)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (64, 128, 320, 512)
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    head_dim: int = 32                                   # Attention
    layer_scale_init_values: tuple[float | None, ...] = (None, None, None, None)   # None: no layer scale
    res_scale_init_values: tuple[float | None, ...] = (None, None, 1.0, 1.0)       # None: no res scale
    drop_rate: float = 0.0               # dropout before the MLP head
    proj_drop_rate: float = 0.0          # dropout in the MLPs and after the attention projection
    drop_path_rate: float = 0.0          # stochastic depth, linear in the block index from 0 to this
    conv: ConvSpec = DENSE               # every SepConv's depthwise dwconv (models.layers.ConvSpec)

    @classmethod
    def convformer_s18(cls, **kw):
        return cls(**{"token_mixers": (SepConv,) * 4, **kw})

    @classmethod
    def caformer_s18(cls, **kw):
        return cls(**{"token_mixers": (SepConv, SepConv, Attention, Attention), **kw})


def squared_relu(x):
    return jnp.square(jax.nn.relu(x))


class StarReLU(nnx.Module):
    """s * relu(x)**2 + b with learnable scalars `scale` (1,) and `bias` (1,)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        self.scale = nnx.Param(jnp.full((1,), scale_value))
        self.bias = nnx.Param(jnp.full((1,), bias_value))

    def __call__(self, x):
        return star_relu(x, self.scale[...].astype(x.dtype), self.bias[...].astype(x.dtype))

    def linear_activation(self):
        """This activation as dcls_jax.linear takes it (Mlp runs fc1 and it in one call)."""
        return ("star_relu", self.scale[...], self.bias[...])


class Scale(nnx.Module):
    """Per-channel learnable scale `scale` (dim,) (layer scale / res scale)."""

    def __init__(self, dim: int, init_value: float):
        self.scale = nnx.Param(jnp.full((dim,), init_value))

    def __call__(self, x):
        return x * self.scale[...].astype(x.dtype)


class SepConv(nnx.Module):
    """Inverted separable conv (MobileNetV2): 1x1 conv -> StarReLU -> depthwise conv -> 1x1 conv, no biases."""

    def __init__(self, dim: int, *, conv: Callable[..., nnx.Module], rngs: nnx.Rngs, expansion_ratio: float = 2,
                 **_):
        mid = int(expansion_ratio * dim)
        self.pwconv1 = Conv2d(dim, mid, 1, bias=False, rngs=rngs, **INIT)
        self.act1 = StarReLU()
        self.dwconv = conv(mid, mid, groups=mid, bias=False, rngs=rngs, weight_init=INIT["weight_init"])
        self.pwconv2 = Conv2d(mid, dim, 1, bias=False, rngs=rngs, **INIT)

    def __call__(self, x):
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class Attention(layers.Attention):
    """timm MetaFormer's Attention: heads of `head_dim` channels, no qkv or proj biases."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, head_dim: int = 32, proj_drop: float = 0.0, **_):
        super().__init__(dim, head_dim, qkv_bias=False, proj_bias=False, proj_drop=proj_drop, rngs=rngs, **INIT)


class MetaFormerBlock(nnx.Module):
    """x = res_scale1(x) + layer_scale1(drop_path(token_mixer(norm1(x)))); then the same with norm2 and mlp."""

    def __init__(self, dim: int, token_mixer: type, conv: Callable[..., nnx.Module], cfg: Config,
                 drop_path: float, layer_scale: float | None, res_scale: float | None, *, rngs: nnx.Rngs):
        def scale(value):
            return identity if value is None else Scale(dim, value)

        self.norm1 = LayerNorm(dim, eps=1e-6, bias=False)
        self.token_mixer = token_mixer(dim, conv=conv, head_dim=cfg.head_dim, proj_drop=cfg.proj_drop_rate,
                                       rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.layer_scale1, self.res_scale1 = scale(layer_scale), scale(res_scale)
        self.norm2 = LayerNorm(dim, eps=1e-6, bias=False)
        # timm's NCHW (non-attention) stages use 1x1-conv MLPs: same maths, weights (O, I, 1, 1).
        self.mlp = Mlp(dim, int(cfg.mlp_ratio * dim), act=StarReLU(), bias=False, drop=cfg.proj_drop_rate,
                       use_conv=not issubclass(token_mixer, Attention), rngs=rngs, **INIT)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)
        self.layer_scale2, self.res_scale2 = scale(layer_scale), scale(res_scale)

    def __call__(self, x):
        x = cut_cotangent(x)
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        x = cut_cotangent(x)
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))


class Stem(nnx.Module):
    """7x7 stride-4 conv (padding 2) -> LayerNorm without bias."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(in_channels, out_channels, 7, stride=4, padding=2, rngs=rngs, **INIT)
        self.norm = LayerNorm(out_channels, eps=1e-6, bias=False)

    def __call__(self, x):
        return self.norm(self.conv(x))


class Downsampling(nnx.Module):
    """LayerNorm without bias -> 3x3 stride-2 conv (padding 1)."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(in_channels, eps=1e-6, bias=False)
        self.conv = Conv2d(in_channels, out_channels, 3, stride=2, padding=1, rngs=rngs, **INIT)

    def __call__(self, x):
        return self.conv(self.norm(x))


class MetaFormerStage(nnx.Module):
    """Downsampling (when the width changes), then blocks whose depthwise convs share DCLS positions (the first
    block's conv owns them)."""

    def __init__(self, i: int, in_dim: int, cfg: Config, drop_paths: list[float], *, rngs: nnx.Rngs):
        dim = cfg.dims[i]
        self.downsample = identity if in_dim == dim else Downsampling(in_dim, dim, rngs=rngs)
        conv = share_positions(cfg.conv)
        self.blocks = Sequential([
            MetaFormerBlock(dim, cfg.token_mixers[i], conv, cfg, dp, cfg.layer_scale_init_values[i],
                            cfg.res_scale_init_values[i], rngs=rngs)
            for dp in drop_paths])

    def __call__(self, x):
        return self.blocks(self.downsample(x))


class MlpHead(nnx.Module):
    """fc1 -> SquaredReLU -> LayerNorm -> dropout (timm: rate 0) -> fc2."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs):
        hidden = int(mlp_ratio * dim)
        self.fc1 = Linear(dim, hidden, rngs=rngs, **INIT)
        self.norm = LayerNorm(hidden, eps=1e-6)
        self.fc2 = Linear(hidden, num_classes, rngs=rngs, **INIT)

    def __call__(self, x):
        return self.fc2(self.norm(squared_relu(self.fc1(x))))


class Head(nnx.Module):
    """Global average pool -> LayerNorm -> dropout -> MlpHead (no MlpHead when num_classes == 0)."""

    def __init__(self, dim: int, cfg: Config, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(dim, eps=1e-6)
        self.drop = Dropout(cfg.drop_rate, rngs=rngs)
        self.fc = MlpHead(dim, cfg.num_classes, rngs=rngs) if cfg.num_classes > 0 else identity

    def __call__(self, x, pre_logits: bool = False):
        x = self.drop(self.norm(global_avg_pool(x)))
        return x if pre_logits else self.fc(x)


class MetaFormer(CutModel):
    """MetaFormer on NHWC inputs (the surface: `models.layers.CutModel`); `cfg.conv` builds SepConv's depthwise
    convs. Cut points: the stem and each stage. CAM target: the last stage's output, before the head's norm."""

    layer_names = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
    target_layer = "stages.3"

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        check_stages("MetaFormer", cfg, ("depths", "dims", "token_mixers", "layer_scale_init_values",
                                         "res_scale_init_values"))
        self.config = cfg
        self.stem = Stem(3, cfg.dims[0], rngs=rngs)
        self.stages = build_stages(cfg, lambda i, dim_in, rates: MetaFormerStage(i, dim_in, cfg, rates, rngs=rngs))
        self.head = Head(cfg.dims[-1], cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Registry entries

_build = functools.partial(build, model_cls=MetaFormer)  # (preset, *, rngs, **overrides) -> MetaFormer


# sail-sg MetaFormer names -> timm names, as timm's `checkpoint_filter_fn` (which leaves timm names alone).
_SAIL_RULES = (
    (re.compile(r"^downsample_layers\.(\d+)\."), r"stages.\1.downsample."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"^stages\.0\.downsample\."), "stem."),
    (re.compile(r"\.(pre|post)_norm\."), ".norm."),
    (re.compile(r"^head\."), "head.fc."),
    (re.compile(r"^norm\."), "head.norm."),
)
# sail-sg's pointwise convs and MLPs are Linear layers; timm's are 1x1 convs except the MLPs of attention blocks.
_POINTWISE = re.compile(r"^(stages\.\d+\.blocks\.\d+)\.(token_mixer\.pwconv[12]|mlp\.fc[12])\.weight$")


def remap_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """sail-sg MetaFormer key names and Linear weights -> timm names and shapes (identity on timm state dicts)."""
    if "stem.conv.weight" in state_dict:
        return dict(state_dict)
    out = rename_keys(state_dict, _SAIL_RULES)
    for key, value in out.items():
        m = _POINTWISE.match(key)
        if m and np.ndim(value) == 2 and (m[2].startswith("token_mixer")
                                          or f"{m[1]}.token_mixer.qkv.weight" not in out):
            out[key] = value[:, :, None, None]
    return out


_SAIL = "https://huggingface.co/sail/dl/resolve/main/{0}/{0}_s18.pth"
_DCLS = "https://zenodo.org/record/8370737/files/{}"

for _arch, _dcls_file in (("caformer", "caformer_s18_v1_17lim_34el_seed0.pth.tar"),
                          ("convformer", "convformer_s18_v1_17lim_40el_seed0.pth.tar")):
    _preset = getattr(Config, f"{_arch}_s18")
    for _suffix, _conv, _ckpt in (
            ("", DENSE, Checkpoint(url=_SAIL.format(_arch), key=None, filename=f"{_arch}_s18.pth")),
            ("_dcls", DCLS[_arch], Checkpoint(url=_DCLS.format(_dcls_file), key="state_dict_ema",
                                              filename=_dcls_file))):
        register(Entry(
            name=f"{_arch}_s18{_suffix}",
            builder=functools.partial(_build, _preset(conv=_conv)),
            family="metaformer",
            target_layer=MetaFormer.target_layer,
            resize_size=224,
            input_size=224,
            checkpoint=_ckpt,
            remap_keys=remap_keys,
        ))
    # Tiny variants for tests (models.entry.register_test): one block per stage, 8..32 wide, DCLS 5 taps in 7x7.
    for _suffix, _conv in (("", DENSE), ("_dcls", ConvSpec.dcls(5, 7, "v1"))):
        _tiny = _preset(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), num_classes=TEST_CLASSES, conv=_conv)
        register_test(f"test_{_arch}{_suffix}", functools.partial(_build, _tiny), "metaformer",
                      MetaFormer.target_layer, remap_keys=remap_keys)
