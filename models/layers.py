"""Building blocks shared by every architecture, with PyTorch's parameter names and layouts.

Parameters keep the names and shapes of the PyTorch modules they mirror (`weight` (O, I/groups, *k) for
convolutions, `weight` (out, in) for linear layers, `running_mean` / `running_var` batch statistics), so a
timm state dict maps one to one onto `nnx.state(model)` and the converter needs no per-tensor transforms.
Activations are channels-last (NHWC). XLA folds the layout changes into the convolutions and matmuls.

Train/eval behaviour follows `model.train()` / `model.eval()`: stochastic modules read `deterministic`,
batch norms `use_running_average`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dcls_jax.conv import conv

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def uniform_fan_in(fan_in: int) -> Init:
    """torch.nn default for Linear/Conv weight and bias: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def trunc_normal(std: float = 0.02) -> Init:
    """timm's trunc_normal_(std, a=-2, b=2) (absolute bounds, so effectively +-2 for small std)."""
    def init(key, shape, dtype=jnp.float32):
        lo, hi = -2.0 / std, 2.0 / std
        return std * jax.random.truncated_normal(key, lo, hi, shape, dtype)
    return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torch kaiming_normal_(mode='fan_out', nonlinearity='relu') for an (O, I, *k) kernel."""
    fan_out = shape[0] * math.prod(shape[2:])
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)


def gelu(x):
    """PyTorch nn.GELU(): the exact form x/2 (1 + erf(x / sqrt 2)), PyTorch's own formula (jax.nn.gelu defaults
    to the tanh approximation, and its exact form goes through erfc: 1.45x slower on XLA:CPU)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


def identity(x):
    return x


class Sequential(nnx.List):
    """A list of callables applied in order; its children are named 0, 1, ... like torch.nn.Sequential."""

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


