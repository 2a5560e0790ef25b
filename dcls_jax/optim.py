"""Training helpers for DCLS positions: optimizer parameter groups and the post-step clamp of P.

The ICLR 2023 recipe gives P (and, for "gauss", SIG) weight decay 0 and 5x the learning rate, and clamps
P to [-(d_i // 2), d_i // 2] after every optimizer step (PyTorch: `layer.clamp_parameters()`).

With nnx.Optimizer::

    import optax
    from dcls_jax import position_labels, position_bounds, clamp_positions_transform

    sched = optax.warmup_cosine_decay_schedule(0.0, 4e-3, warmup_steps, total_steps, 1e-6)
    tx = optax.chain(
        optax.multi_transform(
            {"default": optax.adamw(sched, weight_decay=0.05),
             "positions": optax.adamw(lambda s: 5.0 * sched(s), weight_decay=0.0)},
            position_labels),                                  # a callable: labels any params pytree
        clamp_positions_transform(position_bounds(model)),     # last: needs `params` in update
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads)                             # P now within its bounds

The same `tx` works on the pure `params` of `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`
(`tx.update(grads, opt_state, params)` then `optax.apply_updates`). Leaves are recognised by their path in
`nnx.state(model, nnx.Param)`, with or without Variable wrappers. The chained clamp yields
`params + updates` within the bounds up to one float rounding of that addition; `clamp_positions(model)`
(in place, exact, like PyTorch's clamp_) can be used instead or in addition after `optimizer.update`.
The Gaussian recipe does not clamp: omit the last transform.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dcls_jax.layers import _DclsNd

POSITION_NAMES = ("P", "SIG")


def path_names(path) -> tuple[str, ...]:
    """A jax key path as a tuple of strings, without the trailing `.value` of an nnx Variable: the one key-path
    naming of the project ('.'.join(path_names(p)) is a parameter's PyTorch/timm state-dict key)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        else:
            out.append(str(getattr(k, "key", k)))
    if out and out[-1] == "value" and path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        out.pop()
    return tuple(out)


def position_labels(params, positions: str = "positions", default: str = "default"):
    """Labels for `optax.multi_transform`: `positions` for leaves named P or SIG, `default` otherwise.

    Pass the function itself as `param_labels` (it is called on whatever pytree the optimizer sees)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: positions if path_names(path)[-1:] and path_names(path)[-1] in POSITION_NAMES else default,
        params)


def _layers(model):
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, _DclsNd)]


def position_bounds(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path of each DCLS P in nnx.state(model, nnx.Param): (d_0 // 2, ..., d_{nd-1} // 2)}.

    A P shared by several layers appears once (at the path nnx.state keeps); its layers must agree."""
    limits: dict[int, tuple[int, ...]] = {}
    for layer in _layers(model):
        lim = tuple(d // 2 for d in layer.dilated_kernel_size)
        if limits.setdefault(id(layer.P), lim) != lim:
            raise ValueError(f"a shared P is used with different dilated_kernel_size bounds: "
                             f"{limits[id(layer.P)]} and {lim}")
    bounds = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if id(var) in limits:
            bounds[tuple(str(k) for k in path)] = limits[id(var)]
    return bounds


def _clip(p, lim):
    lim = jnp.asarray(lim, p.dtype).reshape((-1,) + (1,) * (p.ndim - 1))
    return jnp.clip(p, -lim, lim)


def clamp_positions_transform(bounds: dict[tuple[str, ...], tuple[int, ...]]) -> optax.GradientTransformation:
    """Optax transform (chain it last) turning updates u of each bounded P into clip(p + u) - p.

    `bounds` comes from `position_bounds(model)`; other leaves pass through untouched."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_positions_transform needs `params` in tx.update(grads, state, params)")

        def f(path, u, p):
            lim = bounds.get(path_names(path))
            return u if lim is None else _clip(p + u, lim) - p

        return jax.tree_util.tree_map_with_path(f, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clamp_positions(model) -> None:
    """Clamp every DCLS P of `model` in place to [-(d_i // 2), d_i // 2] (PyTorch's clamp_parameters)."""
    for layer in _layers(model):
        lim = tuple(d // 2 for d in layer.dilated_kernel_size)
        layer.P.set_value(_clip(layer.P[...], lim))
