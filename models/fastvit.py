"""FastViT SA24/SA36 (Vasu et al. 2023) as timm 1.0.31 defines it, and the DCLS variants of the Grad-CAM study.

Attribute names follow timm's state-dict paths (`stem.0.conv_kxk.0.conv`, `stages.1.downsample.proj.0.large_conv`,
`stages.3.pos_emb.pos_enc`, `stages.2.blocks.5.mlp.conv.conv`, `final_conv`, `head.fc`), so a timm state dict maps
one to one onto `nnx.state(model)`; `remap_keys` maps apple/ml-fastvit names (`patch_embed`, `network.N`,
`rbr_conv`, `conv_exp`, ...) to them.

Train-time form: MobileOne blocks (conv_kxk + conv_scale + identity-BN branches), RepLK conv (large + small
branch), RepMixer (mixer - norm, layer scale) and RepCPE (pos_enc + x). `inference_mode=True` builds the
reparameterised form (one `reparam_conv` each); `reparameterize(model)` computes it from a train-form model as
timm's `reparameterize` methods do and returns a new model (the argument is left unchanged).

The 7x7 depthwise convs of ConvMlp (ConvFFN) and RepCPE are `Config.conv` (a `models.layers.ConvSpec`): a Conv2d or
a Dcls2d (v1, 34 elements in a 17x17 kernel), positions shared per stage: the first DCLS layer of a stage
(stage 3: RepCPE's) owns P, the others use it. With DCLS, reparameterisation folds RepCPE's identity into the
dense 17x17 DCLS kernel (a plain 17x17 depthwise conv, as timm's RepCPE with spatial_shape 17 gives; timm's own
`reparameterize_model` cannot do this and raises); the ConvMlp DCLS convs stay DCLS, as timm leaves ConvMlp as is.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (Attention, BatchNorm2d, Conv2d, ConvSpec, CutModel, DropPath, Dropout, Linear, Mlp,
                           Sequential, check_stages, cut_cotangent, drop_path_rates, gelu, global_avg_pool, identity,
                           share_positions, trunc_normal)
from models.entry import TEST_CLASSES, Checkpoint, Entry, build, register, register_test, rename_keys

zeros = jax.nn.initializers.zeros


# ---------------------------------------------------------------------------------------------------------------
# Config

DENSE = ConvSpec.dense(7)                  # timm's 7x7 depthwise convs of ConvMlp and RepCPE
DCLS = ConvSpec.dcls(34, 17, "v1")         # the study's (`replace_depthwise_dcls`): 34 taps in 17x17, N(0, .02)


@dataclasses.dataclass(frozen=True)
class Config:
    layers: tuple[int, ...] = (4, 4, 12, 4)
    embed_dims: tuple[int, ...] = (64, 128, 256, 512)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention")
    pos_embs: tuple[bool, ...] = (False, False, False, True)      # a RepCPE before the stage's blocks
    downsamples: tuple[bool, ...] = (False, True, True, True)
    se_downsamples: tuple[bool, ...] = (False, False, False, False)
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    cls_ratio: float = 2.0
    num_classes: int = 1000
    drop_rate: float = 0.0               # dropout before the classifier
    proj_drop_rate: float = 0.0          # dropout in ConvMlp
    drop_path_rate: float = 0.0          # stochastic depth, linear in the block index from 0 to this
    layer_scale_init_value: float | None = 1e-5
    lkc_use_act: bool = False            # GELU after the RepLK conv (the original weights had none)
    stem_use_scale_branch: bool = True
    inference_mode: bool = False         # build the reparameterised form
    conv: ConvSpec = DENSE               # the depthwise convs of ConvMlp and RepCPE (models.layers.ConvSpec)

    @classmethod
    def sa24(cls, **kw):
        return cls(**kw)

    @classmethod
    def sa36(cls, **kw):
        # apple's fastvit_sa36 initialises layer scales at 1e-6 (timm leaves 1e-5; it only matters for training)
        return cls(**{"layers": (6, 6, 18, 6), "layer_scale_init_value": 1e-6, **kw})


# ---------------------------------------------------------------------------------------------------------------
# Blocks

def _pad(kernel_size: int, stride: int) -> int:
    """timm's get_padding: symmetric 'same'-ish padding."""
    return (stride - 1 + kernel_size - 1) // 2


