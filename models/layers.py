"""Building blocks shared by every architecture, with PyTorch's parameter names and layouts.

Parameters keep the names and shapes of the PyTorch modules they mirror (`weight` (O, I/groups, *k) for
convolutions, `weight` (out, in) for linear layers, `running_mean` / `running_var` batch statistics), so a
timm state dict maps one to one onto `nnx.state(model)` and the converter needs no per-tensor transforms.
Activations are channels-last (NHWC). XLA folds the layout changes into the convolutions and matmuls.

Train/eval behaviour follows `model.train()` / `model.eval()`: stochastic modules read `deterministic`,
batch norms `use_running_average`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcls_jax import VERSIONS, Dcls2d
from dcls_jax.attention import attention
from dcls_jax.conv import conv
from dcls_jax.dense import activate, gelu, linear  # noqa: F401 (gelu: the models' GELU, re-exported)
from dcls_jax.native import available as native_available
from dcls_jax.native import fusion_barrier
from dcls_jax.norm import layer_norm

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

    def __call__(self, x, activation=None):
        bias = None if self.bias is None else self.bias[...].astype(x.dtype)
        return linear(x, self.weight[...].astype(x.dtype), bias, activation=activation)


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

    def __call__(self, x, activation=None):
        """The convolution, then `activation` (as dcls_jax.linear takes it; a pointwise conv takes it in the product's
        call)."""
        w = self.weight[...].astype(x.dtype)
        bias = None if self.bias is None else self.bias[...].astype(x.dtype)
        if w.shape[2:] == (1, 1) and self.groups == 1 and self.padding in (0, (0, 0)):
            sh, sw = (self.stride, self.stride) if isinstance(self.stride, int) else self.stride
            # pointwise (strided: on every s-th pixel): a matmul, faster than XLA's CPU conv
            return linear(x[:, ::sh, ::sw], w[:, :, 0, 0], bias, activation=activation)
        y = conv(x, w, self.stride, self.padding, self.groups, self.dilation)
        return activate(y if bias is None else y + bias, activation)


@jax.custom_vjp
def cut_cotangent(x):
    """x; its cotangent is computed once, into memory (dcls_jax.native.fusion_barrier), on the CPU. MetaFormer's
    and FastViT's blocks call it on each residual branch's input: XLA:CPU fuses the elementwise backward of a
    stage's residual stream (the res / layer scales, LayerNorm's backward, the sums of branches) into each of its
    consumers, and every parameter gradient's reduction recomputed the chain back to the stage's end (fusions of
    ~600 instructions). Train step, batch 8, 2-core CPU: caformer_s18 2.9 -> 1.7 s, convformer_s18 2.6 -> 1.9,
    fastvit_sa24 2.1 -> 1.8. ConvNeXt and ResNet have no such chains (their largest fusions are the same with it)."""
    return x


def _cut_cotangent_fwd(x):
    return x, None


def _cut_cotangent_bwd(_, g):
    return (fusion_barrier(g) if _cut_here() else g,)


def _cut_here() -> bool:
    return jax.default_backend() == "cpu" and native_available()


cut_cotangent.defvjp(_cut_cotangent_fwd, _cut_cotangent_bwd)


def channel_sum(x):
    """The sum over every axis but the last (channels-last: one value per channel). On the CPU it is one
    reduction over the rows of x as a (rows, channels) array, behind an optimization barrier: XLA:CPU otherwise
    rewrites a reduction over a map's batch and spatial axes into a windowed reduction ~10x slower than a plain one
    (BatchNorm2d in train mode with its gradients at (8, 56, 56, 256): 148 -> 14 ms)."""
    rows = x.reshape(-1, x.shape[-1])
    if jax.default_backend() == "cpu":
        rows = jax.lax.optimization_barrier(rows)
    return rows.sum(0)


def channel_mean(x):
    """The mean over every axis but the last, summed as channel_sum does (then divided, as jnp.mean does)."""
    return channel_sum(x) / math.prod(x.shape[:-1])


@jax.custom_vjp
def channel_affine(x, scale, shift):
    """x * scale + shift with per-channel (last axis) scale and shift: their gradients reduce the cotangent with
    channel_sum (autodiff's own reduction of the broadcast is the slow windowed one on XLA:CPU)."""
    return x * scale + shift


def _channel_affine_fwd(x, scale, shift):
    return x * scale + shift, (x, scale)


def _channel_affine_bwd(res, g):
    x, scale = res
    return g * scale, channel_sum(g * x).astype(scale.dtype), channel_sum(g).astype(scale.dtype)


channel_affine.defvjp(_channel_affine_fwd, _channel_affine_bwd)


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
        shape = x.shape
        x = x.reshape(-1, shape[-1])   # (rows, channels): XLA:CPU reduces these fast (channel_mean)
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            xf = x.astype(jnp.float32)
            mean = channel_mean(xf)
            var = channel_mean(jnp.square(xf - mean))
            n = x.shape[0]
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
            self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1)
        scale = self.weight[...] * jax.lax.rsqrt(var + self.eps)
        return channel_affine(x, scale.astype(x.dtype), (self.bias[...] - mean * scale).astype(x.dtype)).reshape(shape)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (channels-last, so also timm's LayerNorm2d on NCHW).
    Two-pass variance in float32, as PyTorch computes it (dcls_jax.norm.layer_norm: one C++ call on the CPU)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True, *, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,))) if bias else None
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.weight[...], None if self.bias is None else self.bias[...], self.eps)


