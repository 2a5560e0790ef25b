"""DCLS convolutions for Flax NNX, ports of PyTorch dcls 0.1.1, channels-last inputs.

- Dcls1d / Dcls2d / Dcls3d: positions learned along every spatial axis.
- Dcls3_1d: a 3-D convolution whose taps move along the last spatial axis only, with a dense (fixed) kernel of
  `dense_kernel_size` along the first two (dcls 0.1.1's N_Md design; learnable delays in spiking networks).
- Dcls2dK1d: a 2-D convolution whose kernel is a 1-D DCLS kernel along one axis (`flat_dim` 0: the taps move
  along H, the kernel is 1 wide in W; 1: along W).

Parameters keep the PyTorch names and layouts, so checkpoints map one to one: weight (O, I/g, [*dense,] K),
P (n, O, I/g, [*dense,] K) with n the number of learnable axes, SIG of P's shape for "gauss"/"max" (None
otherwise), bias (O,) or None. `P=` / `SIG=` take an existing nnx.Param to share positions between layers (the
layer stores that same Variable: one leaf in nnx.split, gradients summed). The forward pass never clamps P; see
dcls_jax.optim for the training-time clamp.

Beside the PyTorch-style signature, the flax.nnx.Conv conventions work too: `dtype` (computation dtype; None:
the input's), `param_dtype`, `kernel_init` / `bias_init` / `position_init` / `sigma_init` (called as
`init(key, shape, dtype)` with the PyTorch-layout shapes above; initial positions are then clamped to
+-dilated_kernel_size // 2, as the reference does), `padding` "SAME" / "VALID" / "CIRCULAR" / an int / one int
per axis / one (low, high) pair per axis, and the aliases `strides`, `use_bias`, `feature_group_count`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dcls_jax.conv import conv
from dcls_jax.kernel import VERSIONS, _sizes, construct_kernel

_PAD_MODES = {"zeros": None, "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_PAD_STRINGS = ("SAME", "VALID", "CIRCULAR")

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _ints(v, nd: int, name: str) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, Sequence) else (v,) * nd
    if len(t) != nd:
        raise ValueError(f"{name} must be an int or {nd} ints, got {v}")
    return tuple(int(i) for i in t)


def _padding(padding, nd: int):
    """"SAME" / "VALID" / "CIRCULAR" (upper-cased), or nd ints, or nd (low, high) pairs (kept as pairs only when
    some side differs)."""
    if isinstance(padding, str):
        if padding.upper() not in _PAD_STRINGS:
            raise ValueError(f"padding must be one of {_PAD_STRINGS}, an int, {nd} ints or {nd} (low, high) "
                             f"pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, Sequence) and any(isinstance(p, Sequence) for p in padding):
        if len(padding) != nd or not all(isinstance(p, Sequence) and len(p) == 2 for p in padding):
            raise ValueError(f"padding pairs must be {nd} (low, high) pairs, got {padding}")
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
        if any(v < 0 for p in pairs for v in p):
            raise ValueError(f"padding must be >= 0, got {padding}")
        return tuple(lo for lo, _ in pairs) if all(lo == hi for lo, hi in pairs) else pairs
    out = _ints(padding, nd, "padding")
    if any(v < 0 for v in out):
        raise ValueError(f"padding must be >= 0, got {padding}")
    return out


def _shared(value, shape, name: str):
    """Use `value` (an nnx.Param to share, or an array) as parameter `name` of the given shape."""
    param = value if isinstance(value, nnx.Variable) else nnx.Param(jnp.asarray(value))
    if tuple(param.get_value().shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(param.get_value().shape)}")
    return param


def normal_positions(std: float = 0.5) -> Init:
    """dcls 0.1.1's Dcls1d/2d/3d position init: N(0, std) (the layer then clamps to +-d//2)."""
    return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


def uniform_positions(limits: Sequence[int]) -> Init:
    """dcls 0.1.1's N_Md (Dcls3_1d) position init: U(-lim_j, lim_j) along position axis j."""
    def init(key, shape, dtype=jnp.float32):
        lim = jnp.asarray(limits, dtype).reshape((-1,) + (1,) * (len(shape) - 1))
        return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * lim
    return init