def _make_divisible(v: float, divisor: int) -> int:
    """timm's make_divisible(v, divisor, round_limit=0.)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


# Reparameterisation is a host-side weight transform (numpy float32, as timm's in torch): `fused_kernel_bias()`
# gives a train-form module's equivalent (kernel, bias) without changing the module.

def _np(variable) -> np.ndarray:
    return np.asarray(variable[...], np.float32)


def _identity_kernel(channels: int, groups: int, kernel_size: int) -> np.ndarray:
    """The kernel (C, C/groups, k, k) of the identity map (timm's `id_tensor`)."""
    ig = channels // groups
    k = np.zeros((channels, ig, kernel_size, kernel_size), np.float32)
    k[np.arange(channels), np.arange(channels) % ig, kernel_size // 2, kernel_size // 2] = 1.0
    return k


def _pad_hw(kernel: np.ndarray, p: int) -> np.ndarray:
    return np.pad(kernel, ((0, 0), (0, 0), (p, p), (p, p)))


def _fuse_bn(kernel: np.ndarray, bn: BatchNorm2d):
    """(kernel * gamma / std, beta - mean * gamma / std), std = sqrt(running_var + eps)."""
    std = np.sqrt(_np(bn.running_var) + np.float32(bn.eps))
    t = _np(bn.weight) / std
    return kernel * t[:, None, None, None], _np(bn.bias) - _np(bn.running_mean) * t


class ConvNorm(nnx.Module):
    """timm ConvNormAct without activation: conv (no bias) -> BatchNorm."""

    def __init__(self, conv: nnx.Module, out_chs: int):
        self.conv = conv
        self.bn = BatchNorm2d(out_chs)

    def __call__(self, x):
        return self.bn(self.conv(x))

    def fused_kernel_bias(self):
        return _fuse_bn(_np(self.conv.weight), self.bn)


def conv_norm(in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int, *, rngs) -> ConvNorm:
    return ConvNorm(Conv2d(in_chs, out_chs, kernel_size, stride, _pad(kernel_size, stride), groups, bias=False,
                           rngs=rngs), out_chs)


def reparam_conv(in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int, *, rngs) -> Conv2d:
    return Conv2d(in_chs, out_chs, kernel_size, stride, _pad(kernel_size, stride), groups, bias=True, rngs=rngs)


class SqueezeExcite(nnx.Module):
    """timm SEModule: x * sigmoid(fc2(relu(fc1(mean_hw x)))), fc1/fc2 1x1 convs with bias."""

    def __init__(self, channels: int, rd_channels: int, *, rngs: nnx.Rngs):
        self.fc1 = Conv2d(channels, rd_channels, 1, rngs=rngs)
        self.fc2 = Conv2d(rd_channels, channels, 1, rngs=rngs)

    def __call__(self, x):
        s = self.fc2(jax.nn.relu(self.fc1(x.mean(axis=(1, 2), keepdims=True))))
        return x * jax.nn.sigmoid(s)


class MobileOneBlock(nnx.Module):
    """MobileOne block: identity-BN + 1x1 conv_scale + kxk conv_kxk branches (or one reparam_conv), SE, act."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                 inference_mode: bool = False, use_se: bool = False, use_act: bool = True,
                 use_scale_branch: bool = True, num_conv_branches: int = 1, rngs: nnx.Rngs):
        self.in_chs, self.groups, self.kernel_size = in_chs, groups, kernel_size
        self.se = (SqueezeExcite(out_chs, _make_divisible(out_chs / 16, 1), rngs=rngs) if use_se else identity)
        self.act = gelu if use_act else identity
        if inference_mode:
            self.reparam_conv = reparam_conv(in_chs, out_chs, kernel_size, stride, groups, rngs=rngs)
            self.identity = self.conv_kxk = self.conv_scale = None
            return
        self.reparam_conv = None
        self.identity = BatchNorm2d(in_chs) if out_chs == in_chs and stride == 1 else None
        self.conv_kxk = (Sequential([conv_norm(in_chs, out_chs, kernel_size, stride, groups, rngs=rngs)
                                     for _ in range(num_conv_branches)]) if num_conv_branches > 0 else None)
        self.conv_scale = (conv_norm(in_chs, out_chs, 1, stride, groups, rngs=rngs)
                           if kernel_size > 1 and use_scale_branch else None)

    def branches(self, x):
        """The linear part (before SE and activation)."""
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = 0
        if self.conv_scale is not None:
            out = self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        for branch in self.conv_kxk or ():
            out = out + branch(x)
        return out

    def __call__(self, x):
        return self.act(self.se(self.branches(x)))

    def fused_kernel_bias(self):
        """timm MobileOneBlock._get_kernel_bias: conv_kxk + padded conv_scale + identity, BN folded in."""
        kernel = bias = 0.0
        for branch in self.conv_kxk or ():
            k, b = branch.fused_kernel_bias()
            kernel, bias = kernel + k, bias + b
        if self.conv_scale is not None:
            k, b = self.conv_scale.fused_kernel_bias()
            p = self.kernel_size // 2
            kernel, bias = kernel + _pad_hw(k, p), bias + b
        if self.identity is not None:
            k, b = _fuse_bn(_identity_kernel(self.in_chs, self.groups, self.kernel_size), self.identity)
            kernel, bias = kernel + k, bias + b
        return kernel, bias


class ReparamLargeKernelConv(nnx.Module):
    """RepLK conv: large_conv (kxk + BN) + small_conv (3x3 + BN) (or one reparam_conv), SE, act."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int, small_kernel: int,
                 *, use_se: bool = False, use_act: bool = False, inference_mode: bool = False, rngs: nnx.Rngs):
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        if inference_mode:
            self.reparam_conv = reparam_conv(in_chs, out_chs, kernel_size, stride, groups, rngs=rngs)
            self.large_conv = self.small_conv = None
        else:
            self.reparam_conv = None
            self.large_conv = conv_norm(in_chs, out_chs, kernel_size, stride, groups, rngs=rngs)
            self.small_conv = conv_norm(in_chs, out_chs, small_kernel, stride, groups, rngs=rngs)
        self.se = SqueezeExcite(out_chs, _make_divisible(out_chs * 0.25, 8), rngs=rngs) if use_se else identity
        self.act = gelu if use_act else identity

    def __call__(self, x):
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x) + self.small_conv(x)
        return self.act(self.se(out))

    def fused_kernel_bias(self):
        k, b = self.large_conv.fused_kernel_bias()
        sk, sb = self.small_conv.fused_kernel_bias()
        p = (self.kernel_size - self.small_kernel) // 2
        return k + _pad_hw(sk, p), b + sb


