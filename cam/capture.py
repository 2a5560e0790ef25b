"""Activations and their gradients at any layer of any Flax NNX model, named by attribute path or given as a module.

    a, g, ok = cam.capture.activations_and_grads(model, images, labels=None, layer="layer4.2.act")

No hooks and no edit of the caller's model: the model is cloned (`nnx.split` / `nnx.merge`, inside the traced
function, so the clone costs nothing at run time), the clone is put in eval mode, and on the clone only the
attribute at the path (a submodule, a list entry, a function attribute such as `self.act = jax.nn.gelu`, or a
method such as ResNet's `stem`) is replaced by a wrapper that records its output A and returns A + delta, with
delta = 0 an input of the function: G = dS/dA = dS/d delta at delta = 0 by one `jax.vjp`. Everything is a pure
function of the model's state and the inputs: it can be jitted, vmapped and differentiated (also twice: a CAM can
be back-propagated into the weights). The caller's model, its train/eval flags included, is never touched.

The target must be called exactly once per forward pass (a module shared by several blocks, or an activation
function attribute reused inside a block, is reported with its call count).

Token sequences (B, N, C) are turned into NHWC maps: `reshape=(h, w)` keeps the last h * w tokens (dropping
class / register tokens in front); `reshape=None` infers (h, w) from N and the input's aspect ratio, with one
class token dropped when N - 1 fits and N does not; a callable `reshape(t) -> (B, h, w, C)` is applied to the
activations and to the gradients alike (as pytorch-grad-cam's `reshape_transform`).

Targets (the score S whose gradient is taken), for every method:
  labels (B,) ints       S = sum_b logits[b, labels[b]]         (the study's: the ground-truth class)
  None                   S = sum_b logits[b, argmax logits[b]]   (the top prediction of each image)
  callable f(logits)     S = sum f(logits), f returning (B,) per-image scores (or a scalar), e.g.
                         lambda z: jax.nn.log_softmax(z)[:, 3] or lambda z: z[:, 1] - z[:, 2]
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["activations_and_grads", "module_paths", "target_path", "tapped_forward", "to_nhwc"]


# ---------------------------------------------------------------------------------------------------------------
# Paths


def check_labels(labels, num_classes: int | None, batch: int | None = None) -> np.ndarray:
    """Concrete integer labels of shape (B,) in [0, num_classes) (only >= 0 if num_classes is None)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch):
        raise ValueError(f"labels must have shape ({batch if batch is not None else 'B'},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= (num_classes if num_classes is not None else np.inf))
    if bad.any():
        raise ValueError(f"labels out of range [0, {num_classes if num_classes is not None else 'num_classes'}): "
                         f"{labels[bad].tolist()} at batch positions {np.flatnonzero(bad).tolist()}")
    return labels


def _split_path(path: str) -> list[str]:
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        raise ValueError(f"a layer path is a dotted attribute path such as 'layer4.2.act', got {path!r}")
    return path.split(".")


def _child(node, key: str):
    """node.key, or node[int(key)] for lists / sequences, or node[key] for mappings; KeyError when absent."""
    if key.isdigit() and not isinstance(node, dict) and hasattr(node, "__getitem__") and not hasattr(node, key):
        try:
            return node[int(key)]
        except (IndexError, TypeError, KeyError):
            raise KeyError(key) from None
    if isinstance(node, dict) or (not hasattr(node, key) and hasattr(node, "keys")):
        try:
            return node[key]
        except (KeyError, TypeError):
            raise KeyError(key) from None
    if not hasattr(node, key):
        raise KeyError(key)
    return getattr(node, key)


def _set_child(node, key: str, value) -> None:
    if key.isdigit() and not isinstance(node, dict) and hasattr(node, "__setitem__") and not hasattr(node, key):
        node[int(key)] = value
    elif isinstance(node, dict) or (not hasattr(node, key) and hasattr(node, "keys")):
        node[key] = value
    else:
        # An instance attribute shadows a method of the class (a bound method is a non-data descriptor).
        object.__setattr__(node, key, value) if not isinstance(node, nnx.Module) else setattr(node, key, value)


def module_paths(model) -> list[str]:
    """Dotted paths of every submodule of `model` (candidates for a CAM target), in definition order."""
    return [".".join(map(str, p)) for p, _ in nnx.iter_modules(model) if p]


def _resolve(model, path: str):
    node = model
    parts = _split_path(path)
    for i, key in enumerate(parts):
        try:
            node = _child(node, key)
        except KeyError:
            where = ".".join(parts[:i]) or type(model).__name__
            raise ValueError(f"unknown layer {path!r} for {type(model).__name__}: {where} has no {key!r}"
                             + _suggest(model)) from None
    if not callable(node):
        raise ValueError(f"layer {path!r} of {type(model).__name__} is a {type(node).__name__}, not a callable "
                         "module, function or method")
    return node


def _suggest(model, limit: int = 12) -> str:
    paths = module_paths(model)
    if not paths:
        return ""
    shown = ", ".join(paths[-limit:])
    return f" (submodule paths{', the last ' + str(limit) if len(paths) > limit else ''}: {shown})"


def target_path(model, layer) -> str:
    """The dotted path of `layer` in `model`: a path string is checked and returned; a module is looked up by
    identity among the model's submodules (ValueError when it is not one of them)."""
    if isinstance(layer, str):
        _resolve(model, layer)
        return layer
    if isinstance(layer, nnx.Module):
        for p, m in nnx.iter_modules(model):
            if m is layer and p:
                return ".".join(map(str, p))
        raise ValueError(f"the {type(layer).__name__} given as layer is not a submodule of {type(model).__name__}")
    raise ValueError(f"layer must be a dotted attribute path or a submodule of the model, got {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# The tapped forward pass


class _Tap:
    """Stands in for the target on the clone: records its output and adds `delta` to it."""

    def __init__(self, fn, delta):
        self.fn, self.delta, self.outputs = fn, delta, []

    def __call__(self, *args, **kwargs):
        y = self.fn(*args, **kwargs)
        if not hasattr(y, "shape") or not hasattr(y, "dtype"):
            raise ValueError(f"the CAM target must return an array, got {type(y).__name__}")
        self.outputs.append(y)
        return y if self.delta is None else y + self.delta.astype(y.dtype)


def _default_apply(model, images):
    return model(images)


def tapped_forward(graphdef, state, path: str, images, delta=None, apply: Callable | None = None):
    """(logits, A): the eval-mode forward pass of a fresh clone of the model, with `delta` added to the output A of
    the attribute at `path`. Pure in (state, images, delta)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    parts = _split_path(path)
    parent = model
    for key in parts[:-1]:
        parent = _child(parent, key)
    tap = _Tap(_child(parent, parts[-1]), delta)
    _set_child(parent, parts[-1], tap)
    logits = (apply or _default_apply)(model, images)
    if len(tap.outputs) != 1:
        raise ValueError(f"layer {path!r} was called {len(tap.outputs)} times in one forward pass of "
                         f"{type(model).__name__}; a CAM target must be called exactly once (name a module that "
                         "is used once, e.g. a block instead of a shared activation)")
    return logits, tap.outputs[0]


# ---------------------------------------------------------------------------------------------------------------
# Token sequences -> NHWC


def _grid(n: int, hw: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) with h * w == n and h / w == H / W, if any."""
    big_h, big_w = hw
    g = math.gcd(big_h, big_w)
    rh, rw = big_h // g, big_w // g
    k = math.isqrt(n // (rh * rw)) if n % (rh * rw) == 0 else 0
    if k and k * k * rh * rw == n:
        return rh * k, rw * k
    r = math.isqrt(n)
    return (r, r) if r * r == n and big_h == big_w else None


def to_nhwc(t, reshape, image_hw: tuple[int, int]):
    """Activations (or gradients) at the target as (B, h, w, C)."""
    if callable(reshape):
        out = reshape(t)
        if out.ndim != 4:
            raise ValueError(f"reshape must return (B, h, w, C) maps, returned shape {out.shape}")
        return out
    if t.ndim == 4:
        if reshape is not None and tuple(reshape) != tuple(t.shape[1:3]):
            raise ValueError(f"reshape={tuple(reshape)} given for NHWC activations of shape {t.shape}")
        return t
    if t.ndim != 3:
        raise ValueError(f"CAM target activations must be NHWC maps (B, h, w, C) or token sequences (B, N, C), got "
                         f"shape {t.shape}: choose another layer, or pass reshape=callable")
    b, n, c = t.shape
    if reshape is not None:
        h, w = (int(v) for v in reshape)
        if h * w > n or h < 1 or w < 1:
            raise ValueError(f"reshape={(h, w)} needs {h * w} tokens, the target has {n}")
    else:
        grid = _grid(n, image_hw) or (_grid(n - 1, image_hw) if n > 1 else None)
        if grid is None:
            raise ValueError(f"cannot infer the token grid of {n} tokens for {image_hw[0]}x{image_hw[1]} inputs: "
                             "pass reshape=(h, w) (the last h*w tokens are kept) or a callable")
        h, w = grid
    return t[:, n - h * w:].reshape(b, h, w, c)     # prefix (class / register) tokens dropped


# ---------------------------------------------------------------------------------------------------------------
# Scores and gradients


def _finite_rows(x):
    return jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) if x.ndim else jnp.isfinite(x)[None]


def score_cotangent(logits, target):
    """(dS/dlogits, ok per row) for a target: labels (B,), None (top prediction) or a callable on the logits.

    Out-of-range traced labels give a zero row and ok False (concrete ones are checked by the callers)."""
    n = logits.shape[-1]
    ok = _finite_rows(logits)
    if target is None:
        labels = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    elif callable(target):
        s, vjp = jax.vjp(target, logits)
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != logits.shape[0]):
            raise ValueError(f"a target callable must return one score per image (shape ({logits.shape[0]},)) or "
                             f"a scalar, returned shape {s.shape}")
        (ct,) = vjp(jnp.ones_like(s))
        return ct, ok & (_finite_rows(s) if s.ndim == 1 else jnp.isfinite(s))
    else:
        labels = jnp.asarray(target)
        ok = ok & (labels >= 0) & (labels < n)
    return jax.nn.one_hot(labels, n, dtype=logits.dtype), ok


def activations_and_grads(model_or_graphdef, images, labels=None, *, layer, state=None, reshape=None,
                          apply: Callable | None = None):
    """(A, G, ok): A at `layer` and G = dS/dA, both float32 NHWC (token sequences reshaped), and per image whether
    the target is valid and the logits finite. Pure and traceable; the model is not modified.

    Call as activations_and_grads(model, images, labels, layer=...) or, pure over the split state,
    activations_and_grads(graphdef, images, labels, layer=..., state=state) (layer then a path string).
    `apply(model, images) -> logits` replaces `model(images)` for models called otherwise."""
    return capture(model_or_graphdef, images, labels, layer=layer, state=state, reshape=reshape, apply=apply)[:3]


def capture(model_or_graphdef, images, labels=None, *, layer, state=None, reshape=None,
            apply: Callable | None = None):
    """activations_and_grads, and the class count."""
    if state is None:
        path = target_path(model_or_graphdef, layer)
        graphdef, state = nnx.split(model_or_graphdef)
    else:
        if not isinstance(layer, str):
            raise ValueError("with a graphdef and state, name the layer by its path (cam.capture.target_path)")
        graphdef, path = model_or_graphdef, layer
    shape = jax.eval_shape(lambda s, x: tapped_forward(graphdef, s, path, x, None, apply)[1], state, images)
    delta = jnp.zeros(shape.shape, shape.dtype)
    (logits, a), vjp = jax.vjp(lambda d: tapped_forward(graphdef, state, path, images, d, apply), delta)
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits of shape (B, classes), returned {logits.shape}")
    n = logits.shape[-1]
    if labels is not None and not callable(labels) and not isinstance(labels, jax.core.Tracer):
        check_labels(labels, n, logits.shape[0])
    ct, ok = score_cotangent(logits, labels)
    (g,) = vjp((ct, jnp.zeros_like(a)))
    hw = tuple(images.shape[1:3])
    a = to_nhwc(a.astype(jnp.float32), reshape, hw)
    g = to_nhwc(g.astype(jnp.float32), reshape, hw)
    return a, g, ok, n