def _alias(value, alias, default, name: str, alias_name: str):
    if alias is None:
        return value
    if value != default:
        raise ValueError(f"give either {name} or {alias_name}, not both")
    return alias


class _DclsNd(nnx.Module):
    """DCLS convolution: a dense kernel of size `dilated_kernel_size` built from `kernel_count` weighted taps
    per (out, in/groups) pair at learnable positions P, then a stride/padding/groups cross-correlation with
    dilation 1. Arguments as PyTorch dcls 0.1.1 (`padding_mode` zeros | reflect | replicate | circular;
    `version` v0 | v1 | gauss | max), plus `rngs`, optional shared `P` / `SIG` Params and the nnx.Conv-style
    arguments of the module docstring."""
    nd: int = 0          # spatial axes of the convolution
    learn_nd: int = 0    # axes along which the taps move (the leading axis of P); 0: nd

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "gauss", *, rngs: nnx.Rngs, P=None, SIG=None, **kwargs):
        self._setup(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                    padding_mode, version, rngs=rngs, P=P, SIG=SIG, **kwargs)

    def _setup(self, in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
               padding_mode, version, *, rngs: nnx.Rngs, P=None, SIG=None, dense_kernel_size=(),
               dtype=None, param_dtype=jnp.float32, kernel_init: Init | None = None,
               bias_init: Init | None = None, position_init: Init | None = None, sigma_init: Init | None = None,
               strides=None, use_bias: bool | None = None, feature_group_count: int | None = None):
        nd, learn_nd = self.nd, self.learn_nd or self.nd
        stride = _alias(stride, strides, 1, "stride", "strides")
        bias = _alias(bias, use_bias, True, "bias", "use_bias")
        groups = _alias(groups, feature_group_count, 1, "groups", "feature_group_count")
        if int(groups) < 1:
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
        if any(s < 1 for s in self.stride):
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.padding = _padding(padding, nd)
        self.dilated_kernel_size = _sizes(dilated_kernel_size, learn_nd)
        self.dense_kernel_size = tuple(dense_kernel_size)
        self.groups, self.padding_mode, self.version = int(groups), padding_mode, version
        self.dtype, self.param_dtype = dtype, param_dtype

        ig, k = in_channels // groups, self.kernel_count
        wshape = (out_channels, ig, *self.dense_kernel_size, k)
        shape = (learn_nd, *wshape)
        bound = 1.0 / math.sqrt(math.prod(wshape[1:]))  # kaiming_uniform(a=sqrt 5) and the bias bound
        default = lambda key, shp, dt=jnp.float32: jax.random.uniform(key, shp, dt, -bound, bound)  # noqa: E731
        self.weight = nnx.Param((kernel_init or default)(rngs.params(), wshape, param_dtype))
        self.bias = (nnx.Param((bias_init or default)(rngs.params(), (out_channels,), param_dtype))
                     if bias else None)
        if P is None:
            lims = [d // 2 for d in self.dilated_kernel_size]
            p = (position_init or self._default_position_init())(rngs.params(), shape, param_dtype)
            lim = jnp.asarray(lims, param_dtype).reshape((learn_nd,) + (1,) * len(wshape))
            self.P = nnx.Param(jnp.clip(p, -lim, lim))
        else:
            self.P = _shared(P, shape, "P")
        if version in ("gauss", "max"):
            if SIG is not None:
                self.SIG = _shared(SIG, shape, "SIG")
            elif sigma_init is not None:
                self.SIG = nnx.Param(sigma_init(rngs.params(), shape, param_dtype))
            else:
                self.SIG = nnx.Param(jnp.full(shape, 0.23 if version == "gauss" else 0.0, param_dtype))
        else:
            self.SIG = None

    def _default_position_init(self) -> Init:
        return normal_positions(0.5)

    def _expand(self, k):
        """The constructed kernel (O, I/g, ...) as the convolution's (O, I/g, *spatial)."""
        return k

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The spatial size of the dense kernel the convolution runs with."""
        return self._kernel_size()

    def _kernel_size(self) -> tuple[int, ...]:
        return self.dilated_kernel_size

    def kernel(self):
        """The dense kernel (O, I/g, *kernel_size) of the current parameters, in the parameters' dtype."""
        sig = None if self.SIG is None else self.SIG[...]
        return self._expand(construct_kernel(self.weight[...], self.P[...], sig, self.dilated_kernel_size,
                                             self.version))

    def pads(self, spatial: Sequence[int]) -> list[tuple[int, int]]:
        """The (low, high) zero/mode padding of each spatial axis for an input of that spatial shape."""
        if isinstance(self.padding, str):
            if self.padding == "VALID":
                return [(0, 0)] * self.nd
            out = []
            for n, k, s in zip(spatial, self._kernel_size(), self.stride):
                total = max((-(-n // s) - 1) * s + k - n, 0)
                out.append((total // 2, total - total // 2))
            return out
        if isinstance(self.padding[0], tuple):
            return list(self.padding)
        return [(p, p) for p in self.padding]

    def __call__(self, x):
        name = type(self).__name__
        if x.ndim != self.nd + 2:
            raise ValueError(f"{name} expects a {self.nd + 2}-D channels-last input (N, *spatial, C), "
                             f"got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} input channels (last axis), got shape {x.shape}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        w = self.kernel().astype(x.dtype)  # built in the parameters' dtype, run in the input's (or dtype)
        pads = self.pads(x.shape[1:-1])
        mode = "wrap" if self.padding == "CIRCULAR" else _PAD_MODES[self.padding_mode]
        if mode is not None or any(lo != hi for lo, hi in pads):
            x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode or "constant")
            padding = 0
        else:
            padding = tuple(lo for lo, _ in pads)
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


class Dcls3_1d(_DclsNd):
    """3-D convolution (input (N, D, H, W, C)) with a dense `dense_kernel_size` (2 ints) kernel along D and H and
    `kernel_count` learnable taps in `dilated_kernel_size` (1 int) along W: dcls 0.1.1's Dcls3_1d.

    weight (O, I/g, dk0, dk1, K), P and SIG (1, O, I/g, dk0, dk1, K); kernel (O, I/g, dk0, dk1, d). Init as the
    reference's N_Md layers: weight and bias U(+-1/sqrt(I/g * dk0 * dk1 * K)), P ~ U(-d//2, d//2). Version
    "v0" (which dcls 0.1.1 does not implement for this layer) builds each dense tap's row as Dcls1d's v0."""
    nd, learn_nd = 3, 1

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dense_kernel_size=1, dilated_kernel_size=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", version: str = "gauss", *, rngs: nnx.Rngs, P=None, SIG=None,
                 **kwargs):
        dense = _ints(dense_kernel_size, 2, "dense_kernel_size")
        if any(v < 1 for v in dense):
            raise ValueError(f"dense_kernel_size must be 2 positive ints, got {dense_kernel_size}")
        self._setup(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                    padding_mode, version, rngs=rngs, P=P, SIG=SIG, dense_kernel_size=dense, **kwargs)

    def _default_position_init(self) -> Init:
        return uniform_positions([d // 2 for d in self.dilated_kernel_size])

    def _kernel_size(self):
        return (*self.dense_kernel_size, *self.dilated_kernel_size)


class Dcls2dK1d(_DclsNd):
    """2-D convolution (input (N, H, W, C)) whose kernel is a 1-D DCLS kernel of `dilated_kernel_size` (1 int):
    dcls 0.1.1's Dcls2dK1d. `flat_dim` 0: the kernel is (d, 1), taps moving along H; 1: (1, d), along W.

    Parameters as Dcls1d's: weight (O, I/g, K), P and SIG (1, O, I/g, K); init as Dcls1d."""
    nd, learn_nd = 2, 1

    def __init__(self, in_channels: int, out_channels: int, kernel_count: int, stride=1, padding=0,
                 dilated_kernel_size=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 version: str = "v1", flat_dim: int = 0, *, rngs: nnx.Rngs, P=None, SIG=None, **kwargs):
        if flat_dim not in (0, 1):
            raise ValueError(f"flat_dim must be 0 (taps along H) or 1 (along W), got {flat_dim}")
        self.flat_dim = flat_dim
        self._setup(in_channels, out_channels, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
                    padding_mode, version, rngs=rngs, P=P, SIG=SIG, **kwargs)

    def _expand(self, k):
        return jnp.expand_dims(k, -1 - self.flat_dim)

    def _kernel_size(self):
        d = self.dilated_kernel_size[0]
        return (d, 1) if self.flat_dim == 0 else (1, d)
