"""The dense layers' implementations (dcls_jax.dense) against each other and PyTorch, in one process.

    python benchmarks/bench_dense.py --iters 9 [--models convnext_tiny,resnet50] [--parts attention] [--keep-memory]

1. The Linear shapes of ConvNeXt-T's four stages at batch 8 (rows x in -> out, PyTorch's (out, in) weight):
   the C++ GEMM ("native") and XLA's dot ("xla", jnp.einsum), calls alternating, then
   torch.nn.functional.linear on its own (libgomp's threads spin-wait after each PyTorch call: alternated with
   it, a 6 ms JAX product ran up to 2x slower); ms and GFLOP/s. No bias.
2. The weight gradients of the same layers (g.T @ x over the rows), the C++ GEMM against XLA's dot: what
   `dense._product` (XLA for these) rests on.
3. Attention (dcls_jax.attention) at CAFormer-S18's and FastViT's shapes, batch 8: the C++ call against the
   XLA form (einsums and softmax), calls alternating, then PyTorch's
   torch.nn.functional.scaled_dot_product_attention on its own.
4. Whole-model forwards with every Linear / pointwise layer (and attention) on "native" against "xla" (two jits
   of the same model, traced under DCLS_JAX_DENSE=native and =xla, calls alternating): the in-model effect,
   which the isolated products (their output allocated afresh each call) do not show.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
from timing import keep_freed_memory, paired_ms  # noqa: E402

SHAPES = ((25088, 96, 384), (25088, 384, 96), (6272, 192, 768), (6272, 768, 192), (1568, 384, 1536),
          (1568, 1536, 384), (392, 768, 3072), (392, 3072, 768))


def products(iters):
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import dcls_jax
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x, w = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
        fns = [(lambda f=jax.jit(lambda x, w, i=impl: dcls_jax.linear(x, w, impl=i),
                                 compiler_options=dcls_jax.compiler_options()): f(xj, wj), jax.block_until_ready)
               for impl in ("native", "xla")]
        times = paired_ms(fns, iters)
        with torch.no_grad():   # timed apart: PyTorch's OpenMP threads spin after each call, taking the cores
            times += paired_ms([(lambda: F.linear(xt, wt), lambda _: None)], iters)
        gf = 2 * m * k * n / 1e9
        yield f"{m}x{k}->{n}", times, [gf / t * 1e3 for t in times]


def weight_grads(iters):
    import jax
    import jax.numpy as jnp

    import dcls_jax
    rng = np.random.default_rng(1)
    for m, k, n in SHAPES:
        g, x = jnp.asarray(rng.normal(size=(m, n)), jnp.float32), jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
        native = jax.jit(lambda g, x: dcls_jax.dense.matmul(g, x, True, False))
        xla = jax.jit(lambda g, x: jnp.einsum("mo,mi->oi", g, x), compiler_options=dcls_jax.compiler_options())
        times = paired_ms([(lambda f=f: f(g, x), jax.block_until_ready) for f in (native, xla)], iters)
        yield f"({n}, {k}) over {m}", times, [2 * m * k * n / t / 1e6 for t in times]


ATTENTION = ((8, 196, 10, 32), (8, 49, 16, 32), (8, 64, 24, 32), (1, 196, 10, 32))   # batch, tokens, heads, dim


def attentions(iters):
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import dcls_jax
    rng = np.random.default_rng(2)
    for b, n, h, d in ATTENTION:
        qkv = rng.normal(size=(b, n, 3 * h * d)).astype(np.float32)
        qj = jnp.asarray(qkv)
        fns = [(lambda f=jax.jit(lambda x, i=impl: dcls_jax.attention(x, h, impl=i),
                                 compiler_options=dcls_jax.compiler_options()): f(qj), jax.block_until_ready)
               for impl in ("native", "xla")]
        times = paired_ms(fns, iters)
        q, k, v = torch.from_numpy(qkv).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        with torch.no_grad():
            times += paired_ms([(lambda: F.scaled_dot_product_attention(q, k, v), lambda _: None)], iters)
        yield f"{b}x{n} tokens, {h}x{d}", times


def models_ab(names, iters):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dcls_jax
    import models
    for name in names:
        model = models.create_model(name, rngs=nnx.Rngs(0))
        model.eval()
        graphdef, state = nnx.split(model)
        size = models.get_entry(name).input_size
        x = jnp.asarray(np.random.default_rng(0).normal(size=(8, size, size, 3)), jnp.float32)
        fns = []
        for impl in ("native", "xla"):
            os.environ[dcls_jax.dense.ENV_VAR] = impl   # read at trace time, i.e. at the first call
            f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=dcls_jax.compiler_options())
            jax.block_until_ready(f(state, x))
            fns.append((lambda f=f: f(state, x), jax.block_until_ready))
        os.environ.pop(dcls_jax.dense.ENV_VAR)
        yield name, paired_ms(fns, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--models", default="convnext_tiny,convnext_tiny_dcls,resnet50,caformer_s18,fastvit_sa24,"
                                        "convnext_base")
    ap.add_argument("--parts", default="products,grads,attention,models",
                    help="comma-separated: products, grads, attention, models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-memory", action="store_true", help="timing.keep_freed_memory (glibc mallopt)")
    args = ap.parse_args(argv)
    kept = keep_freed_memory() if args.keep_memory else False
    import jax
    import torch
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  jax {jax.__version__}, torch {torch.__version__} "
          f"({args.threads} threads), median of {args.iters} (ms, calls alternating); malloc: "
          f"{'freed memory kept' if kept else 'default'}", flush=True)
    parts = set(args.parts.split(","))
    if "products" in parts:
        print(f"{'x @ w.T':18} {'native':>8} {'xla':>8} {'torch':>8}   GFLOP/s native / xla / torch", flush=True)
        for name, times, rates in products(args.iters):
            print(f"{name:18} " + " ".join(f"{t:8.2f}" for t in times) + "   "
                  + " / ".join(f"{r:.0f}" for r in rates), flush=True)
    if "grads" in parts:
        print(f"\n{'weight gradient':24} {'native':>8} {'xla':>8}   GFLOP/s native / xla", flush=True)
        for name, times, rates in weight_grads(args.iters):
            print(f"{name:24} " + " ".join(f"{t:8.2f}" for t in times) + "   "
                  + " / ".join(f"{r:.0f}" for r in rates), flush=True)
    if "attention" in parts:
        print(f"\n{'attention':24} {'native':>8} {'xla':>8} {'torch':>8}", flush=True)
        for name, times in attentions(args.iters):
            print(f"{name:24} " + " ".join(f"{t:8.2f}" for t in times), flush=True)
    if "models" in parts:
        print(f"\n{'model forward, batch 8':24} {'native':>8} {'xla':>8}  xla/native", flush=True)
        for name, (a, b) in models_ab(args.models.split(","), args.iters):
            print(f"{name:24} {a:8.1f} {b:8.1f}  {b / a:.3f}", flush=True)


if __name__ == "__main__":
    main()
