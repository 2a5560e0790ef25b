"""Dense DCLS kernels from (weight, P, SIG): the numbers of PyTorch dcls 0.1.1 `ConstructKernel{1,2,3}d`.

Every version is separable: the kernel of tap k is a product of one 1-D profile per spatial axis, so
`kernel[o, i, *x] = sum_k W[o, i, k] / Z[o, i, k] * prod_a g_a[o, i, k, x_a]` is one einsum over k and the
(d0, d1, O, I/g, K) tensor of the reference is never built.

Axis pairing (c_j = dilated_kernel_size[j] // 2; P[j] is offset by c_j, as in the reference):
- v1 / gauss / max: P[j] (and SIG[j]) act on spatial axis nd-1-j, i.e. in 2-D P[0] moves taps along the
  columns (W) and P[1] along the rows (H). For non-square kernels the reference offsets P[j] by c_j but
  samples axis nd-1-j, whose size is d_{nd-1-j}; we reproduce that exactly (it is only "wrong" in the
  sense that the kernel is not centred; the published models all use square kernels).
- v0 (bilinear scatter): 1-D: P[0] -> axis 0; 2-D: P[0] -> rows, P[1] -> columns; 3-D: P[0] -> axis 0,
  P[1] -> axis 2, P[2] -> axis 1 (the reference's own ordering). No normalisation; taps that fall outside
  the grid are dropped; floor carries no gradient.
Normalised versions divide each tap by (sum of its dense profile + 1e-7), like the reference.

On the CPU, v0 and v1 are built as scatters of each tap's 2^nd corners into the grid (v0 is the reference's own
bilinear scatter; v1's profile relu(1 - |u|) is nonzero at floor(p) and floor(p) + 1 only, so the same two
points per axis, with the same formula, give the same values, normaliser and gradients). XLA:CPU runs the einsum
as one small product per (o, i) at a fixed cost each (ConvNeXt-T-DCLS's 18 kernels: 12.7 ms forward, 44 ms with
the gradients of weight and positions; the scatter 5.7 and 3.6 ms, 2-core CPU). Elsewhere the einsum runs (a
GPU's scatter-add sums in no fixed order, a TPU's is slow); `SCATTER` overrides (None: by backend).

`abs` is taken as sign(x) * x and `relu` as jax.nn.relu so that, like torch, their gradients are 0 at 0
(SIG = 0 for "max", positions exactly on integers for "v1"). Gauss distances are squared directly (no norm).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

VERSIONS = ("v0", "v1", "gauss", "max")
SCATTER: bool | None = None
_V0_AXIS = {1: (0,), 2: (0, 1), 3: (0, 2, 1)}  # spatial axis moved by P[j] in v0


def _abs(x):
    """|x| with gradient sign(x) (0 at 0), as torch.abs."""
    return jnp.sign(x) * x


def _sizes(dilated_kernel_size, nd: int) -> tuple[int, ...]:
    d = tuple(dilated_kernel_size) if isinstance(dilated_kernel_size, Sequence) else (dilated_kernel_size,) * nd
    if len(d) != nd or any(int(v) < 1 for v in d):
        raise ValueError(f"dilated_kernel_size must be {nd} positive ints, got {dilated_kernel_size}")
    return tuple(int(v) for v in d)


def _profiles(P, SIG, d, version):
    """Per P-index j: (spatial axis, profile (O, I, K, d_axis)), and the normaliser denominator (or None)."""
    nd = len(d)
    out = []
    for j in range(nd):
        axis = _V0_AXIS[nd][j] if version == "v0" else nd - 1 - j
        grid = jnp.arange(d[axis], dtype=P.dtype)
        p = P[j] + (d[j] // 2)
        if version == "v0":
            f = lax.stop_gradient(jnp.floor(p))
            r = (p - f)[..., None]
            g = jnp.where(grid == f[..., None], 1 - r, 0) + jnp.where(grid == f[..., None] + 1, r, 0)
        else:
            u = grid - p[..., None]
            if version == "v1":
                g = jax.nn.relu(1 - _abs(u))
            elif version == "max":
                g = jax.nn.relu((_abs(SIG[j]) + 1.0)[..., None] - _abs(u))
            else:  # gauss
                s = (_abs(SIG[j]) + 0.27)[..., None]
                g = jnp.exp(-0.5 * (u / s) ** 2)
        out.append((axis, g))
    norm = None
    if version != "v0":
        norm = 1.0
        for _, g in out:
            norm = norm * g.sum(-1)
        norm = norm + 1e-7
    return out, norm


def _corner_scatter(weight, P, d, version):
    """The v0 or v1 kernel (O, I/g, *dense, *d) as a scatter: tap k adds W times its profile's values at its 2^nd
    corners floor(p) + {0, 1} (v0: 1 - r and r; v1: relu(1 - |grid - p|), as `_profiles`), divided for v1 by the
    same normaliser; corners outside the grid are dropped, floor carries no gradient."""
    nd = P.shape[0]
    lead = weight.shape[:-1]
    size = math.prod(d)
    strides = [math.prod(d[a + 1:]) for a in range(nd)]
    axes = _V0_AXIS[nd] if version == "v0" else tuple(nd - 1 - j for j in range(nd))
    points, values, inside = [], [], []          # per P-index j: the two corners' grid points, values, masks
    for j in range(nd):
        p = P[j] + (d[j] // 2)
        f = lax.stop_gradient(jnp.floor(p))
        at = (f, f + 1)                          # float: no integer overflow for wild positions
        if version == "v0":
            values.append((1 - (p - f), p - f))
        else:
            values.append(tuple(jax.nn.relu(1 - _abs(g - p)) for g in at))
        inside.append(tuple((g >= 0) & (g < d[axes[j]]) for g in at))
        points.append(tuple(jnp.clip(g, 0, d[axes[j]] - 1).astype(jnp.int32) for g in at))
    w = weight
    if version == "v1":                          # the profile's sum over the grid: its in-grid corners
        norm = 1.0
        for vals, ins in zip(values, inside):
            norm = norm * (jnp.where(ins[0], vals[0], 0) + jnp.where(ins[1], vals[1], 0))
        w = weight / (norm + 1e-7)
    idx, val = [], []
    for corner in itertools.product((0, 1), repeat=nd):
        flat, ok, v = 0, True, w
        for j, c in enumerate(corner):
            ok = ok & inside[j][c]
            flat = flat + points[j][c] * strides[axes[j]]
            v = v * values[j][c]
        idx.append(jnp.where(ok, flat, size))    # past the end: dropped
        val.append(v)
    b = math.prod(lead)
    rows = jnp.arange(b)[:, None]
    out = jnp.zeros((b, size), weight.dtype).at[rows, jnp.stack(idx, -1).reshape(b, -1)].add(
        jnp.stack(val, -1).reshape(b, -1), mode="drop")
    if version == "v1":   # a NaN position makes its profile, its normaliser and so its whole kernel NaN (reference)
        out = jnp.where(jnp.isnan(P).any(axis=(0, -1)).reshape(b, 1), jnp.nan, out)
    return out.reshape(*lead, *d)


def construct_kernel(weight, P, SIG, dilated_kernel_size, version: str):
    """Dense kernel (O, I/groups, *dense, *dilated_kernel_size) from weight (O, I/g, *dense, K), P and SIG
    (nd, O, I/g, *dense, K).

    `dense` is empty for Dcls1d/2d/3d; Dcls3_1d (dcls 0.1.1's N_Md design) has two dense (fixed-tap) axes before
    its one learnable axis: each of its dense taps is a 1-D DCLS kernel. SIG is used by "gauss" and "max" only
    (pass None otherwise). Same numbers as dcls 0.1.1."""
    if version not in VERSIONS:
        raise ValueError(f"unknown DCLS version {version!r}; expected one of {VERSIONS}")
    nd = P.shape[0]
    if nd not in (1, 2, 3) or weight.ndim < 3:
        raise ValueError(f"P must have shape (nd, O, I/g, [*dense,] K) with nd in 1..3, got {P.shape}")
    d = _sizes(dilated_kernel_size, nd)
    if P.shape[1:] != weight.shape:
        raise ValueError(f"P shape {P.shape} does not match weight shape {weight.shape}")
    if version in ("gauss", "max"):
        if SIG is None or SIG.shape != P.shape:
            raise ValueError(f"version {version!r} needs SIG of shape {P.shape}, got "
                             f"{None if SIG is None else SIG.shape}")
    if version in ("v0", "v1") and (SCATTER if SCATTER is not None else jax.default_backend() == "cpu"):
        return _corner_scatter(weight, P, d, version)
    profiles, norm = _profiles(P, SIG, d, version)
    w = weight if norm is None else weight / norm
    letters, dense = "xyz", "abcdefgh"[:weight.ndim - 3]
    by_axis = dict(profiles)
    operands = [w] + [by_axis[a] for a in range(nd)]
    lead = "oi" + dense
    spec = f"{lead}k," + ",".join(f"{lead}k{letters[a]}" for a in range(nd)) + f"->{lead}" + letters[:nd]
    return jnp.einsum(spec, *operands, precision=lax.Precision.HIGHEST)