class LayerScale2d(nnx.Module):
    """x * gamma, gamma (dim, 1, 1) as timm's NCHW LayerScale2d."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim, 1, 1), init_value, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...].reshape(-1).astype(x.dtype)


def _layer_scale(dim: int, init_value: float | None):
    return LayerScale2d(dim, init_value) if init_value is not None else identity


class RepMixer(nnx.Module):
    """x + layer_scale(mixer(x) - norm(x)) with 3x3 depthwise MobileOne blocks (or one reparam_conv)."""

    def __init__(self, dim: int, kernel_size: int, layer_scale_init_value: float | None, *,
                 inference_mode: bool = False, rngs: nnx.Rngs):
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = reparam_conv(dim, dim, kernel_size, 1, dim, rngs=rngs)
            self.norm = self.mixer = self.layer_scale = None
            return
        self.reparam_conv = None
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False, use_scale_branch=False,
                                   num_conv_branches=0, rngs=rngs)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False, rngs=rngs)
        self.layer_scale = _layer_scale(dim, layer_scale_init_value)

    def __call__(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def fused_kernel_bias(self):
        km, bm = self.mixer.fused_kernel_bias()
        kn, bn = self.norm.fused_kernel_bias()
        gamma = (_np(self.layer_scale.gamma) if isinstance(self.layer_scale, LayerScale2d) else
                 np.ones((self.dim, 1, 1), np.float32))
        eye = _identity_kernel(self.dim, self.dim, self.kernel_size)
        return eye + gamma[..., None] * (km - kn), gamma.reshape(-1) * (bm - bn)


class ConvMlp(Mlp):
    """ConvFFN: depthwise 7x7 conv + BN, then the 1x1-conv Mlp (fc1 -> GELU -> drop -> fc2 -> drop)."""

    def __init__(self, dim: int, hidden: int, conv: Callable[..., nnx.Module], drop: float, *, rngs: nnx.Rngs):
        init = trunc_normal(0.02)
        super().__init__(dim, hidden, act=gelu, drop=drop, rngs=rngs, weight_init=init, bias_init=zeros,
                         use_conv=True)
        self.conv = ConvNorm(conv(dim, dim, groups=dim, bias=False, rngs=rngs, weight_init=init), dim)

    def __call__(self, x):
        return super().__call__(self.conv(x))


class RepConditionalPosEnc(nnx.Module):
    """RepCPE: pos_enc(x) + x with a depthwise conv (or one reparam_conv of the same dense kernel size)."""

    def __init__(self, dim: int, conv: Callable[..., nnx.Module], kernel_size: int, *,
                 inference_mode: bool = False, rngs: nnx.Rngs):
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = reparam_conv(dim, dim, kernel_size, 1, dim, rngs=rngs)
            self.pos_enc = None
        else:
            self.reparam_conv = None
            self.pos_enc = conv(dim, dim, groups=dim, bias=True, rngs=rngs)   # PyTorch's default init

    def __call__(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    def fused_kernel_bias(self):
        """The identity added to the dense kernel (DCLS: the constructed 17x17 kernel)."""
        kernel = np.asarray(self.pos_enc.kernel(), np.float32)
        return _identity_kernel(self.dim, self.dim, self.kernel_size) + kernel, _np(self.pos_enc.bias)


class RepMixerBlock(nnx.Module):
    def __init__(self, dim: int, cfg: Config, mlp_ratio: float, conv, drop_path: float, *, rngs: nnx.Rngs):
        self.token_mixer = RepMixer(dim, cfg.repmixer_kernel_size, cfg.layer_scale_init_value,
                                    inference_mode=cfg.inference_mode, rngs=rngs)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), conv, cfg.proj_drop_rate, rngs=rngs)
        self.layer_scale = _layer_scale(dim, cfg.layer_scale_init_value)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        x = cut_cotangent(self.token_mixer(cut_cotangent(x)))
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class AttentionBlock(nnx.Module):
    def __init__(self, dim: int, cfg: Config, mlp_ratio: float, conv, drop_path: float, *, rngs: nnx.Rngs):
        self.norm = BatchNorm2d(dim)
        self.token_mixer = Attention(dim, rngs=rngs, weight_init=trunc_normal(0.02), bias_init=zeros)
        self.layer_scale_1 = _layer_scale(dim, cfg.layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), conv, cfg.proj_drop_rate, rngs=rngs)
        self.layer_scale_2 = _layer_scale(dim, cfg.layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        x = cut_cotangent(x)
        x = cut_cotangent(x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x)))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))


_BLOCKS = {"repmixer": RepMixerBlock, "attention": AttentionBlock}


class PatchEmbed(nnx.Module):
    """Downsampling: RepLK conv (7x7 stride 2, groups = in_chs) -> 1x1 MobileOne block."""

    def __init__(self, in_chs: int, embed_dim: int, cfg: Config, use_se: bool, *, rngs: nnx.Rngs):
        self.proj = Sequential([
            ReparamLargeKernelConv(in_chs, embed_dim, cfg.down_patch_size, cfg.down_stride, in_chs, 3, use_se=use_se,
                                   use_act=cfg.lkc_use_act, inference_mode=cfg.inference_mode, rngs=rngs),
            MobileOneBlock(embed_dim, embed_dim, 1, inference_mode=cfg.inference_mode, rngs=rngs)])

    def __call__(self, x):
        return self.proj(x)


class FastVitStage(nnx.Module):
    """Optional downsample, optional RepCPE, blocks. The stage's depthwise convs share DCLS positions."""

    def __init__(self, i: int, dim: int, dim_out: int, cfg: Config, drop_paths: list[float], *, rngs: nnx.Rngs):
        if cfg.token_mixers[i] not in _BLOCKS:
            raise ValueError(f"unknown token mixer {cfg.token_mixers[i]!r}; valid: {tuple(_BLOCKS)}")
        conv = share_positions(cfg.conv)
        if cfg.downsamples[i] or dim != dim_out:
            self.downsample = PatchEmbed(dim, dim_out, cfg, cfg.se_downsamples[i], rngs=rngs)
        else:
            self.downsample = identity
        self.pos_emb = (RepConditionalPosEnc(dim_out, conv, cfg.conv.extent,
                                             inference_mode=cfg.inference_mode, rngs=rngs)
                        if cfg.pos_embs[i] else identity)
        block = _BLOCKS[cfg.token_mixers[i]]
        self.blocks = Sequential([block(dim_out, cfg, cfg.mlp_ratios[i], conv, dp, rngs=rngs)
                                  for dp in drop_paths])

    def __call__(self, x):
        return self.blocks(self.pos_emb(self.downsample(x)))


