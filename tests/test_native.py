"""The C++ CPU kernels (dcls_jax.native) beyond test_conv's path-by-path parity: sharding over the batch, vmap,
second-order gradients, every vector/register-block edge, the compile cache's safety, the installed source."""
from __future__ import annotations

import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcls_jax
from dcls_jax import native
from test_conv import _reference as _ref, rel  # noqa: E402 (tests/ is on sys.path, as for test_dcls)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiled_here():
    assert native.available(), native.unavailable_reason()


# Channel counts around the 16-float vector and the 128-channel tile chunks, widths around the register blocks
# (1..12 columns), kernels wider than the map, negative effective padding in the input gradient (pad > k - 1),
# padding so wide that whole blocks of outputs read only zeros (no live taps: skipped).
EDGE_CASES = [((1, 3, 1, 1), (1, 1), 1, 0), ((2, 5, 13, 16), (3, 1), 1, 1), ((1, 9, 25, 17), (2, 5), 2, 0),
              ((2, 4, 11, 129), (5, 12), 1, 6), ((1, 6, 23, 200), (3, 13), 3, 2), ((1, 2, 2, 33), (1, 1), 1, 3),
              ((1, 3, 2, 17), (1, 2), 1, 20), ((2, 4, 3, 20), (2, 3), 2, 12)]


@pytest.mark.parametrize("shape, k, stride, pad", EDGE_CASES, ids=[f"{c[0][3]}c{c[1]}s{c[2]}p{c[3]}"
                                                                   for c in EDGE_CASES])
def test_blocks_and_chunks_equal_lax(shape, k, stride, pad):
    rng = np.random.default_rng(sum(shape) + sum(k))
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(shape[-1], 1, *k)), jnp.float32)

    def both(x, w):
        out = {}
        for name, f in (("ref", lambda a, b: _ref(a, b, stride, pad)),
                        ("native", lambda a, b: dcls_jax.conv(a, b, stride, pad, shape[-1], impl="native"))):
            y, vjp = jax.vjp(f, x, w)
            ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
            out[name] = (y, *vjp(ct))
        return out
    res = jax.jit(both)(x, w)
    for what, a, b in zip(("y", "dx", "dw"), res["native"], res["ref"]):
        assert a.shape == b.shape and rel(a, b) <= 1e-5, (what, rel(a, b))


def test_vmap_and_second_order_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 9, 8, 20)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(20, 1, 5, 4)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(3, 20, 1, 5, 4)), jnp.float32)

    def conv(impl, stride=1):
        return lambda x, w: dcls_jax.conv(x, w, stride, 2, 20, impl=impl)
    for fn, args in ((lambda c: jax.vmap(c, (0, None)), (x, w)),       # mapped input: folds into the batch
                     (lambda c: jax.vmap(c), (x, ws))):                  # mapped kernel too: a loop
        got, want = jax.jit(fn(conv("native")))(*args), fn(conv("xla"))(*args)
        assert rel(got, want) <= 1e-5

    # a saliency-style loss: the gradient of a gradient (harmonization), stride 2
    def loss(impl):
        inner = lambda w, x: jnp.sum(jnp.sin(conv(impl, 2)(x, w)))          # noqa: E731
        return jax.grad(lambda w: jnp.sum(jax.grad(inner, 1)(w, x[0]) ** 2))(w)
    assert rel(jax.jit(lambda: loss("native"))(), loss("xla")) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (2, 3, 5, 4)])
def test_fusion_barrier_is_the_identity(shape, dtype):
    x = jnp.asarray(np.random.default_rng(len(shape)).normal(size=shape) * 10).astype(dtype)
    y = jax.jit(native.fusion_barrier)(x)
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(np.asarray(y), np.asarray(x))
    if x.ndim:
        assert np.array_equal(np.asarray(jax.jit(jax.vmap(native.fusion_barrier))(x)), np.asarray(x))