class Dropout(nnx.Module):
    """torch.nn.Dropout in train mode: each element zeroed with probability `rate`, the others scaled by
    1/(1 - rate); the identity in eval mode (`deterministic`) or at rate 0. Keys come from the 'dropout' stream of
    the rngs it was built with."""

    def __init__(self, rate: float = 0.0, *, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork() if (rngs is not None and rate > 0) else None

    def _mask_shape(self, x) -> tuple[int, ...]:
        return x.shape

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rngs is None:
            raise ValueError(f"{type(self).__name__} with rate > 0 in train mode needs rngs (pass rngs with a "
                             "'dropout' stream)")
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs.dropout(), keep, self._mask_shape(x))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class DropPath(Dropout):
    """Stochastic depth: timm's drop_path (scale_by_keep=True), one draw per sample for the whole branch."""

    def _mask_shape(self, x) -> tuple[int, ...]:
        return (x.shape[0],) + (1,) * (x.ndim - 1)


def drop_path_rates(depths, rate: float) -> list[list[float]]:
    """Per stage, the stochastic-depth rate of each block: linear in the block index over the whole network, from 0
    to `rate` (timm's `np.linspace(0, drop_path_rate, sum(depths)).split(depths)`)."""
    rates = np.linspace(0.0, rate, sum(depths)).tolist()
    starts = np.cumsum((0,) + tuple(depths)).tolist()
    return [rates[starts[i]:starts[i + 1]] for i in range(len(depths))]


def build_stages(cfg, make_stage: Callable) -> "Sequential":
    """A staged backbone's `stages`: make_stage(i, in_dim, rates) for each stage i, with in_dim the previous
    stage's width (the stem's, cfg.dims[0], for stage 0) and the stage's stochastic-depth rates."""
    dims_in = (cfg.dims[0], *cfg.dims[:-1])
    return Sequential([make_stage(i, dims_in[i], rates)
                       for i, rates in enumerate(drop_path_rates(cfg.depths, cfg.drop_path_rate))])


