"""PyTorch-semantics N-d convolution on channels-last inputs with PyTorch-layout kernels.

`conv(x, w, stride, padding, groups)` takes x as (N, *spatial, C) and w as (O, C/groups, *k) (the layout
of torch.nn.ConvNd and of the dense DCLS kernel) and pads symmetrically like PyTorch (never 'SAME').

XLA's CPU depthwise convolution is 25x slower than a sum of shifted multiply-adds (benchmarks and
shared/reference/performance.md), so on the CPU backend depthwise convolutions take that path; on GPU/TPU
XLA's own convolution runs. Both compute the same cross-correlation.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = {1: ("NHC", "OIH", "NHC"), 2: ("NHWC", "OIHW", "NHWC"), 3: ("NDHWC", "OIDHW", "NDHWC")}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v,) * n


_MAX_UNROLLED_TAPS = 64


def _shifted_sum_depthwise(x, w, stride, pads):
    """Depthwise conv (groups == C, one output per channel) as a sum of strided shifted products.

    Kernels of more than _MAX_UNROLLED_TAPS taps (DCLS: 17x17, 23x23) scan over all kernel axes but the
    last, which stays unrolled: fully unrolled, a 17x17 kernel's gradient takes over 10 minutes to compile
    on CPU; scanned, a few seconds (and its forward runs faster)."""
    nd = x.ndim - 2
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    ksize = w.shape[2:]
    out_shape = [(x.shape[1 + a] - ksize[a]) // stride[a] + 1 for a in range(nd)]
    wt = jnp.moveaxis(w[:, 0], 0, -1)  # (*k, C)

    def taps(x, wt):  # sum over every tap of wt (*k', C) of x shifted by the tap's offset
        acc = None
        for idx in itertools.product(*(range(k) for k in wt.shape[:-1])):
            sl = tuple(slice(i, i + (o - 1) * s + 1, s) for i, o, s in zip(idx, out_shape, stride))
            term = x[(slice(None), *sl)] * wt[idx]
            acc = term if acc is None else acc + term
        return acc

    if nd == 1 or math.prod(ksize) <= _MAX_UNROLLED_TAPS:
        return taps(x, wt)
    lead = ksize[:-1]

    def row(t):  # the taps whose leading kernel indices are unravel(t)
        xs, ws = x, wt
        for a, i in enumerate(jnp.unravel_index(t, lead)):
            xs = lax.dynamic_slice_in_dim(xs, i, (out_shape[a] - 1) * stride[a] + 1, axis=1 + a)
            ws = lax.dynamic_slice_in_dim(ws, i, 1, axis=a)
        return taps(xs, ws)

    return lax.scan(lambda acc, t: (acc + row(t), None), row(0), jnp.arange(1, math.prod(lead)))[0]


def conv(x, w, stride=1, padding=0, groups: int = 1, dilation=1):
    """Cross-correlation of channels-last `x` with a PyTorch-layout kernel `w` (O, I/groups, *k)."""
    nd = w.ndim - 2
    if x.ndim != nd + 2:
        raise ValueError(f"expected a {nd + 2}-D channels-last input, got shape {x.shape}")
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = [(p, p) for p in _tuple(padding, nd)]
    c_in, c_out = x.shape[-1], w.shape[0]
    depthwise = groups == c_in == c_out and w.shape[1] == 1 and all(d == 1 for d in dilation)
    if depthwise and jax.default_backend() == "cpu" and x.dtype == w.dtype:
        return _shifted_sum_depthwise(x, w, stride, pads)
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=pads, rhs_dilation=dilation,
        dimension_numbers=_DIMS[nd], feature_group_count=groups)