def test_fusion_barrier_derivatives_and_compiled_form():
    x = jnp.linspace(-2.0, 3.0, 24, dtype=jnp.float32).reshape(2, 3, 4)
    f = lambda x: jnp.sum(jnp.sin(native.fusion_barrier(x * x)))                    # noqa: E731
    assert np.allclose(jax.jit(jax.grad(f))(x), 2 * x * jnp.cos(x * x), rtol=1e-6)
    _, tangent = jax.jvp(native.fusion_barrier, (x,), (jnp.cos(x),))
    assert np.array_equal(tangent, jnp.cos(x))
    hess_diag = jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(f)(x))))(x)             # second order
    assert np.allclose(hess_diag, 2 * jnp.cos(x * x) - 4 * x * x * jnp.sin(x * x), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(lambda x: native.fusion_barrier(x * 2) + 1).lower(x).compile().as_text()
    assert hlo.count('custom_call_target="dcls_jax_fusion_barrier"') == 1 and "output_to_operand_aliasing" in hlo


def _largest_fusion(hlo: str) -> int:
    """Instructions in the largest fused computation of a compiled module's text."""
    sizes = [block.count("\n") for block in re.findall(r"\n%fused_computation[^\n]*\{\n.*?\n\}", hlo, re.S)]
    return max(sizes, default=0)


def test_cut_cotangent_keeps_each_blocks_backward_to_itself(monkeypatch):
    """A chain of residual blocks (x = s * x + tanh(LayerNorm(x) @ w)): with models.layers.cut_cotangent at each
    block's input, the largest fusion of the gradient's program does not grow with the chain's length; without it
    XLA:CPU fuses the whole backward chain into every parameter gradient's reduction (and the test sees it grow).
    The gradients are XLA's own either way."""
    from models import layers

    def grads(depth):
        rng = np.random.default_rng(depth)
        x = jnp.asarray(rng.normal(size=(2, 6, 6, 16)), jnp.float32)
        s = jnp.asarray(rng.normal(size=(depth, 16)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(depth, 16, 16)) / 4, jnp.float32)

        def loss(s, w):
            h = x
            for i in range(depth):
                h = layers.cut_cotangent(h)
                n = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)
                h = s[i] * h + jnp.tanh(n @ w[i])
            return jnp.sum(jnp.sin(h))
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return _largest_fusion(g.lower(s, w).compile().as_text()), g(s, w)

    (cut2, _), (cut8, with_cut) = grads(2), grads(8)
    monkeypatch.setattr(layers, "_cut_here", lambda: False)
    (plain2, _), (plain8, without) = grads(2), grads(8)
    assert cut8 <= cut2 + 8, (cut2, cut8)
    assert plain8 > 2 * plain2, (plain2, plain8)   # what the cut prevents (the test can fail)
    for a, b in zip(with_cut, without):
        assert rel(a, b) <= 1e-6