def check_stages(model: str, config, fields: tuple[str, ...], n: int = 4) -> None:
    """ValueError unless each config field of `fields` holds `n` values (one per stage)."""
    if any(len(getattr(config, f)) != n for f in fields):
        raise ValueError(f"{model} needs {n} stages ({', '.join(f'{n} {f}' for f in fields)}), got "
                         + ", ".join(f"{f}={getattr(config, f)}" for f in fields))


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
        # fc1 and its activation in one call where the product can (a CAM tap on fc1 replaces the module): GELU,
        # or an activation module that says how (`linear_activation()`, e.g. MetaFormer's StarReLU)
        spec = "gelu" if self.act is gelu else getattr(self.act, "linear_activation", lambda: None)()
        if spec is not None and type(self.fc1) in (Linear, Conv2d):
            return self.drop(self.fc2(self.drop(self.fc1(x, activation=spec))))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def global_avg_pool(x):
    """Mean over the spatial axes of NHWC."""
    return x.mean(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The convolution DCLS replaces in a model, and its one factory. Every family's config has one field
    `conv: ConvSpec` (ResNet: each bottleneck's 3x3 `conv2`; ConvNeXt: each block's `conv_dw`; MetaFormer: each
    SepConv's `dwconv`; FastViT: each ConvMlp's and RepCPE's depthwise conv); the `_dcls` registry entries differ
    from the plain ones only by it. Builder overrides named like its fields (`kernel_count=3`,
    `dilated_kernel_size=5`, ...) replace those fields of the preset's spec (`models.entry.override`).

    kind "dense": a `Conv2d(kernel_size)` initialised by the caller's `weight_init` / `bias_init` (the family's
    timm init). kind "dcls": a `dcls_jax.Dcls2d` with `kernel_count` taps in a `dilated_kernel_size` kernel,
    interpolation `version`, weight initialised by `init` -- "normal": N(0, 0.02), as the study's replacement
    functions (`replace_depthwise_dcls`) do; "trunc_normal": trunc_normal(0.02), ConvNeXt-dcls's `_init_weights`
    -- and a zero bias; positions keep Dcls2d's own init. Both are padded to keep the spatial size (stride 1).

    Calling the spec builds one layer: `spec(in_channels, out_channels, *, stride, groups, bias, rngs, weight_init,
    bias_init, P, SIG)`; `P` / `SIG` are a DCLS layer's shared positions (see `share_positions`), ignored by a
    dense layer."""
    kind: str = "dense"
    kernel_size: int = 7               # dense
    kernel_count: int = 34             # dcls: taps per kernel
    dilated_kernel_size: int = 17      # dcls: the size of the dense kernel they are placed in
    version: str = "v0"                # dcls: "v0", "v1", "gauss" (dcls_jax.VERSIONS)
    init: str = "normal"               # dcls weight init: "normal" or "trunc_normal"

    def __post_init__(self):
        if self.kind not in ("dense", "dcls"):
            raise ValueError(f"ConvSpec.kind must be 'dense' or 'dcls', got {self.kind!r}")
        if self.version not in VERSIONS:
            raise ValueError(f"ConvSpec.version must be one of {VERSIONS}, got {self.version!r}")
        if self.init not in _DCLS_INITS:
            raise ValueError(f"ConvSpec.init must be one of {tuple(_DCLS_INITS)}, got {self.init!r}")
        for name in ("kernel_size", "kernel_count", "dilated_kernel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ConvSpec.{name} must be a positive int, got {getattr(self, name)!r}")

    @classmethod
    def dense(cls, kernel_size: int) -> ConvSpec:
        return cls("dense", kernel_size=kernel_size)

    @classmethod
    def dcls(cls, kernel_count: int, dilated_kernel_size: int, version: str, init: str = "normal") -> ConvSpec:
        return cls("dcls", kernel_count=kernel_count, dilated_kernel_size=dilated_kernel_size, version=version,
                   init=init)

    @property
    def is_dcls(self) -> bool:
        return self.kind == "dcls"

    @property
    def extent(self) -> int:
        """The side of the dense kernel the layer applies (kernel_size, or dilated_kernel_size for DCLS)."""
        return self.dilated_kernel_size if self.is_dcls else self.kernel_size

    def __call__(self, in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 1, bias: bool = True,
                 rngs: nnx.Rngs, weight_init: Init | None = None, bias_init: Init | None = None, P=None,
                 SIG=None) -> nnx.Module:
        if not self.is_dcls:
            return Conv2d(in_channels, out_channels, self.kernel_size, stride=stride, padding=self.kernel_size // 2,
                          groups=groups, bias=bias, rngs=rngs, weight_init=weight_init, bias_init=bias_init)
        d = self.dilated_kernel_size
        layer = Dcls2d(in_channels, out_channels, self.kernel_count, stride=stride, padding=d // 2,
                       dilated_kernel_size=d, groups=groups, bias=bias, version=self.version, rngs=rngs, P=P, SIG=SIG)
        layer.weight.set_value(_DCLS_INITS[self.init](rngs.params(), layer.weight.get_value().shape))
        if layer.bias is not None:
            layer.bias.set_value(jnp.zeros_like(layer.bias.get_value()))
        return layer


def _normal_002(key, shape, dtype=jnp.float32):
    return 0.02 * jax.random.normal(key, shape, dtype)


_DCLS_INITS = {"normal": _normal_002, "trunc_normal": trunc_normal(0.02)}


def share_positions(factory: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    """Wraps a conv factory (a `ConvSpec`) for one stage: each layer built after the first gets the first one's
    DCLS positions (`P=first.P`, and `SIG=first.SIG` where it has one), as the published DCLS models share them per
    stage. Layers without positions (plain convolutions) are built unchanged."""
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
        y = attention(self.qkv(x).reshape(b, h * w, -1), self.num_heads).reshape(b, h, w, -1)
        return self.proj_drop(self.proj(y))


class CutModel(nnx.Module):
    """The surface every model of the registry shares (documented here only).

    The network is the sequence `_parts()` (stem, stages, ...) whose outputs are named `layer_names` (e.g.
    ResNet's "stem", "layer1" .. "layer4"; the others' "stem", "stages.0" .. "stages.3", FastViT's also
    "final_conv"), followed by `head`; it can be cut at any of them:
      model(x)                        logits (B, num_classes) from images x (B, H, W, 3), normalised, NHWC
      forward_features(x, layer)      the activations (B, h, w, C) at `layer` (default: `target_layer`)
      forward_head(a, layer)          the rest of the network and the head from those activations (pre_logits=True:
                                      the pooled features), so forward_head(forward_features(x, l), l) == model(x)
    `target_layer` is the study's CAM target: each family's class sets it (its docstring says which activations
    those are) and its registry entries repeat it as `Entry.target_layer`. Any other module is reachable by its
    attribute path (timm's state-dict names), which cam.capture accepts. `model.train()` / `model.eval()` switch
    dropout, drop path and BatchNorm statistics."""

    layer_names: tuple[str, ...]
    target_layer: str

    def _parts(self) -> tuple:
        """The modules `layer_names` name, in order (default: the stem, then each stage)."""
        return (self.stem, *self.stages)

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