class ClassifierHead(nnx.Module):
    """Global average pool -> dropout -> fc."""

    def __init__(self, dim: int, cfg: Config, *, rngs: nnx.Rngs):
        self.drop = Dropout(cfg.drop_rate, rngs=rngs)
        self.fc = Linear(dim, cfg.num_classes, rngs=rngs, weight_init=trunc_normal(0.02), bias_init=zeros)

    def __call__(self, x, pre_logits: bool = False):
        x = self.drop(global_avg_pool(x))
        return x if pre_logits else self.fc(x)


# ---------------------------------------------------------------------------------------------------------------
# Model

class FastVit(CutModel):
    """FastViT on NHWC inputs (the surface: `models.layers.CutModel`); `cfg.conv` builds the depthwise convs of
    ConvMlp and RepCPE. Cut points: the stem, each stage and final_conv. CAM target: the output of final_conv (the
    original code's `conv_exp`: MobileOne 3x3 depthwise, SE, GELU; 1024 x 8 x 8 at 256 x 256 input)."""

    target_layer = "final_conv"

    def __init__(self, cfg: Config = Config(), *, rngs: nnx.Rngs):
        n = len(cfg.layers)
        check_stages("FastViT", cfg, ("embed_dims", "mlp_ratios", "token_mixers", "pos_embs", "downsamples",
                                      "se_downsamples"), n)
        self.config = cfg
        dims = cfg.embed_dims
        mode = dict(inference_mode=cfg.inference_mode, use_scale_branch=cfg.stem_use_scale_branch, rngs=rngs)
        self.stem = Sequential([
            MobileOneBlock(3, dims[0], 3, 2, **mode),
            MobileOneBlock(dims[0], dims[0], 3, 2, groups=dims[0], **mode),
            MobileOneBlock(dims[0], dims[0], 1, 1, **mode)])
        dims_in = (dims[0], *dims[:-1])
        self.stages = Sequential([FastVitStage(i, dims_in[i], dims[i], cfg, rates, rngs=rngs)
                                  for i, rates in enumerate(drop_path_rates(cfg.layers, cfg.drop_path_rate))])
        final = int(dims[-1] * cfg.cls_ratio)
        self.final_conv = MobileOneBlock(dims[-1], final, 3, 1, groups=dims[-1], use_se=True,
                                         inference_mode=cfg.inference_mode, rngs=rngs)
        self.head = ClassifierHead(final, cfg, rngs=rngs)
        self.layer_names = ("stem", *(f"stages.{i}" for i in range(n)), "final_conv")

    def _parts(self):
        return (self.stem, *self.stages, self.final_conv)