def test_batch_sharded_jit_stays_sharded():
    """4 host devices: the custom calls (depthwise, matmul, attention, layer norm, barrier) run on each device's
    samples (no all-gather), the kernel and weight gradients sum across devices, and values equal XLA's."""
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import dcls_jax
        from dcls_jax import native
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        x = jax.device_put(jnp.asarray(rng.normal(size=(8, 12, 11, 24)), jnp.float32),
                           NamedSharding(mesh, P("data")))
        w = jnp.asarray(rng.normal(size=(24, 1, 7, 7)), jnp.float32)
        wl = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)   # a Linear after the conv (dcls_jax.dense)
        def grads(impl):
            f = lambda x, w, wl: jnp.sum(jnp.sin(dcls_jax.dense.linear(
                dcls_jax.conv(x, w, 1, 3, 24, impl=impl), wl, impl=impl)))
            return jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        hlo = grads("native").lower(x, w, wl).compile().as_text()
        assert "all-gather" not in hlo, "batch gathered"
        assert hlo.count("dcls_jax_matmul") >= 2, "forward and input gradient products"
        (dx, dw, dwl), (rx, rw, rwl) = grads("native")(x, w, wl), grads("xla")(x, w, wl)
        assert dx.sharding.spec == P("data"), dx.sharding
        for a, b in ((dx, rx), (dw, rw), (dwl, rwl)):
            assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) <= 1e-5
        # inside shard_map (the Evaluator's step): results typed varying like their inputs, and the replicated
        # weights' gradients summed over the devices
        def local(impl):
            f = lambda x, w, wl: jnp.sum(jnp.sin(dcls_jax.dense.linear(
                dcls_jax.conv(x, w, 1, 3, 24, impl=impl), wl, impl=impl)))
            return jax.jit(jax.shard_map(jax.grad(f, argnums=(0, 1, 2)), mesh=mesh,
                                         in_specs=(P("data"), P(), P()), out_specs=(P("data"), P(), P())))
        for a, b in zip(local("native")(x, w, wl), (rx, rw, rwl)):
            assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) <= 1e-5
        # a Linear's value with its GELU in one call: rows split over the devices too, plain and in shard_map
        bl = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
        xs = jax.device_put(jnp.asarray(rng.normal(size=(8, 5, 24)), jnp.float32), NamedSharding(mesh, P("data")))
        act = lambda impl: lambda x, wl, bl: dcls_jax.dense.linear(x, wl, bl, impl=impl, activation="gelu")
        hlo = jax.jit(act("native")).lower(xs, wl, bl).compile().as_text()
        assert "all-gather" not in hlo and "dcls_jax_linear_act" in hlo, "fused call gathered or absent"
        y, r = jax.jit(act("native"))(xs, wl, bl), jax.jit(act("xla"))(xs, wl, bl)
        assert y.sharding.spec == P("data") and float(jnp.abs(y - r).max()) <= 1e-5
        sm = jax.jit(jax.shard_map(act("native"), mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P("data")))
        assert float(jnp.abs(sm(xs, wl, bl) - r).max()) <= 1e-5
        # attention (dcls_jax.attention): each device attends over its own samples' tokens
        qkv = jax.device_put(jnp.asarray(rng.normal(size=(8, 9, 3 * 2 * 8)), jnp.float32),
                             NamedSharding(mesh, P("data")))
        att = lambda impl: lambda x: dcls_jax.attention(x, 2, impl=impl)
        hlo = jax.jit(att("native")).lower(qkv).compile().as_text()
        assert "all-gather" not in hlo and "dcls_jax_attention" in hlo, "attention gathered or absent"
        y, r = jax.jit(att("native"))(qkv), jax.jit(att("xla"))(qkv)
        assert y.sharding.spec == P("data") and float(jnp.abs(y - r).max()) <= 1e-5
        sm = jax.jit(jax.shard_map(att("native"), mesh=mesh, in_specs=P("data"), out_specs=P("data")))
        assert float(jnp.abs(sm(qkv) - r).max()) <= 1e-5
        ga = lambda impl: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(dcls_jax.attention(x, 2, impl=impl)))))
        hlo = ga("native").lower(qkv).compile().as_text()
        assert "all-gather" not in hlo and "dcls_jax_attention_grad" in hlo, "attention gradient gathered or absent"
        d, r = ga("native")(qkv), ga("xla")(qkv)
        assert d.sharding.spec == P("data") and float(jnp.abs(d - r).max() / jnp.abs(r).max()) <= 1e-5
        # LayerNorm (dcls_jax.norm): each device normalizes its own rows
        from dcls_jax.norm import layer_norm, layer_norm_xla
        lw, lb = jnp.linspace(0.5, 1.5, 24), jnp.linspace(-1, 1, 24)
        ln = jax.jit(lambda x: layer_norm(x, lw, lb))
        hlo = ln.lower(x).compile().as_text()
        assert "all-gather" not in hlo and "dcls_jax_layer_norm" in hlo, "layer norm gathered or absent"
        y = ln(x)
        assert y.sharding.spec == P("data") and float(jnp.abs(y - layer_norm_xla(x, lw, lb)).max()) <= 1e-5
        sm = jax.jit(jax.shard_map(lambda x: layer_norm(x, lw, lb), mesh=mesh, in_specs=P("data"),
                                   out_specs=P("data")))
        assert float(jnp.abs(sm(x) - y).max()) <= 1e-5
        # the fusion barrier: each device its own part, however the operand is split
        for spec in (P("data"), P(None, "data")):
            z = jax.device_put(jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12), NamedSharding(mesh, spec))
            fb = jax.jit(lambda z: native.fusion_barrier(z * 2))
            hlo = fb.lower(z).compile().as_text()
            assert "all-gather" not in hlo and "dcls_jax_fusion_barrier" in hlo, ("barrier gathered", spec)
            y = fb(z)
            assert y.sharding.spec == spec and np.array_equal(np.asarray(y), 2 * np.asarray(z))
            sm = jax.jit(jax.shard_map(native.fusion_barrier, mesh=mesh, in_specs=spec, out_specs=spec))
            assert np.array_equal(np.asarray(sm(z)), np.asarray(z))
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


X86 = platform.machine() in ("x86_64", "AMD64")


