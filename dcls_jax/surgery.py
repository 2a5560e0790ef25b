"""Model surgery: drop DCLS into any NNX model, and take the dense kernels back out for inference.

    import dcls_jax
    from flax import nnx

    # every depthwise conv with a kernel of at least 7 -> Dcls2d (17 x 17, 34 taps), positions shared per stage
    model = dcls_jax.replace_convs(model, dcls_jax.depthwise(min_kernel=7), kernel_count=34,
                                   dilated_kernel_size=17, version="v1",
                                   share=lambda path: path.split(".blocks.")[0], rngs=nnx.Rngs(0))
    ...train...
    frozen = dcls_jax.to_dense(model)   # every DCLS layer -> nnx.Conv holding its constructed dense kernel

Convolutions recognised: `flax.nnx.Conv` (kernel (*k, I/g, O)) and any PyTorch-layout conv module, i.e. one with
an nnx.Param `weight` of shape (O, I/g, *k) and attributes `stride`, `padding` and `groups` (torch.nn.ConvNd's
names, as the study's `models.layers.Conv2d`). Only the selected convolutions change; every other module and
weight of the model is kept as it is (by default in a copy: the model passed in is not modified).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax.numpy as jnp
from flax import nnx

from dcls_jax.layers import Dcls1d, Dcls2d, Dcls3d, _DclsNd

_CLASSES = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, Sequence) else (int(v),) * n


@dataclasses.dataclass(frozen=True)
class ConvInfo:
    """What a predicate sees of one convolution of the model."""
    path: str                      # "stages.0.blocks.1.conv_dw" (nnx graph path joined by dots)
    module: nnx.Module
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    bias: bool
    dtype: object = None           # nnx.Conv's computation / parameter dtypes (None: not an nnx.Conv)
    param_dtype: object = None

    @property
    def nd(self) -> int:
        return len(self.kernel_size)

    @property
    def depthwise(self) -> bool:
        """One group per input channel (with any channel multiplier)."""
        return self.groups == self.in_channels > 1


def conv_info(path: str, module) -> ConvInfo | None:
    """The ConvInfo of `module` if it is a convolution this module can replace (not a DCLS layer), else None."""
    if isinstance(module, _DclsNd) or not isinstance(module, nnx.Module):
        return None
    if isinstance(module, nnx.Conv):
        shape = module.kernel.get_value().shape
        nd = len(shape) - 2
        return ConvInfo(path, module, module.in_features, module.out_features, tuple(shape[:nd]),
                        _tuple(module.strides if module.strides is not None else 1, nd), module.feature_group_count,
                        module.bias is not None, module.dtype, module.param_dtype)
    weight = getattr(module, "weight", None)
    if (isinstance(weight, nnx.Param) and weight.get_value().ndim >= 3 and
            all(hasattr(module, a) for a in ("stride", "padding", "groups"))):
        shape = weight.get_value().shape
        nd = len(shape) - 2
        return ConvInfo(path, module, shape[1] * module.groups, shape[0], tuple(shape[2:]),
                        _tuple(module.stride, nd), int(module.groups), getattr(module, "bias", None) is not None)
    return None


def depthwise(min_kernel: int = 1) -> Callable[[ConvInfo], bool]:
    """Predicate: depthwise convolutions (groups == in_channels > 1) whose kernel is >= min_kernel on every axis."""
    return lambda info: info.depthwise and min(info.kernel_size) >= min_kernel


def _path(keys) -> str:
    return ".".join(str(k) for k in keys)


def _get(node, key):
    if isinstance(node, (nnx.List, list, tuple)) or (isinstance(key, int) and hasattr(node, "__getitem__")):
        return node[key]
    if isinstance(node, (nnx.Dict, dict)):
        return node[key]
    return getattr(node, key)


def _set(root, keys, value):
    parent = root
    for k in keys[:-1]:
        parent = _get(parent, k)
    key = keys[-1]
    if isinstance(parent, tuple):
        raise ValueError(f"cannot replace {_path(keys)!r}: its parent is a tuple (use a list or nnx.List)")
    if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _modules(model):
    """(path keys, module) of every module of the graph, each once (nnx's traversal order)."""
    return [(keys, node) for keys, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and keys]


def _swap(model, chosen: list, build: Callable, inplace: bool):
    """Replace each (keys, module) of `chosen` by build(keys, module); refuse modules reachable twice."""
    if not inplace:
        model = nnx.clone(model)
        by_path = dict(_modules(model))
        chosen = [(keys, by_path[keys]) for keys, _ in chosen]
    old = {id(m) for _, m in chosen}
    new = [(keys, build(keys, m)) for keys, m in chosen]
    for keys, layer in new:
        _set(model, keys, layer)
    left = [_path(k) for k, n in _modules(model) if id(n) in old]
    if left:
        raise ValueError(f"the replaced modules are also reachable at {left} (a module shared by several "
                         "parents); replace them there too or unshare them first")
    return model


def replace_convs(model, predicate: Callable[[ConvInfo], bool], *, kernel_count: int, dilated_kernel_size,
                  version: str = "v1", share: Callable[[str], Hashable | None] | None = None, padding=None,
                  bias: bool | None = None, rngs: nnx.Rngs | None = None, inplace: bool = False,
                  **layer_kwargs):
    """`model` with every convolution whose ConvInfo satisfies `predicate` replaced by a Dcls{1,2,3}d.

    The DCLS layer keeps the convolution's channels, groups, stride and bias (unless `bias` is given); `padding`
    defaults to dilated_kernel_size // 2 per axis (same-size output at stride 1, as the published models).
    `share(path)` names the group whose layers share one P (and SIG for gauss/max), as the published models share
    positions per stage (e.g. `lambda p: p.split(".blocks.")[0]`); None (or a None group) leaves a layer its own.
    The first layer of a group in the graph's order creates the positions. `layer_kwargs` go to the layer
    (dtype, param_dtype, kernel_init, bias_init, position_init, sigma_init, padding_mode); an nnx.Conv's dtypes
    are kept unless given. The other modules and weights are untouched; `inplace=False` works on a copy."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    infos = [(keys, conv_info(_path(keys), m)) for keys, m in _modules(model)]
    chosen = [(keys, info) for keys, info in infos if info is not None and predicate(info)]
    if not chosen:
        raise ValueError("no convolution of the model satisfies the predicate")
    by_keys = dict(chosen)
    groups: dict[Hashable, _DclsNd] = {}

    def build(keys, module):
        info = dataclasses.replace(by_keys[keys], module=module)
        if info.nd not in _CLASSES:
            raise ValueError(f"{info.path}: {info.nd}-D convolutions have no DCLS layer")
        d = _tuple(dilated_kernel_size, info.nd)
        kw = dict(layer_kwargs)
        if info.dtype is not None:
            kw.setdefault("dtype", info.dtype)
        if info.param_dtype is not None:
            kw.setdefault("param_dtype", info.param_dtype)
        group = share(info.path) if share is not None else None
        owner = groups.get(group) if group is not None else None
        if owner is not None:
            kw["P"] = owner.P
            if owner.SIG is not None:
                kw["SIG"] = owner.SIG
        try:
            layer = _CLASSES[info.nd](
                info.in_channels, info.out_channels, kernel_count, stride=info.stride,
                padding=tuple(v // 2 for v in d) if padding is None else padding, dilated_kernel_size=d,
                groups=info.groups, bias=info.bias if bias is None else bias, version=version, rngs=rngs, **kw)
        except ValueError as e:
            raise ValueError(f"{info.path} (share group {group!r}): {e}") from None
        if group is not None and owner is None:
            groups[group] = layer
        return layer

    return _swap(model, chosen, build, inplace)


def to_dense_conv(layer: _DclsNd, factory: Callable | None = None):
    """A DCLS layer as an ordinary convolution holding its constructed dense kernel (for inference).

    Default: a `flax.nnx.Conv` (kernel (*k, I/g, O), the layer's stride, padding, groups, bias and dtypes).
    `factory(layer, kernel, bias)` builds another module instead (kernel (O, I/g, *k) in PyTorch layout, bias (O,)
    or None), e.g. a PyTorch-layout Conv2d of the user's model."""
    if not isinstance(layer, _DclsNd):
        raise TypeError(f"expected a dcls_jax layer, got {type(layer).__name__}")
    kernel = layer.kernel()
    bias = None if layer.bias is None else layer.bias[...]
    if factory is not None:
        return factory(layer, kernel, bias)
    if layer.padding_mode != "zeros":
        raise ValueError(f"nnx.Conv has no padding_mode {layer.padding_mode!r}; pass a factory")
    padding = layer.padding if isinstance(layer.padding, str) else (
        tuple(layer.padding) if isinstance(layer.padding[0], tuple) else tuple((p, p) for p in layer.padding))
    nd = layer.nd
    ksize = layer.kernel_size
    conv = nnx.eval_shape(lambda: nnx.Conv(
        layer.in_channels, layer.out_channels, ksize, strides=layer.stride, padding=padding,
        feature_group_count=layer.groups, use_bias=bias is not None, dtype=layer.dtype,
        param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
    conv.kernel.set_value(jnp.transpose(kernel, (*range(2, nd + 2), 1, 0)))
    if bias is not None:
        conv.bias.set_value(bias)
    return conv


def to_dense(model, predicate: Callable[[str, _DclsNd], bool] | None = None, factory: Callable | None = None,
             inplace: bool = False):
    """`model` with every DCLS layer (or those with predicate(path, layer)) replaced by to_dense_conv(layer)."""
    if isinstance(model, _DclsNd):
        return to_dense_conv(model, factory)
    chosen = [(keys, m) for keys, m in _modules(model)
              if isinstance(m, _DclsNd) and (predicate is None or predicate(_path(keys), m))]
    if not chosen:
        raise ValueError("the model has no DCLS layer to export" + (" that satisfies the predicate"
                                                                    if predicate is not None else ""))
    return _swap(model, chosen, lambda keys, m: to_dense_conv(m, factory), inplace)
