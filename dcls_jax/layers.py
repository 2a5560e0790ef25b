"""Dcls1d / Dcls2d / Dcls3d: Flax NNX ports of PyTorch dcls 0.1.1, channels-last inputs.

Parameters keep the PyTorch names and layouts: weight (O, I/g, K), P (nd, O, I/g, K), SIG (nd, O, I/g, K)
for "gauss"/"max" (None otherwise), bias (O,) or None. `P=` / `SIG=` take an existing nnx.Param to share
positions between layers (the layer stores that same Variable: one leaf in nnx.split, gradients summed).
The forward pass never clamps P; see dcls_jax.optim for the training-time clamp.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dcls_jax.conv import conv
from dcls_jax.kernel import VERSIONS, _sizes, construct_kernel

_PAD_MODES = {"zeros": None, "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _ints(v, nd: int, name: str) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, Sequence) else (v,) * nd
    if len(t) != nd:
        raise ValueError(f"{name} must be an int or {nd} ints, got {v}")
    return tuple(int(i) for i in t)


def _shared(value, shape, name: str):
    """Use `value` (an nnx.Param to share, or an array) as parameter `name` of the given shape."""
    param = value if isinstance(value, nnx.Variable) else nnx.Param(jnp.asarray(value))
    if tuple(param.get_value().shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(param.get_value().shape)}")
    return param


class _DclsNd(nnx.Module):
    """DCLS convolution: a dense kernel of size `dilated_kernel_size` built from `kernel_count` weighted taps
    per (out, in/groups) pair at learnable positions P, then a stride/padding/groups cross-correlation with
    dilation 1. Arguments as PyTorch dcls 0.1.1 (`padding_mode` zeros | reflect | replicate | circular;
    `version` v0 | v1 | gauss | max), plus `rngs` and optional shared `P` / `SIG` Params."""
    nd: int = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", *, rngs: nnx.Rngs, P=None, SIG=None):
        nd = self.nd
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        if version not in VERSIONS:
            raise ValueError(f"unknown DCLS version {version!r}; expected one of {VERSIONS}")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(_PAD_MODES)}, got {padding_mode!r}")
        if int(kernel_count) < 1:
            raise ValueError(f"kernel_count must be >= 1, got {kernel_count}")
        if SIG is not None and version not in ("gauss", "max"):
            raise ValueError(f"SIG is only used by versions 'gauss' and 'max', not {version!r}")
        self.in_channels, self.out_channels, self.kernel_count = in_channels, out_channels, int(kernel_count)
        self.stride = _ints(stride, nd, "stride")
        self.padding = _ints(padding, nd, "padding")
        self.dilated_kernel_size = _sizes(dilated_kernel_size, nd)
        self.groups, self.padding_mode, self.version = groups, padding_mode, version

        ig, k = in_channels // groups, self.kernel_count
        shape = (nd, out_channels, ig, k)
        bound = 1.0 / math.sqrt(ig * k)  # kaiming_uniform(a=sqrt 5) and the bias bound: fan_in = I/g * K
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (out_channels, ig, k), jnp.float32,
                                                   -bound, bound))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), jnp.float32, -bound, bound))
                     if bias else None)
        if P is None:
            lim = jnp.asarray([d // 2 for d in self.dilated_kernel_size], jnp.float32).reshape(nd, 1, 1, 1)
            p = 0.5 * jax.random.normal(rngs.params(), shape, jnp.float32)
            self.P = nnx.Param(jnp.clip(p, -lim, lim))
        else:
            self.P = _shared(P, shape, "P")
        if version in ("gauss", "max"):
            self.SIG = (_shared(SIG, shape, "SIG") if SIG is not None else
                        nnx.Param(jnp.full(shape, 0.23 if version == "gauss" else 0.0, jnp.float32)))
        else:
            self.SIG = None

    def kernel(self):
        """The dense kernel (O, I/g, *dilated_kernel_size) of the current parameters."""
        sig = None if self.SIG is None else self.SIG[...]
        return construct_kernel(self.weight[...], self.P[...], sig, self.dilated_kernel_size, self.version)

    def __call__(self, x):
        name = type(self).__name__
        if x.ndim != self.nd + 2:
            raise ValueError(f"{name} expects a {self.nd + 2}-D channels-last input (N, *spatial, C), "
                             f"got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} input channels (last axis), got shape {x.shape}")
        w = self.kernel().astype(x.dtype)  # built in the parameters' dtype, run in the input's
        padding = self.padding
        mode = _PAD_MODES[self.padding_mode]
        if mode is not None:
            x = jnp.pad(x, [(0, 0), *((p, p) for p in padding), (0, 0)], mode=mode)
            padding = 0
        y = conv(x, w, self.stride, padding, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Dcls1d(_DclsNd):
    """1-D DCLS convolution; input (N, L, C)."""
    nd = 1


class Dcls2d(_DclsNd):
    """2-D DCLS convolution; input (N, H, W, C)."""
    nd = 2


class Dcls3d(_DclsNd):
    """3-D DCLS convolution; input (N, D, H, W, C)."""
    nd = 3