_REPARAM = (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc)


def _node(model, path):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key, None)
        if model is None:
            return None
    return model


def reparameterize(model: FastVit) -> FastVit:
    """The inference-time form of a train-time FastViT, as timm's `reparameterize_model` computes it: BatchNorm
    running statistics folded into the branch convs, branches and identities summed into one `reparam_conv` per
    MobileOne block, RepLK conv, RepMixer and RepCPE (DCLS: RepCPE's constructed 17x17 kernel plus the identity;
    the ConvMlp convs, DCLS or not, and their BatchNorms stay). Pure: returns a new model in eval mode and leaves
    `model` unchanged. The weights are fused on the host (numpy), so call it outside `jax.jit`."""
    cfg = dataclasses.replace(model.config, inference_mode=True)
    # the same RNG streams as the model's (dropout / drop-path keys are copied over like the parameters)
    streams = {path[-1] for path, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)} or {"default"}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: FastVit(cfg, rngs=nnx.Rngs(**dict.fromkeys(streams, 0)))))
    fused = {}
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        old = _node(model, path)
        if isinstance(old, nnx.Variable):
            value = old.get_value()
        else:       # (..., "reparam_conv", "weight" | "bias") of a train-form module
            owner = _node(model, path[:-2])
            if path[-2] != "reparam_conv" or not isinstance(owner, _REPARAM) or owner.reparam_conv is not None:
                raise ValueError(f"reparameterize: no source for {'.'.join(map(str, path))}")
            if path[:-2] not in fused:
                fused[path[:-2]] = owner.fused_kernel_bias()
            value = jnp.asarray(fused[path[:-2]][path[-1] == "bias"])
        flat.append((path, var.replace(value)))
    new = nnx.merge(graphdef, nnx.from_flat_state(flat))
    new.eval()
    return new


