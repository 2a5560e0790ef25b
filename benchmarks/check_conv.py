"""Correctness of every depthwise implementation on this machine's backend (the accelerator run's check):
forward and both gradients against lax.conv_general_dilated at precision HIGHEST, fp32 and bf16, at test shapes
and at the benchmark's size. On a GPU "pallas" is the Triton kernel, on a TPU the Mosaic one (natively).

    python benchmarks/check_conv.py              # prints one line per case and implementation, exit 1 on failure
    python benchmarks/check_conv.py --big 128    # adds (128, 56, 56, 96) with 7x7 and 17x17 kernels

Tolerances: fp32 relative (max |a - b| / max |b|) <= 1e-5; bf16 <= 2^-5 relative to the largest |reference|
(bf16 inputs and outputs, float32 reference on the same bf16 values).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import dcls_jax  # noqa: E402

IMPLS = ("xla", "shifted", "fft", "shifted_fft", "pallas")
CASES = [((2, 9, 11, 5), (3, 4), 1, 0), ((1, 12, 10, 3), (3, 3), 2, 1), ((2, 13, 13, 9), (7, 7), 2, 5),
         ((1, 6, 7, 4), (9, 10), 1, 6), ((2, 20, 18, 40), (17, 17), 1, 8), ((1, 11, 9, 3), (17, 16), 2, 9),
         ((1, 16, 14, 6), (31, 31), 1, 15), ((4, 56, 56, 96), (7, 7), 1, 3), ((4, 56, 56, 96), (17, 17), 1, 8)]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(shape, k, stride, pad, dtype) -> bool:
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=(c, 1, *k)), dtype)

    def ref(x, w):
        return lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (stride, stride),
                                        [(pad, pad)] * 2, dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                        feature_group_count=c, precision=lax.Precision.HIGHEST)

    y0 = ref(x, w)
    ct = jnp.asarray(rng.normal(size=y0.shape), dtype)
    g0 = jax.jit(lambda x, w: jax.vjp(ref, x, w)[1](ct.astype(jnp.float32)))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -5
    ok = True
    for impl in IMPLS:
        f = lambda x, w: dcls_jax.conv(x, w, stride, pad, c, impl=impl)  # noqa: E731
        try:
            y, (gx, gw) = jax.jit(lambda x, w, ct: (f(x, w), jax.vjp(f, x, w)[1](ct)))(x, w, ct)
            errs = (rel(y, y0), rel(gx, g0[0]), rel(gw, g0[1]))
            good = max(errs) <= tol and y.dtype == dtype
            msg = "y %.1e dx %.1e dw %.1e" % errs
        except Exception as e:  # noqa: BLE001 -- report every implementation
            good, msg = False, f"{type(e).__name__}: {str(e)[:300]}"
        ok &= good
        print(f"{str(shape):18} k{k} s{stride} p{pad} {jnp.dtype(dtype).name:8} {impl:8} "
              f"{'ok  ' if good else 'FAIL'} {msg}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", type=int, default=0, help="batch of an extra (B, 56, 56, 96) 17x17 case")
    args = ap.parse_args()
    print("jax", jax.__version__, jax.devices(), flush=True)
    cases = CASES + ([((args.big, 56, 56, 96), (17, 17), 1, 8)] if args.big else [])
    ok = True
    for dtype in (jnp.float32, jnp.bfloat16):
        for case in cases:
            ok &= check(*case, dtype)
    print("ALL OK" if ok else "FAILURES", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
