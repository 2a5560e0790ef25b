"""Depthwise cross-correlation through real FFTs, with overlap-save tiling along long axes.

y[n, i, c] = sum_k x_pad[n, i*s + k, c] * w[c, k] is, for every stride-1 output i, the first
out = P - k + 1 entries of irfft(rfft(x_pad, L) * conj(rfft(w, L))) for any L >= P (the padded length):
the circular wrap-around lands only past the valid outputs. Strided outputs are the stride-1 ones subsampled.
Where an axis is much longer than its kernel, it is cut into overlapping tiles of length L (T = L - k + 1 new
outputs each, the overlap-save method), so FFT lengths stay short. Gradients come from autodiff: the transpose
of an FFT is an FFT, so the backward pass costs about twice the forward and stays on this path.
bfloat16 / float16 inputs are computed in float32 and cast back (float64 stays float64).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

_TILE_LEN = 64        # FFT length of an overlap-save tile
_TILE_ABOVE = 160     # tile an axis when its padded length exceeds this (and the kernel fits a tile)


def _fft_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n (pocketfft / cuFFT are fastest on such lengths)."""
    best = 1 << max(n - 1, 0).bit_length()
    p2 = 1
    while p2 < best:
        p3 = p2
        while p3 < best:
            p5 = p3
            while p5 < best:
                p7 = p5
                while p7 < best:
                    if p7 >= n:
                        best = min(best, p7)
                    p7 *= 7
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def _tile(x, axis: int, k: int, T: int, n: int):
    """Overlapping windows of length T + k - 1 at stride T along `axis`: (.., n, T + k - 1, ..)."""
    length = max(n * T + k - 1, (n + 1) * T)
    x = jnp.pad(x, [(0, 0)] * axis + [(0, length - x.shape[axis])] + [(0, 0)] * (x.ndim - axis - 1))
    shape = x.shape[:axis] + (n, T) + x.shape[axis + 1:]
    main = x[(slice(None),) * axis + (slice(0, n * T),)].reshape(shape)
    nxt = x[(slice(None),) * axis + (slice(T, T + n * T),)].reshape(shape)
    over = nxt[(slice(None),) * (axis + 1) + (slice(0, k - 1),)]
    return jnp.concatenate([main, over], axis=axis + 1)


def fft_depthwise(x, w, stride, pads, tile: bool | None = None):
    """Depthwise (groups == channels) cross-correlation of channels-last x (N, *S, C) with w (C, 1, *k).

    `tile`: None tiles the axes longer than _TILE_ABOVE, True every axis longer than a tile, False none
    (only axes whose kernel fits a tile four times over are ever tiled)."""
    nd = x.ndim - 2
    dtype = x.dtype
    ct = jnp.promote_types(dtype, jnp.float32)
    k = w.shape[2:]
    x = jnp.pad(jnp.moveaxis(x.astype(ct), -1, 1), [(0, 0), (0, 0), *pads])      # (N, C, *P)
    wc = w[:, 0].astype(ct)                                                       # (C, *k)
    full = [x.shape[2 + a] - k[a] + 1 for a in range(nd)]                          # stride-1 outputs
    # Per axis: (tiles n or None, FFT length L, outputs per tile T)
    plan = []
    for a in range(nd):
        P = x.shape[2 + a]
        L = _TILE_LEN
        fits = 4 * (k[a] - 1) <= L and P > L
        if fits and (tile or (tile is None and P > _TILE_ABOVE)):
            T = L - k[a] + 1
            plan.append((math.ceil(full[a] / T), L, T))
        else:
            plan.append((None, _fft_len(P), full[a]))
    # Tile from the last axis backwards so earlier axes keep their positions.
    for a in reversed(range(nd)):
        n, L, T = plan[a]
        if n is not None:
            x = _tile(x, 2 + a, k[a], T, n)
    axes, pos = [], 2
    for a in range(nd):
        pos += plan[a][0] is not None      # a tile-count axis precedes a tiled axis
        axes.append(pos)
        pos += 1
    lens = [p[1] for p in plan]
    X = jnp.fft.rfftn(x, s=lens, axes=axes)
    Wf = jnp.conj(jnp.fft.rfftn(wc, s=lens, axes=tuple(range(1, nd + 1))))
    wshape = [Wf.shape[0]]
    for a in range(nd):
        wshape += [1] * (plan[a][0] is not None) + [Wf.shape[1 + a]]
    Wf = Wf.reshape(wshape)[None]
    y = jnp.fft.irfftn(X * Wf, s=lens, axes=axes)
    # Undo the tiling (valid T outputs per tile), crop, subsample by the stride.
    for a in range(nd):
        n, L, T = plan[a]
        ax = axes[a]
        if n is not None:
            y = y[(slice(None),) * ax + (slice(0, T),)]
            y = y.reshape(y.shape[:ax - 1] + (n * T,) + y.shape[ax + 1:])
            axes = [b - 1 if i > a else b for i, b in enumerate(axes)]
            ax -= 1
        y = y[(slice(None),) * ax + (slice(0, full[a], stride[a]),)]
    return jnp.moveaxis(y, 1, -1).astype(dtype)



def fft_backward(xp, w, dy, stride):
    """Both gradients of the depthwise correlation y = valid_corr(xp, w, stride) by real FFTs, in float32 (or
    wider): (dxp, dw) with dxp (N, *P, C) the gradient w.r.t. the padded input xp (N, *P, C) and dw (C, 1, *k).
    With dyd the stride-dilated cotangent (N, *O', C), O' = (O - 1) s + 1, and FFT lengths L >= P per axis:
    dw[c, k] = sum_{n, i} xp[n, i + k, c] dyd[n, i, c], the first k lags of irfft(sum_n X conj(D));
    dxp[n, p, c] = sum_k dyd[n, p - k, c] w[c, k], a linear convolution of length O' + k - 1 <= P, so the
    circular one of length L has no wrap-around: irfft(D W)[:P]. D is shared by both."""
    from jax import lax
    nd = xp.ndim - 2
    ct = jnp.promote_types(xp.dtype, jnp.float32)
    ksize = w.shape[2:]
    P = xp.shape[1:-1]
    cfg = [(0, 0, 0), (0, 0, 0)] + [(0, 0, s - 1) for s in stride]
    # channels first: the FFTs run over the last, contiguous axes (2x faster on XLA:CPU)
    dyd = lax.pad(jnp.moveaxis(dy.astype(ct), -1, 1), jnp.zeros((), ct), cfg)          # (N, C, *O')
    axes = tuple(range(2, nd + 2))
    lens = [_fft_len(n) for n in P]
    X = jnp.fft.rfftn(jnp.moveaxis(xp.astype(ct), -1, 1), s=lens, axes=axes)
    D = jnp.fft.rfftn(dyd, s=lens, axes=axes)
    Wf = jnp.fft.rfftn(w[:, 0].astype(ct), s=lens, axes=tuple(range(1, nd + 1)))
    g = jnp.fft.irfftn(jnp.sum(X * jnp.conj(D), axis=0), s=lens, axes=tuple(range(1, nd + 1)))
    dw = g[(slice(None), *(slice(0, k) for k in ksize))][:, None]
    dxp = jnp.fft.irfftn(D * Wf[None], s=lens, axes=axes)[(slice(None), slice(None), *(slice(0, n) for n in P))]
    return jnp.moveaxis(dxp, 1, -1), dw
