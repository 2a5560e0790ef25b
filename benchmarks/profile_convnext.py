"""ConvNeXt-T forward, op by op, JAX against PyTorch in the same run (CPU profiling aid for issue 11).

    python benchmarks/profile_convnext.py --batch 8 --iters 5 [--kernel 7|17] [--impls shifted,fft,xla]

For each stage's shapes it times, jitted one by one, the pieces of a ConvNeXt block (depthwise conv per
implementation, LayerNorm, Linear C->4C and 4C->C through dcls_jax.linear (the dense implementation the models
run: "native" on the CPU) and as XLA's dot, GELU, the whole block) plus the stem and the
downsamples, against the same PyTorch ops (timm's layout: depthwise conv on NCHW, the rest on NHWC) with
--threads threads. Prints ms per call and PyTorch / JAX.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
from timing import keep_freed_memory, paired_ms  # noqa: E402

STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))


def rows(batch, kernel, impls, iters):
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import dcls_jax
    from models import layers as L

    rng = np.random.default_rng(0)
    jsync, tsync = jax.block_until_ready, (lambda _: None)

    def both(name, jf, jargs, tf, targs):
        jf = jax.jit(jf, compiler_options=dcls_jax.compiler_options())
        with torch.no_grad():
            j, t = paired_ms([(lambda: jf(*jargs), jsync), (lambda: tf(*targs), tsync)], iters)
        yield name, j, t

    x = rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)
    ws = (rng.normal(size=(96, 3, 4, 4)) * 0.1).astype(np.float32)
    yield from both("stem conv 4x4/4 3->96", lambda x, w: dcls_jax.conv(x, w, 4), (jnp.asarray(x), jnp.asarray(ws)),
                    lambda x, w: F.conv2d(x, w, stride=4),
                    (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ws)))
    for i, (s, c) in enumerate(STAGES):
        h = rng.normal(size=(batch, s, s, c)).astype(np.float32)
        hj, ht = jnp.asarray(h), torch.from_numpy(h)
        htc = ht.permute(0, 3, 1, 2).contiguous()
        wdw = (rng.normal(size=(c, 1, kernel, kernel)) * 0.02).astype(np.float32)
        w1 = (rng.normal(size=(4 * c, c)) * 0.02).astype(np.float32)
        w2 = (rng.normal(size=(c, 4 * c)) * 0.02).astype(np.float32)
        b1, b2 = np.zeros(4 * c, np.float32), np.zeros(c, np.float32)
        u = rng.normal(size=(batch, s, s, 4 * c)).astype(np.float32)
        tag = f"s{i} {s}x{s}x{c}"
        for impl in impls:
            yield from both(f"{tag} dw{kernel} {impl}", lambda x, w, impl=impl: dcls_jax.conv(
                x, w, 1, kernel // 2, c, impl=None if impl == "auto" else impl),
                (hj, jnp.asarray(wdw)), lambda x, w: F.conv2d(x, w, padding=kernel // 2, groups=c),
                (htc, torch.from_numpy(wdw)))
        ln = L.LayerNorm(c)
        yield from both(f"{tag} layernorm", lambda x: ln(x), (hj,),
                        lambda x: F.layer_norm(x, (c,), eps=1e-6), (ht,))
        dense_impls = (("", dcls_jax.linear), (" xla", lambda x, w, b: jnp.einsum("...i,oi->...o", x, w) + b))
        for label, lin in dense_impls:
            yield from both(f"{tag} linear {c}->{4*c}{label}", lin, (hj, jnp.asarray(w1), jnp.asarray(b1)),
                            F.linear, (ht, torch.from_numpy(w1), torch.from_numpy(b1)))
        yield from both(f"{tag} gelu {4*c}", L.gelu, (jnp.asarray(u),), F.gelu, (torch.from_numpy(u),))
        for label, lin in dense_impls:
            yield from both(f"{tag} linear {4*c}->{c}{label}", lin, (jnp.asarray(u), jnp.asarray(w2), jnp.asarray(b2)),
                            F.linear, (torch.from_numpy(u), torch.from_numpy(w2), torch.from_numpy(b2)))
        gm = jnp.full((c,), 1e-6)

        def jblock(x, wdw, w1, b1, w2, b2):
            y = dcls_jax.conv(x, wdw, 1, kernel // 2, c)
            y = ln(y)
            y = dcls_jax.linear(L.gelu(dcls_jax.linear(y, w1, b1)), w2, b2)
            return x + y * gm

        tw = [torch.from_numpy(a) for a in (wdw, w1, b1, w2, b2)]

        def tblock(x, wdw, w1, b1, w2, b2):
            y = F.conv2d(x, wdw, padding=kernel // 2, groups=c).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), eps=1e-6)
            y = F.linear(F.gelu(F.linear(y, w1, b1)), w2, b2)
            return x + (y * 1e-6).permute(0, 3, 1, 2)
        yield from both(f"{tag} block (auto)", jblock, tuple(jnp.asarray(a) for a in (h, wdw, w1, b1, w2, b2)),
                        tblock, (htc, *tw))
        if i < 3:
            wd = (rng.normal(size=(2 * c, c, 2, 2)) * 0.02).astype(np.float32)
            yield from both(f"{tag} downsample LN+conv2x2/2", lambda x, w: dcls_jax.conv(ln(x), w, 2),
                            (hj, jnp.asarray(wd)),
                            lambda x, w: F.conv2d(F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6)
                                                  .permute(0, 3, 1, 2), w, stride=2), (htc, torch.from_numpy(wd)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--impls", default="auto,xla")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-memory", action="store_true", help="timing.keep_freed_memory (glibc mallopt)")
    args = ap.parse_args(argv)
    kept = keep_freed_memory() if args.keep_memory else False
    import jax
    import torch
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), batch {args.batch}, "
          f"median of {args.iters} (ms, calls alternating); ratio = torch / jax; malloc: "
          f"{'freed memory kept' if kept else 'default'}", flush=True)
    print(f"{'op':40} {'jax':>9} {'torch':>9} {'ratio':>6}", flush=True)
    for name, j, t in rows(args.batch, args.kernel, args.impls.split(","), args.iters):
        print(f"{name:40} {j:9.2f} {t:9.2f} {t / j:6.2f}", flush=True)


if __name__ == "__main__":
    main()
