"""XLA compiler options for the project's jitted functions: `jax.jit(f, compiler_options=compiler_options())`.

On the CPU, XLA:CPU's YNNPACK fusions (on by default in jaxlib 0.10) pull whole ConvNeXt / MetaFormer blocks
(LayerNorm, Linear, GELU, residual) into one library call, into which every scalar constant enters as a
broadcast activation-sized array (65 ms of a 450 ms ConvNeXt-T forward, batch 8, 2-core CPU); with them off,
dots run as XLA's own GEMMs and the elementwise ops as its loop fusions. Measured on that CPU, forward / Grad-CAM
step with the option against without: convnext_tiny 1.2x, convnext_tiny_dcls 1.3x / 1.15x, caformer_s18 1.55x
/ 1.5x, caformer_s18_dcls 1.35x / 1.3x, resnet50 and convformer_s18_dcls ~1.05x, fastvit_sa24 0.93x (its dense
stem convs are slower without YNNPACK; BENCHMARKS.md). Other backends: no options. Where the installed XLA
lacks the option (it is experimental), or XLA_FLAGS already sets it, nothing is added.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _usable(backend: str) -> bool:
    if backend != "cpu" or any(k in os.environ.get("XLA_FLAGS", "") for k in CPU_OPTIONS):
        return False
    try:   # an XLA that does not know an option rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:   # noqa: BLE001 (XlaRuntimeError or ValueError, depending on the version)
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options for `backend` (default: JAX's default backend); a fresh dict, empty where none apply."""
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if _usable(backend) else {}
