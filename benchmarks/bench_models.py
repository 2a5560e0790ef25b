"""Whole-model speed: forward, Grad-CAM step and train step of the registry's models against timm (+ dcls),
measured in the same run, random weights, random inputs at the model's input size.

    python benchmarks/bench_models.py                                   # CPU: 3 models, batch 8, forward + CAM
    python benchmarks/bench_models.py --models all --batch 8 --passes forward,cam
    python benchmarks/bench_models.py --models convnext_tiny,convnext_tiny_dcls --passes forward --impl fft
    python benchmarks/bench_models.py --models all --batch 64 --passes forward,cam,train   # a GPU

forward: the eval-mode model on (B, S, S, 3), jitted; PyTorch under torch.no_grad on (B, 3, S, S).
cam:     Grad-CAM and Threshold-Grad-CAM from one backward pass, resized to 224 (cam.make_cams_fn, jitted)
         against the study's PyTorch step (forward hook + autograd.grad, benchmarks/bench_evaluate.torch_cams).
train:   benchmarks/bench_train.py's steps (forward, loss, backward, AdamW; --precision) at --batch and S.
Prints milliseconds per call (train: img/s) and PyTorch time / JAX time (> 1: JAX faster), and the depthwise
convolution implementation the dispatcher chose (dcls_jax.conv; --impl forces one), and in the header the one
the Linear and pointwise layers run (dcls_jax.dense; DCLS_JAX_DENSE=xla|native forces one). PyTorch uses --threads
threads (default 2, as many as XLA:CPU's on the 2-core machine); it runs on CUDA when available.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
from timing import keep_freed_memory, paired_ms  # noqa: E402  (benchmarks/, the script's folder)

DEFAULT = ("resnet50", "convnext_tiny", "convnext_tiny_dcls")




def _dw_impls(name: str, size: int, batch: int) -> str:
    """The implementations conv() picks for the model's depthwise convolutions (traced, not run)."""
    import jax
    from flax import nnx

    import models
    conv_mod = sys.modules["dcls_jax.conv"]
    seen, orig = [], conv_mod.selected_impl

    def spy(x_shape, w_shape, stride=1, padding=0, groups=1, *a, **k):
        r = orig(x_shape, w_shape, stride, padding, groups, *a, **k)
        if groups == x_shape[-1] == w_shape[0] and w_shape[1] == 1:       # depthwise
            seen.append(f"{r}{'x'.join(map(str, w_shape[2:]))}")
        return r
    conv_mod.selected_impl = spy
    try:
        model = models.create_model(name, rngs=nnx.Rngs(0))
        model.eval()
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32))
    finally:
        conv_mod.selected_impl = orig
    return ",".join(sorted(set(seen))) or "-"


def bench(name: str, passes, batch: int, iters: int, precision: str):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import models
    from bench_evaluate import METHODS, torch_cams, torch_model
    from cam.methods import make_cams_fn
    from dcls_jax.options import compiler_options

    entry = models.get_entry(name)
    size = entry.input_size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, entry.num_classes, batch)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tsync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    row = {"model": name, "impl": _dw_impls(name, size, batch)}
    model = models.create_model(name, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    xj = jnp.asarray(x)
    tm = xt = None
    if {"forward", "cam"} & set(passes):
        tm = torch_model(name).to(dev).eval()
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)
    if "forward" in passes:     # JAX and PyTorch calls alternate (timing.paired_ms)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=compiler_options())

        def tfwd():
            with torch.no_grad():
                return tm(xt)
        row["fwd_jax"], row["fwd_torch"] = paired_ms(
            [(lambda: fwd(state, xj), jax.block_until_ready), (tfwd, tsync)], iters)
    if "cam" in passes:
        cams = jax.jit(make_cams_fn(graphdef, METHODS, output_size=(224, 224)), compiler_options=compiler_options())
        lj = jnp.asarray(labels, jnp.int32)
        layer = tm.get_submodule(entry.target_layer)
        lt = torch.from_numpy(labels).long().to(dev)
        row["cam_jax"], row["cam_torch"] = paired_ms(
            [(lambda: cams(state, xj, lj), jax.block_until_ready), (lambda: torch_cams(tm, layer, xt, lt), tsync)],
            iters)
    if "train" in passes:
        import bench_train
        row["train_jax"] = bench_train.jax_step(name, batch, size, precision, False, iters, 1)
        row["train_torch"] = bench_train.torch_step(name, batch, size, precision, False, iters, 1)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT), help="comma-separated names, or 'all'")
    ap.add_argument("--passes", default="forward,cam", help="comma-separated: forward, cam, train")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="train step precision")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    ap.add_argument("--impl", default=None, help="force a depthwise implementation (dcls_jax.conv.IMPLS)")
    ap.add_argument("--keep-memory", action="store_true",
                    help="keep freed memory in the process (glibc mallopt; timing.keep_freed_memory): no page "
                         "faults on large per-call buffers, for JAX and PyTorch alike")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    kept = keep_freed_memory() if args.keep_memory else False
    if args.impl:
        os.environ["DCLS_JAX_CONV"] = args.impl
    import jax
    import torch
    torch.set_num_threads(args.threads)

    import dcls_jax
    import models
    names = [n for n in models.list_models() if not n.startswith("test_")] if args.models == "all" else args.models.split(",")
    passes = args.passes.split(",")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"batch {args.batch}, median of {args.iters} (calls alternating); ratio = PyTorch time / JAX time; "
          f"malloc: {'freed memory kept' if kept else 'default'}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"jit compiler_options={dcls_jax.compiler_options()}; Linear / pointwise layers: "
          f"{dcls_jax.dense.selected_impl()} (dcls_jax.dense)", flush=True)
    head = f"{'model':24} {'dw impl':14}"
    for p in passes:
        head += f" {p + ' jax':>11} {p + ' torch':>12} {'ratio':>6}"
    print(head, flush=True)
    for name in names:
        try:
            r = bench(name, passes, args.batch, args.iters, args.precision)
        except Exception as e:  # noqa: BLE001 -- report and go on with the next model
            print(f"{name:24} failed: {type(e).__name__}: {e}", flush=True)
            continue
        line = f"{name:24} {r['impl']:14}"
        for p in passes:
            key = {"forward": "fwd", "cam": "cam", "train": "train"}[p]
            j, t = r[f"{key}_jax"], r[f"{key}_torch"]
            ratio = j / t if key == "train" else t / j          # train figures are img/s
            line += f" {j:11.1f} {t:12.1f} {ratio:6.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
