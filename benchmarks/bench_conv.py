"""Depthwise and DCLS convolution speed per implementation (dcls_jax.conv) against PyTorch, in the same run.

    python benchmarks/bench_conv.py                           # CPU: batch 8, fp32, every case
    python benchmarks/bench_conv.py --batch 128 --dtypes fp32,bf16 --iters 20       # a GPU
    python benchmarks/bench_conv.py --cases dcls --impls fft,shifted --passes fwdbwd

Cases (ConvNeXt-T at 224): each stage's depthwise 7x7 ((B,56,56,96), (B,28,28,192), (B,14,14,384),
(B,7,7,768)) and 17x17 (the DCLS dense kernel), then the DCLS layer Dcls2d depthwise at (B,56,56,96): v0 17/34,
v1 17/34, gauss 23/26 (kernel construction + convolution). Passes: forward, and forward + backward (gradients of
sum(y * ct) w.r.t. x and the kernel; for DCLS w.r.t. x, weight, P, SIG). For every implementation and "auto"
(the dispatcher's pick, named) it prints milliseconds; PyTorch runs torch.nn.functional.conv2d (groups = C) or
dcls 0.1.1's Dcls2d, on CUDA when available, with --threads CPU threads (default 2, XLA:CPU's on this machine);
ratio = PyTorch time / auto time. On a GPU it adds the physical floor (2 * N*H*W*C*taps flops, x3 with the
backward, at --peak-tflops; or the bytes at --peak-gbs, whichever is longer) as the fraction floor / auto time.
Pallas on CPU runs in interpret mode (far too slow to time): it is skipped there unless named in --impls; "native"
(the C++ CPU kernels) runs on the CPU only.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from timing import keep_freed_memory, paired_ms  # noqa: E402  (benchmarks/, the script's folder)

STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))
DCLS = (("v0", 17, 34), ("v1", 17, 34), ("gauss", 23, 26))




def jax_conv_fn(impl, k, passes, dtype):
    import jax

    import dcls_jax

    def f(x, w):
        return dcls_jax.conv(x, w, 1, k // 2, x.shape[-1], impl=None if impl == "auto" else impl)

    if passes == "fwd":
        return jax.jit(f)

    @jax.jit
    def fb(x, w, ct=None):
        y, vjp = jax.vjp(f, x, w)
        return vjp(y.astype(dtype))   # ct = y: no extra input, same work
    return fb


def jax_dcls_fn(impl, version, d, kc, c, passes):
    import jax
    from flax import nnx

    import dcls_jax
    conv_mod = importlib.import_module("dcls_jax.conv")
    layer = dcls_jax.Dcls2d(c, c, kc, padding=d // 2, dilated_kernel_size=d, groups=c, version=version,
                            rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def f(p, x):
        with conv_mod.use_impl(impl):
            return nnx.merge(graphdef, p)(x)

    if passes == "fwd":
        step = jax.jit(f)
    else:
        @jax.jit
        def step(p, x):
            y, vjp = jax.vjp(f, p, x)
            return vjp(y)
    return lambda x: step(params, x)


def torch_fn(kind, x_np, k_or_cfg, passes, dtype, dev):
    import torch
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(dev, tdtype)
    c = xt.shape[1]
    if kind == "conv":
        k = k_or_cfg
        w = torch.randn(c, 1, k, k, device=dev, dtype=tdtype)
        mod = lambda x: torch.nn.functional.conv2d(x, w, padding=k // 2, groups=c)  # noqa: E731
        params = [w]
    else:
        from DCLS.construct.modules import Dcls2d
        version, d, kc = k_or_cfg
        layer = Dcls2d(c, c, kc, padding=d // 2, dilated_kernel_size=d, groups=c, version=version).to(dev)
        params = list(layer.parameters())
        if tdtype == torch.bfloat16:   # dcls builds its kernel in the parameters' dtype: autocast, as in training
            xt = xt.float()

            def mod(x):
                with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                    return layer(x)
        else:
            mod = layer
    if passes == "fwd":
        def run():
            with torch.no_grad():
                return mod(xt)
        return run
    xg = xt.clone().requires_grad_(True)

    def run():
        for p in params:
            p.grad = None
        xg.grad = None
        y = mod(xg)
        y.backward(y.detach())
        return xg.grad
    for p in params:
        p.requires_grad_(True)
    return run


def floor_ms(shape, taps, passes, dtype, peak_tflops, peak_gbs):
    n = int(np.prod(shape))
    mult = 1 if passes == "fwd" else 3
    flops = 2 * n * taps * mult
    nbytes = n * (2 if dtype == "bf16" else 4) * (2 if passes == "fwd" else 5)
    return 1e3 * max(flops / (peak_tflops * 1e12), nbytes / (peak_gbs * 1e9))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--passes", default="fwd,fwdbwd")
    ap.add_argument("--cases", default="stages,dcls", help="stages (7x7 and 17x17 per stage), dcls")
    ap.add_argument("--kernels", default="7,17")
    ap.add_argument("--impls", default=None, help="comma-separated (default: every one that runs natively)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=67.0, help="fp32 non-tensor rate (H100/H200 SXM: 67)")
    ap.add_argument("--peak-gbs", type=float, default=3350.0, help="memory bandwidth (H100 SXM 3350, H200 4800)")
    ap.add_argument("--keep-memory", action="store_true",
                    help="keep freed memory in the process (glibc mallopt; timing.keep_freed_memory)")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    kept = keep_freed_memory() if args.keep_memory else False

    import jax
    import jax.numpy as jnp
    import torch
    torch.set_num_threads(args.threads)
    conv_mod = importlib.import_module("dcls_jax.conv")
    backend = jax.default_backend()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tsync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    impls = (args.impls.split(",") if args.impls else
             [i for i in conv_mod.IMPLS if (i != "pallas" or backend in ("gpu", "tpu"))
              and (i != "native" or backend == "cpu")])
    gpu = backend == "gpu"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {dev} ({torch.get_num_threads()} threads)"
          f", batch {args.batch}, median of {args.iters} (ms, calls alternating); ratio = torch / auto; malloc: "
          f"{'freed memory kept' if kept else 'default'}", flush=True)
    cols = impls + ["auto"]
    head = f"{'case':22} {'dtype':5} {'pass':6} " + " ".join(f"{c:>9}" for c in cols) + \
        f" {'auto is':>8} {'torch':>9} {'ratio':>6}" + (f" {'floor':>6}" if gpu else "")
    print(head, flush=True)
    rng = np.random.default_rng(0)
    for dtype in args.dtypes.split(","):
        jdt = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
        cases = []
        if "stages" in args.cases:
            for (hw, c) in STAGES:
                for k in map(int, args.kernels.split(",")):
                    cases.append(("conv", f"dw{k}x{k} {hw}x{hw}x{c}", hw, c, k))
        if "dcls" in args.cases:
            for cfg in DCLS:
                cases.append(("dcls", f"Dcls2d {cfg[0]} {cfg[1]}/{cfg[2]}", 56, 96, cfg))
        for kind, label, hw, c, kk in cases:
            x_np = rng.normal(size=(args.batch, hw, hw, c)).astype(np.float32)
            x = jnp.asarray(x_np, jdt)
            k = kk if kind == "conv" else kk[1]
            w = jnp.asarray(rng.normal(size=(c, 1, k, k)), jdt)
            auto = conv_mod.selected_impl(x.shape, w.shape, 1, k // 2, c, 1, jdt)
            for passes in args.passes.split(","):
                # every implementation and PyTorch compiled / warmed first, then timed with calls alternating
                runs, names = [], list(cols) + ([] if args.no_torch else ["torch"])
                for impl in names:
                    try:
                        if impl == "torch":
                            fn, sync = torch_fn(kind, x_np, kk, passes, dtype, dev), tsync
                        elif kind == "conv":
                            f = jax_conv_fn(impl, k, passes, jdt)
                            fn, sync = (lambda f=f: f(x, w)), jax.block_until_ready
                        else:
                            f = jax_dcls_fn(impl, *kk, c, passes)
                            fn, sync = (lambda f=f: f(x)), jax.block_until_ready
                        sync(fn())
                        runs.append((impl, fn, sync))
                    except Exception as e:  # noqa: BLE001 -- one failing implementation must not stop the table
                        print(f"  {label} {impl} {passes}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                timed = dict(zip([r[0] for r in runs], paired_ms([r[1:] for r in runs], args.iters, warmup=0)))
                times = [timed.get(impl, float("nan")) for impl in cols]
                tt = timed.get("torch", float("nan"))
                line = f"{label:22} {dtype:5} {passes:6} " + " ".join(f"{t:9.2f}" for t in times) + \
                    f" {auto:>8} {tt:9.2f} {tt / times[-1]:6.2f}"
                if gpu:
                    line += f" {floor_ms(x.shape, k * k, passes, dtype, args.peak_tflops, args.peak_gbs) / times[-1]:6.3f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