class Linear(nnx.Module):
    """torch.nn.Linear: weight (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rngs: nnx.Rngs,
                 weight_init: Init | None = None, bias_init: Init | None = None):
        weight_init = weight_init or uniform_fan_in(in_features)
        self.weight = nnx.Param(weight_init(rngs.params(), (out_features, in_features), jnp.float32))
        if bias:
            bias_init = bias_init or uniform_fan_in(in_features)
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))
        else:
            self.bias = None

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input: weight (O, I/groups, kh, kw), symmetric explicit padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int = 1, *, rngs: nnx.Rngs, weight_init: Init | None = None,
                 bias_init: Init | None = None):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible "
                             f"by groups {groups}")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        fan_in = in_channels // groups * k[0] * k[1]
        weight_init = weight_init or uniform_fan_in(fan_in)
        self.weight = nnx.Param(weight_init(rngs.params(), (out_channels, in_channels // groups, *k), jnp.float32))
        if bias:
            bias_init = bias_init or uniform_fan_in(fan_in)
            self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), jnp.float32))
        else:
            self.bias = None
        self.stride, self.padding, self.groups, self.dilation = stride, padding, groups, dilation

    def kernel(self):
        """The dense kernel (O, I/groups, kh, kw), as `dcls_jax.Dcls2d.kernel()` gives its constructed one."""
        return self.weight[...]

    def __call__(self, x):
        w = self.weight[...].astype(x.dtype)
        if w.shape[2:] == (1, 1) and self.groups == 1 and self.stride in (1, (1, 1)) and self.padding in (0, (0, 0)):
            y = jnp.einsum("...i,oi->...o", x, w[:, :, 0, 0])   # pointwise: a matmul (2.5x XLA's CPU conv)
        else:
            y = conv(x, w, self.stride, self.padding, self.groups, self.dilation)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis. Train mode normalises with the biased batch
    variance and updates the running variance with the unbiased one, momentum 0.1, as PyTorch does."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *, rngs: nnx.Rngs | None = None,
                 zero_init: bool = False):
        self.weight = nnx.Param(jnp.zeros((num_features,)) if zero_init else jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,)))
        self.eps, self.momentum = eps, momentum
        self.use_running_average = False

    def __call__(self, x):
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            n = math.prod(x.shape[:-1])
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
            self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1)
        scale = self.weight[...] * jax.lax.rsqrt(var + self.eps)
        return (x * scale.astype(x.dtype) + (self.bias[...] - mean * scale).astype(x.dtype))


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (channels-last, so also timm's LayerNorm2d on NCHW).
    Two-pass variance in float32, as PyTorch computes it."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True, *, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,))) if bias else None
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def drop_path(x, rate: float, key: jax.Array):
    """Stochastic depth per sample, scaled by 1/keep as timm's drop_path (scale_by_keep=True)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class DropPath(nnx.Module):
    def __init__(self, rate: float = 0.0, *, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork() if (rngs is not None and rate > 0) else None

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rngs is None:
            raise ValueError("DropPath with rate > 0 in train mode needs rngs (pass rngs with a 'dropout' stream)")
        return drop_path(x, self.rate, self.rngs.dropout())


class Dropout(nnx.Module):
    def __init__(self, rate: float = 0.0, *, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork() if (rngs is not None and rate > 0) else None

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs.dropout(), keep, x.shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Mlp(nnx.Module):
    """timm.layers.Mlp: fc1 -> act -> drop -> fc2 -> drop on the last axis; `use_conv` stores the weights as
    1x1 convs (O, I, 1, 1), as timm's Mlp(use_conv=True) does."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act: Callable = gelu, bias: bool = True, drop: float = 0.0, *, rngs: nnx.Rngs,
                 weight_init: Init | None = None, bias_init: Init | None = None, use_conv: bool = False):
        out_features = out_features or in_features
        fc = functools.partial(Conv2d, kernel_size=1) if use_conv else Linear
        self.fc1 = fc(in_features, hidden_features, bias=bias, rngs=rngs, weight_init=weight_init, bias_init=bias_init)
        self.fc2 = fc(hidden_features, out_features, bias=bias, rngs=rngs, weight_init=weight_init, bias_init=bias_init)
        self.act = act
        self.drop = Dropout(drop, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def global_avg_pool(x):
    """Mean over the spatial axes of NHWC."""
    return x.mean(axis=(1, 2))


def share_positions(factory: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    """Wraps a conv factory for one stage: each layer built after the first gets the first one's DCLS positions
    (`P=first.P`, and `SIG=first.SIG` where it has one), as the published DCLS models share them per stage.
    Layers without positions (plain convolutions) are built unchanged."""
    first = None

    def build(*args, **kwargs):
        nonlocal first
        if first is not None and getattr(first, "P", None) is not None:
            kwargs["P"] = first.P
            if getattr(first, "SIG", None) is not None:
                kwargs["SIG"] = first.SIG
        layer = factory(*args, **kwargs)
        first = layer if first is None else first
        return layer

    return build


class Attention(nnx.Module):
    """Multi-head self-attention over the H*W tokens of an NHWC map, as timm's MetaFormer and FastViT attention:
    heads of `head_dim` channels, qkv -> softmax(q k^T / sqrt(head_dim)) v -> proj -> dropout."""

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False, proj_bias: bool = True,
                 proj_drop: float = 0.0, *, rngs: nnx.Rngs, weight_init: Init | None = None,
                 bias_init: Init | None = None):
        self.head_dim = head_dim
        self.num_heads = max(dim // head_dim, 1)
        inner = self.num_heads * head_dim
        self.qkv = Linear(dim, 3 * inner, qkv_bias, rngs=rngs, weight_init=weight_init, bias_init=bias_init)
        self.proj = Linear(inner, dim, proj_bias, rngs=rngs, weight_init=weight_init, bias_init=bias_init)
        self.proj_drop = Dropout(proj_drop, rngs=rngs)

    def __call__(self, x):
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                       # (B, N, heads, head_dim)
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * self.head_dim ** -0.5
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, h, w, -1)
        return self.proj_drop(self.proj(y))


class CutModel(nnx.Module):
    """The surface every architecture shares: the network is the sequence `_parts()` (stem, stages, ...)
    whose outputs are named `layer_names`, followed by `head`; it can be cut at any of them.

    `forward_features(x, layer)` runs the parts up to `layer` (default `target_layer`, the study's CAM layer),
    `forward_head(a, layer)` the rest and the head, so forward_head(forward_features(x, l), l) == model(x)."""

    layer_names: tuple[str, ...]
    target_layer: str

    def _parts(self) -> tuple:
        raise NotImplementedError

    def _index(self, layer: str | None) -> int:
        layer = self.target_layer if layer is None else layer
        if layer not in self.layer_names:
            raise ValueError(f"unknown layer {layer!r}; valid layers: {self.layer_names}")
        return self.layer_names.index(layer)

    def forward_features(self, x, layer: str | None = None):
        """Activations (NHWC) at `layer` (default: the study's target layer)."""
        for part in self._parts()[:self._index(layer) + 1]:
            x = part(x)
        return x

    def forward_head(self, x, layer: str | None = None, pre_logits: bool = False):
        """Logits (or the pooled features with pre_logits=True) from the activations at `layer`."""
        for part in self._parts()[self._index(layer) + 1:]:
            x = part(x)
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x):
        return self.forward_head(self.forward_features(x))
