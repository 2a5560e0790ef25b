"""dcls_jax.compiler_options: what the project's jits pass to XLA (the CPU's YNNPACK fusions off)."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dcls_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_turns_the_ynn_fusions_off_and_values_agree():
    opts = dcls_jax.compiler_options()
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": ""}
    opts["changed"] = "1"                                     # a fresh dict each call
    assert "changed" not in dcls_jax.compiler_options()
    assert dcls_jax.compiler_options("gpu") == {} and dcls_jax.compiler_options("tpu") == {}

    rng = np.random.default_rng(0)
    x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 9, 9, 32), (64, 32), (64,)))
    f = lambda x, w, b: jax.nn.gelu(jnp.einsum("...i,oi->...o", x, w) + b, approximate=False)   # noqa: E731
    compiled = jax.jit(f, compiler_options=dcls_jax.compiler_options()).lower(x, w, b).compile()
    assert "__ynn_fusion" not in compiled.as_text()
    ref = jax.nn.gelu(np.einsum("...i,oi->...o", np.float64(x), np.float64(w)) + np.float64(b), approximate=False)
    np.testing.assert_allclose(compiled(x, w, b), ref, rtol=1e-4, atol=1e-5)


def test_a_user_xla_flags_setting_wins():
    code = "import dcls_jax; print(dcls_jax.compiler_options())"
    env = dict(os.environ, PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "{}", run.stderr[-2000:]
