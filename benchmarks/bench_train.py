"""Train-step throughput: the jitted train step (evaluation.training, what train.py runs) against the PyTorch
reference (timm + dcls) in the same run.

Both sides run forward, label-smoothed cross-entropy, backward and AdamW on the same batch of random images at
the same precision (bf16: autocast in PyTorch, bfloat16 compute in JAX with float32 parameters); the DCLS
models also clamp their positions after each step. The JAX step keeps train.py's per-step work (normalising the
uint8 batch on the device, reseeding drop path); mixup, erasing and EMA are off on both sides.

    python benchmarks/bench_train.py                                   # small, CPU: tiny ConvNeXts, 64 px, fp32
    python benchmarks/bench_train.py --full                            # GPU: batch 128, 224 px, bf16
    python benchmarks/bench_train.py --batch 64 --size 160 --precision fp32 --models convnext_tiny

One H100 (results/h100_train.txt, --full): convnext_tiny 3257 img/s vs PyTorch 2409 (1.35x), convnext_tiny_dcls
368 vs 296 (1.24x). CPU figures only smoke-test the script: on a shared 2-core machine PyTorch's threads are
easily starved and its numbers swing by 10x between runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import configs  # noqa: E402
from evaluation import training  # noqa: E402

TINY = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}
TINY_DCLS = {"kernel_count": 6, "dilated_kernel_size": 7}
DROP_PATH = configs.Config.drop_path   # both sides' stochastic depth


def jax_step(name: str, batch: int, size: int, precision: str, tiny: bool, steps: int, warmup: int) -> float:
    kwargs = dict(TINY, **(TINY_DCLS if "dcls" in name else {})) if tiny else {}
    cfg = configs.Config(model=name, model_kwargs=kwargs, batch_size=batch, image_size=size,
                         compute_dtype={"bf16": "bfloat16", "fp32": "float32"}[precision], mixup=0.0, cutmix=0.0,
                         random_erasing=0.0, ema_decay=0.0, warmup_steps=0, total_steps=10_000, lr_base_batch=0)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    t = training.create(cfg, mesh, cfg.total_steps, cfg.total_steps)
    step = training.make_train_step(cfg, t.graphdef, t.tx, t.schedule, cfg.total_steps, t.state_sharding)
    rng = np.random.default_rng(0)
    data = NamedSharding(mesh, P("data"))
    inputs = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
              "label": rng.integers(0, cfg.num_classes, batch).astype(np.int32),
              "erase": np.zeros((batch, 4), np.int32)}
    inputs = {k: jax.device_put(v, data) for k, v in inputs.items()}
    state = t.state
    for _ in range(warmup):
        state, metrics = step(state, t.rest, inputs)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, t.rest, inputs)
    jax.block_until_ready((state, metrics))
    return steps * batch / (time.perf_counter() - start)


def torch_model(name: str, tiny: bool):
    """The PyTorch reference in train mode, drop path 0.1 as configs.Config's default: full-size, any of the
    registry's models as the parity tests build them (bench_evaluate.torch_model); tiny, a ConvNeXt of TINY
    (+ TINY_DCLS), as jax_step's."""
    import timm
    if not tiny:
        from bench_evaluate import torch_model as reference
        return reference(name, drop_path_rate=DROP_PATH).train()
    if not name.startswith("convnext") or name.endswith("_gauss"):
        raise ValueError(f"--tiny builds ConvNeXt models only (depths and dims of {TINY}); got {name}")
    from tests.torch_ref import dclsify
    model = timm.create_model(name.removesuffix("_dcls"), drop_path_rate=DROP_PATH, **TINY)
    if name.endswith("_dcls"):
        dclsify([[(block, "conv_dw") for block in stage.blocks] for stage in model.stages],
                kernel_count=TINY_DCLS["kernel_count"], dilated_kernel_size=TINY_DCLS["dilated_kernel_size"],
                version="v0")
    return model.train()


def torch_step(name: str, batch: int, size: int, precision: str, tiny: bool, steps: int, warmup: int) -> float:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch_model(name, tiny).to(device)
    layers = [m for m in model.modules() if hasattr(m, "clamp_parameters")]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def one():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in layers:
            layer.clamp_parameters()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        one()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return steps * batch / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "convnext_tiny_dcls"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="ConvNeXt with 1-block stages, 16-128 channels, DCLS 7/6 (default: the ConvNeXt models "
                             "on the CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="batch 128, 224 px, bf16, full-size models")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    args = parser.parse_args(argv)
    if args.full:
        args.batch, args.size, args.precision, args.tiny = 128, 224, "bf16", False
    cpu = jax.default_backend() == "cpu"

    def tiny(name):   # default: tiny for ConvNeXt models on the CPU
        return (cpu and name.startswith("convnext") and not name.endswith("_gauss")) if args.tiny is None \
            else args.tiny
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; batch {args.batch}, {args.size} px, "
          f"{args.precision}, {args.steps} timed steps")
    common = (args.batch, args.size, args.precision)
    timing = (args.steps, args.warmup)
    # PyTorch first: on CPU, XLA's idle worker threads would otherwise slow PyTorch down.
    ref = {name: torch_step(name, *common, tiny(name), *timing) if args.torch else float("nan")
           for name in args.models}
    print(f"{'model':<22} {'size':>9} {'JAX img/s':>10} {'PyTorch img/s':>14} {'JAX/PyTorch':>12}")
    for name in args.models:
        ours = jax_step(name, *common, tiny(name), *timing)
        print(f"{name:<22} {'tiny' if tiny(name) else 'full':>9} {ours:>10.1f} {ref[name]:>14.1f} "
              f"{ours / ref[name]:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