def test_fresh_cache_build_equals_lax(tmp_path):
    """A build into a fresh cache folder (created private, 0700; no temp file left), in a subprocess, on every
    edge case. On x86-64 it is the 8-float-vector build (x86-64-v3, no AVX-512: smaller register blocks and
    matmul and attention tiles, 8x8 transposes, 8-float rows in the layer norm), which this machine's own build
    does not exercise."""
    code = textwrap.dedent("""
        import sys, jax, numpy as np
        sys.path.insert(0, %r)
        import test_attention as a, test_dense as d, test_native as t, test_norm as n
        from dcls_jax import native
        assert native.available(), native.unavailable_reason()
        for case in t.EDGE_CASES + [((2, 14, 17, 40), (17, 17), 1, 8), ((1, 9, 30, 24), (7, 7), 2, 3)]:
            t.test_blocks_and_chunks_equal_lax(*case)
        t.test_vmap_and_second_order_gradients()
        for shape in d.SHAPES:
            d.test_matmul_equals_float64(*shape)
        d.test_gradients_to_second_order_equal_xla_dot()
        for shape in a.SHAPES:
            a.test_equals_float64(*shape)
        for shape in a.GRAD_SHAPES:
            a.test_gradient_call_equals_pytorch(*shape)
        for shape, bias in n.SHAPES:
            n.test_equals_pytorch_float64(shape, bias)
        n.test_edge_rows()
        print("ok")
    """ % os.path.join(ROOT, "tests"))
    env = dict(os.environ, PYTHONPATH=ROOT, DCLS_JAX_CACHE_DIR=str(tmp_path / "c"))
    if X86:
        env["DCLS_JAX_NATIVE_MARCH"] = "x86-64-v3"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    folder = tmp_path / "c" / "native"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    libs = [p.name for p in folder.iterdir()]
    assert len(libs) == 1 and libs[0].startswith("native-") and libs[0].endswith(".so"), libs


def _available_in_subprocess(env_extra):
    code = "from dcls_jax import native; print(native.available()); print(native.unavailable_reason())"
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.splitlines()


def test_cache_folder_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    (shared / "native").mkdir(parents=True)
    os.chmod(shared / "native", 0o777)
    ok, reason = _available_in_subprocess({"DCLS_JAX_CACHE_DIR": str(shared)})
    assert ok == "False" and "not private" in reason
    assert not any(p.suffix == ".so" for p in (shared / "native").iterdir())


def test_fallbacks_when_disabled_or_no_compiler(tmp_path):
    ok, reason = _available_in_subprocess({"DCLS_JAX_NATIVE": "0", "DCLS_JAX_CACHE_DIR": str(tmp_path)})
    assert ok == "False" and "DCLS_JAX_NATIVE=0" in reason
    ok, reason = _available_in_subprocess({"CXX": "/nonexistent/c++", "PATH": "/nonexistent",
                                           "DCLS_JAX_CACHE_DIR": str(tmp_path)})
    assert ok == "False" and "no C++ compiler" in reason
    # and the dispatcher then keeps to the XLA paths
    code = ("import importlib; C = importlib.import_module('dcls_jax.conv'); "
            "print(C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, backend='cpu'))")
    env = dict(os.environ, PYTHONPATH=ROOT, DCLS_JAX_NATIVE="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.stdout.strip() == "shifted", run.stderr[-2000:]


def test_loading_marks_a_build_used_and_stale_builds_are_pruned(tmp_path, monkeypatch):
    """A cached build is loaded, not rebuilt, and loading refreshes its time; pruning (which a new build runs
    first) deletes builds unused for STALE_DAYS, also under the earlier name, and keeps recent ones and other
    files. In-process, on a copy of this process's build: no compile."""
    assert native.available(), native.unavailable_reason()
    folder = tmp_path / "native"
    folder.mkdir(mode=0o700)
    current = Path(native._state["lib"]._name)
    copy = folder / current.name
    shutil.copy(current, copy)
    stale, recent, other = folder / "native-stale.so", folder / "native-recent.so", folder / "notes.txt"
    old_name = folder / "depthwise-stale.so"   # a build under the earlier name
    for f in (stale, recent, other, old_name):
        f.write_bytes(b"x")
    old = time.time() - (native.STALE_DAYS + 1) * 86400
    for f in (copy, stale, other, old_name):
        os.utime(f, (old, old))
    monkeypatch.setenv("DCLS_JAX_CACHE_DIR", str(tmp_path))
    assert native._build() == copy                      # found under its key: loaded as it is
    assert copy.stat().st_mtime > time.time() - 3600     # and marked used
    native._prune(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([copy.name, "native-recent.so", "notes.txt"]), names


def test_source_ships_with_the_package():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["dcls_jax"]
    assert "csrc/*.cc" in data and "csrc/*.h" in data
    assert all(f.is_file() for f in native.SOURCES) and (native.CSRC / "common.h").is_file()