# ---------------------------------------------------------------------------------------------------------------
# Registry entries and checkpoint names

_build = functools.partial(build, model_cls=FastVit)  # (preset, *, rngs, **overrides) -> FastVit


# apple/ml-fastvit names -> timm names (timm's checkpoint_filter_fn, plus the names of apple's reparameterised
# form: `lkb_reparam` and a RepCPE's `network.N.reparam_conv`, which timm's filter misplaces).
_RENAMES = (("patch_embed", "stem"), ("rbr_conv", "conv_kxk"), ("rbr_scale", "conv_scale"),
            ("rbr_skip", "identity"), ("conv_exp", "final_conv"), ("lkb_origin", "large_conv"),
            ("lkb_reparam", "reparam_conv"), ("convffn", "mlp"), ("se.reduce", "se.fc1"), ("se.expand", "se.fc2"))


def _is_original(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(("patch_embed.", "network.")) for k in state_dict)


def remap_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """apple/ml-fastvit state-dict names (flat `network.N` list, `rbr_*`, `conv_exp`, ...) -> timm names; identity
    on timm state dicts. Values pass through unchanged (the layouts agree)."""
    if not _is_original(state_dict):
        return dict(state_dict)
    # the network list alternates stages and their downsamplers: a stage ends before each `network.N.proj`
    stage_ends = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"network\.(\d+)\.proj\.", k))})

    def rename(k: str) -> str:
        for old, new in _RENAMES:
            k = k.replace(old, new)
        k = re.sub(r"layer_scale(_[0-9])?$", r"layer_scale\1.gamma", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        if m := re.match(r"network\.(\d+)\.(\w+)", k):
            net, child = int(m.group(1)), m.group(2)
            stage = bisect.bisect_right(stage_ends, net)
            part = ("downsample.proj" if child == "proj" else "pos_emb.pos_enc" if child == "pe" else
                    "pos_emb.reparam_conv" if child == "reparam_conv" else f"blocks.{child}")
            k = f"stages.{stage}.{part}" + k[m.end():]
        return k

    return rename_keys(state_dict, rename)


def infer_overrides(state_dict: Mapping[str, np.ndarray]) -> dict:
    """{"inference_mode": True} for a reparameterised checkpoint (timm-layout keys)."""
    return {"inference_mode": True} if any(k.endswith("reparam_conv.weight") for k in state_dict) else {}


_URL = "https://zenodo.org/record/8370737/files/{}"


def _register(name: str, cfg: Config, filename: str):
    register(Entry(
        name=name,
        builder=functools.partial(_build, cfg),
        family="fastvit",
        target_layer=FastVit.target_layer,
        resize_size=256,
        input_size=256,
        checkpoint=Checkpoint(url=_URL.format(filename), key="state_dict_ema", filename=filename),
        remap_keys=remap_keys,
        infer_overrides=infer_overrides,
    ))


for _size, _preset in (("sa24", Config.sa24), ("sa36", Config.sa36)):
    _register(f"fastvit_{_size}", _preset(), f"fastvit_{_size}_seed0.pth.tar")
    _register(f"fastvit_{_size}_dcls", _preset(conv=DCLS), f"fastvit_{_size}_v1_17lim_34el_seed0.pth.tar")

# Tiny variants for tests (models.entry.register_test): one block per stage (SA24's mixers: RepCPE and attention in
# the last stage), 16..64 wide, DCLS 5 taps in 7x7.
for _suffix, _conv in (("", DENSE), ("_dcls", ConvSpec.dcls(5, 7, "v1"))):
    _tiny = Config.sa24(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_classes=TEST_CLASSES, conv=_conv)
    register_test(f"test_fastvit{_suffix}", functools.partial(_build, _tiny), "fastvit", FastVit.target_layer,
                  remap_keys=remap_keys, infer_overrides=infer_overrides)
