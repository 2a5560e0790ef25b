"""dcls_jax.conv: every depthwise implementation against lax.conv_general_dilated (forward and both gradients),
the dispatcher and its overrides, DCLS parity with PyTorch dcls 0.1.1 through every forced implementation.

Each case compiles one program holding the reference and all implementations (LLVM -O0, as test_dcls.py),
so the file stays fast on two cores. Pallas kernels run with interpret=True here, both lowerings (GPU and TPU).
"""
import contextlib
import importlib
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dcls_jax

C = importlib.import_module("dcls_jax.conv")   # the module (dcls_jax.conv is also the function)
from dcls_jax import fft_conv, native, pallas_conv  # noqa: E402

_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_DIMS = {1: ("NHC", "OIH", "NHC"), 2: ("NHWC", "OIHW", "NHWC"), 3: ("NDHWC", "OIDHW", "NDHWC")}
# "pallas" runs the GPU (Triton) kernel in interpret mode, "pallas_tpu" the Mosaic one.
IMPLS_2D = ("xla", "shifted", "fft", "shifted_fft", "pallas", "pallas_tpu", "native")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _reference(x, w, stride, pad):
    nd = x.ndim - 2
    return lax.conv_general_dilated(x, w, (stride,) * nd, [(pad, pad)] * nd, dimension_numbers=_DIMS[nd],
                                    feature_group_count=x.shape[-1], precision=lax.Precision.HIGHEST)


def _impl_fn(impl, stride, pad, tile=None):
    if impl == "fft_tiled":
        return lambda x, w: fft_conv.fft_depthwise(x, w, (stride,) * (x.ndim - 2), [(pad, pad)] * (x.ndim - 2),
                                                   tile=True)
    if impl == "pallas_tpu":
        def run(x, w):
            pallas_conv.PALLAS_FLAVOUR = "tpu"      # read at trace time
            try:
                return dcls_jax.conv(x, w, stride, pad, x.shape[-1], impl="pallas")
            finally:
                pallas_conv.PALLAS_FLAVOUR = None
        return run
    return lambda x, w: dcls_jax.conv(x, w, stride, pad, x.shape[-1], impl=impl)


def _run_all(impls, x, w, ct, stride, pad):
    """{impl: (y, dx, dw)} for the reference ("ref", computed in float32) and every implementation."""
    def fn(x, w, ct):
        out = {}
        for name in ("ref", *impls):
            if name == "ref":
                f = lambda a, b: _reference(a.astype(jnp.float32), b.astype(jnp.float32), stride, pad)  # noqa
            else:
                f = _impl_fn(name, stride, pad)
            y, vjp = jax.vjp(f, x, w)
            out[name] = (y, *vjp(ct.astype(y.dtype)))
        return out
    return jax.jit(fn).lower(x, w, ct).compile(_FAST_COMPILE)(x, w, ct)


def _data(shape, k, stride, pad, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=(c, 1, *k)), dtype)
    out = [(s + 2 * pad - kk) // stride + 1 for s, kk in zip(shape[1:-1], k)]
    ct = jnp.asarray(rng.normal(size=(shape[0], *out, c)), dtype)
    return x, w, ct


# (input shape NHWC, kernel, stride, padding): odd / even / non-square kernels 3..31, strides 1 and 2,
# paddings from 0 to beyond k//2, maps smaller than the kernel, batch 1, channels not multiples of 8.
CASES_2D = [
    ((2, 9, 11, 5), (3, 4), 1, 0),
    ((1, 12, 10, 3), (3, 3), 2, 1),
    ((2, 13, 13, 9), (7, 7), 2, 5),
    ((1, 6, 7, 4), (9, 10), 1, 6),
    ((1, 20, 18, 10), (17, 17), 1, 8),
    ((1, 11, 9, 3), (17, 16), 2, 9),
    ((1, 16, 14, 6), (31, 31), 1, 15),
    ((1, 10, 12, 5), (24, 31), 2, 16),
    ((3, 13, 12, 5), (11, 9), 1, 5),      # batch > 1 through the per-sample loops, large kernel
]


@pytest.mark.parametrize("shape, k, stride, pad", CASES_2D, ids=[f"{c[1]}s{c[2]}p{c[3]}" for c in CASES_2D])
def test_fp32_paths_equal_lax(shape, k, stride, pad):
    x, w, ct = _data(shape, k, stride, pad, jnp.float32)
    res = _run_all(IMPLS_2D, x, w, ct, stride, pad)
    ref = res.pop("ref")
    for name, got in res.items():
        for what, a, b in zip(("y", "dx", "dw"), got, ref):
            assert a.shape == b.shape and a.dtype == jnp.float32, (name, what)
            assert rel(a, b) <= 1e-5, (name, what, rel(a, b))


@pytest.mark.parametrize("shape, m, k, stride, pad", [((2, 13, 12, 6), 2, (7, 7), 2, 3),
                                                      ((1, 9, 9, 5), 3, (3, 3), 1, 1)])
def test_channel_multiplier_paths_equal_lax(shape, m, k, stride, pad):
    """groups == in channels, out = m * in (FastViT's downsampling convs): every path equals XLA's grouped conv."""
    rng = np.random.default_rng(7)
    c = shape[-1]
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(m * c, 1, *k)), jnp.float32)
    for impl in ("shifted", "fft", "shifted_fft", "pallas", "native"):
        assert C.selected_impl(x.shape, w.shape, stride, pad, c, impl=impl) == impl
    ref_fn = lambda a, b: lax.conv_general_dilated(   # noqa: E731
        a, b, (stride,) * 2, [(pad, pad)] * 2, dimension_numbers=_DIMS[2], feature_group_count=c,
        precision=lax.Precision.HIGHEST)
    y, vjp = jax.vjp(ref_fn, x, w)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    ref = (y, *vjp(ct))
    for impl in ("shifted", "fft", "shifted_fft", "pallas", "native"):
        y, vjp = jax.vjp(lambda a, b: dcls_jax.conv(a, b, stride, pad, c, impl=impl), x, w)
        for what, a, b in zip(("y", "dx", "dw"), (y, *vjp(ct)), ref):
            assert a.shape == b.shape and rel(a, b) <= 1e-5, (impl, what, rel(a, b))


def test_bf16_large_kernel_sums_in_float32():
    """17x17 (289 taps) in bf16: the shifted sums accumulate in float32 like the FFT, so each output is within two
    bf16 roundings (2^-7) of sum |x| |w|; summed in bf16, 289 taps drifted to ~4e-2 (check_conv)."""
    x, w, ct = _data((1, 20, 18, 5), (17, 17), 1, 8, jnp.bfloat16, seed=3)
    res = _run_all(("shifted", "shifted_fft", "fft"), x, w, ct, 1, 8)
    ref = np.asarray(res.pop("ref")[0], np.float64)
    scale = np.asarray(_run_all((), jnp.abs(x), jnp.abs(w), ct, 1, 8)["ref"][0], np.float64)
    for name, (y, _, _) in res.items():
        assert y.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(y, np.float64) - ref) / scale
        assert err.max() <= 2.0 ** -7, (name, float(err.max()))


@pytest.mark.parametrize("shape, k, stride, pad", [((1, 14, 12, 7), (7, 7), 1, 3), ((2, 9, 9, 6), (5, 6), 2, 4)])
def test_bf16_paths_within_rounding(shape, k, stride, pad):
    """bf16 in, bf16 out: within bf16 rounding of the float32 convolution of the same (bf16) values.

    Bound: each output is rounded once to bf16 (rel 2^-8 of its magnitude) and a bf16 accumulation adds at most
    one rounding per tap of the running sum's magnitude; measured against sum |x| |w| (what rounding scales
    with), the error of a path may reach (taps + 1) * 2^-8, ours stay far below."""
    x, w, ct = _data(shape, k, stride, pad, jnp.bfloat16, seed=1)
    res = _run_all(IMPLS_2D, x, w, ct, stride, pad)
    ref = res.pop("ref")
    absref = _run_all((), jnp.abs(x), jnp.abs(w), jnp.abs(ct), stride, pad)["ref"]
    taps = np.prod(k)
    for name, got in res.items():
        for what, a, b, scale in zip(("y", "dx", "dw"), got, ref, absref):
            assert a.dtype == jnp.bfloat16, (name, what)
            err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            bound = (taps + 1) * 2.0 ** -8 * np.asarray(scale, np.float64) + 1e-30
            assert np.all(err <= bound), (name, what, float((err / bound).max()))
            # and the typical error is the rounding of the output itself
            assert np.median(err / np.maximum(np.asarray(scale, np.float64), 1e-30)) <= 2.0 ** -7, (name, what)


@pytest.mark.parametrize("shape, k, stride, pad", [((1, 19, 5), (4,), 2, 3), ((1, 7, 6, 5, 3), (3, 4, 5), 1, 2),
                                                   ((1, 70, 12, 4), (5, 3), 1, 2), ((2, 66, 65, 3), (9, 8), 2, 4)])
def test_other_ranks_and_fft_tiling(shape, k, stride, pad):
    """1-D and 3-D through shifted and FFT; overlap-save tiling forced on 2-D maps longer than a tile."""
    impls = {1: ("shifted", "fft", "shifted_fft", "fft_tiled", "native"), 2: ("fft_tiled",),
             3: ("shifted", "fft", "shifted_fft", "fft_tiled")}[len(k)]
    x, w, ct = _data(shape, k, stride, pad, jnp.float32, seed=2)
    res = _run_all(impls, x, w, ct, stride, pad)
    ref = res.pop("ref")
    for name, got in res.items():
        for what, a, b in zip(("y", "dx", "dw"), got, ref):
            assert rel(a, b) <= 1e-5, (name, what, rel(a, b))


@pytest.mark.parametrize("shape, k, stride, pad", [((2, 11, 9, 5), (7, 6), 1, 3), ((3, 12, 10, 3), (9, 9), 2, 4),
                                                   ((2, 13, 8, 4), (15, 15), 1, 7)])
def test_shifted_row_blocks(monkeypatch, shape, k, stride, pad):
    """The CPU shifted sums in blocks of a few rows (forced by a tiny block size), the last block partial."""
    monkeypatch.setattr(C, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(C, "_MIN_BLOCK_ROWS", 1)
    x, w, ct = _data(shape, k, stride, pad, jnp.float32, seed=3)
    res = _run_all(("shifted", "shifted_fft"), x, w, ct, stride, pad)
    ref = res.pop("ref")
    for name, got in res.items():
        for what, a, b in zip(("y", "dx", "dw"), got, ref):
            assert rel(a, b) <= 1e-5, (name, what, rel(a, b))


def test_fft_tiles_long_axes():
    """The FFT plan tiles an axis only when it is long and the kernel fits a tile (checked on the jaxpr)."""
    x = jnp.zeros((1, 200, 30, 2))
    for k, tiled in ((7, True), (31, False)):
        w = jnp.zeros((2, 1, k, k))
        jaxpr = str(jax.make_jaxpr(lambda x, w: fft_conv.fft_depthwise(x, w, (1, 1), [(0, 0), (0, 0)]))(x, w))
        assert ("fft_lengths=(64," in jaxpr) == tiled, (k, jaxpr[-600:])


def test_dispatcher_returns_a_path_for_every_case():
    for backend, nd, k, s, size, c, dtype in itertools.product(
            ("cpu", "gpu", "tpu"), (1, 2, 3), (1, 3, 4, 7, 17, 23, 31), (1, 2), (1, 7, 56, 224), (3, 96, 768),
            (jnp.float32, jnp.bfloat16, jnp.float16)):
        name = C.choose_impl((k,) * nd, (size,) * nd, c, (s,) * nd, dtype, backend)
        assert name in C.IMPLS and C._supports(name, nd, backend), (backend, nd, k, s, name)
    # and `selected_impl` for non-depthwise convolutions is XLA's
    assert C.selected_impl((1, 8, 8, 4), (8, 2, 3, 3), groups=2) == "xla"
    assert C.selected_impl((1, 8, 8, 4), (4, 1, 3, 3), groups=4, dilation=2) == "xla"
    # CPU: the C++ kernels (this machine compiles them) up to 23x23, 1-D and 2-D, float32 and bfloat16
    assert native.available(), native.unavailable_reason()
    for k, dtype in itertools.product((3, 7, 9, 17, 23), (jnp.float32, jnp.bfloat16)):
        assert C.selected_impl((1, 56, 56, 96), (96, 1, k, k), groups=96, dtype=dtype, backend="cpu") == "native"
    assert C.selected_impl((1, 56, 96), (96, 1, 17), groups=96, backend="cpu") == "native"
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 31, 31), groups=96, backend="cpu") == "fft"
    assert C.selected_impl((1, 9, 9, 9, 96), (96, 1, 3, 3, 3), groups=96, backend="cpu") == "shifted"
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, backend="gpu") == "shifted"
    # float64 keeps its precision: the XLA paths, and forcing the float32 kernels is an error
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, dtype=jnp.float64, backend="cpu") == "shifted"
    with C.use_impl("native"):
        assert C.selected_impl((1, 56, 56, 96), (96, 1, 17, 17), groups=96, dtype=jnp.float64) == "shifted_fft"
    with pytest.raises(ValueError, match="'native' computes in float32; got float64"):
        C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, dtype=jnp.float64, impl="native")


def test_dispatcher_without_the_native_kernels(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 17, 17), groups=96, backend="cpu") == "shifted_fft"
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 9, 9), groups=96, backend="cpu") == "fft"
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 17, 17), groups=96, dtype=jnp.bfloat16, backend="cpu") == "fft"
    assert C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, backend="cpu") == "shifted"
    with pytest.raises(ValueError, match="'native' needs the CPU backend and its compiled kernels"):
        C.selected_impl((1, 56, 56, 96), (96, 1, 7, 7), groups=96, impl="native")


def _ops(f, *args):
    text = str(jax.make_jaxpr(lambda *a: f(*a))(*args))   # a fresh function: make_jaxpr caches traces
    return {"fft": " fft[" in text, "pallas": "pallas_call" in text, "xla": "conv_general_dilated" in text}


def test_overrides_argument_context_environment(monkeypatch):
    x, w = jnp.zeros((1, 20, 20, 4)), jnp.zeros((4, 1, 17, 17))
    dw = lambda x, w: dcls_jax.conv(x, w, 1, 8, 4)  # noqa: E731
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    assert _ops(dw, x, w)["fft"] == (C.selected_impl(x.shape, w.shape, 1, 8, 4) == "fft")
    assert _ops(lambda x, w: dcls_jax.conv(x, w, 1, 8, 4, impl="pallas"), x, w)["pallas"]
    # shifted_fft: shifted sums for the value alone, FFTs under differentiation
    hyb = lambda x, w: dcls_jax.conv(x, w, 1, 8, 4, impl="shifted_fft")  # noqa: E731
    assert not _ops(hyb, x, w)["fft"]
    assert _ops(jax.grad(lambda x, w: hyb(x, w).sum(), argnums=(0, 1)), x, w)["fft"]
    with C.use_impl("xla"):
        assert _ops(dw, x, w)["xla"]
        with C.use_impl("fft"):
            assert _ops(dw, x, w)["fft"]
        assert _ops(lambda x, w: dcls_jax.conv(x, w, 1, 8, 4, impl="pallas"), x, w)["pallas"]  # argument wins
    monkeypatch.setenv(C.ENV_VAR, "pallas")
    assert _ops(dw, x, w)["pallas"]
    with C.use_impl("auto"):
        assert not _ops(dw, x, w)["pallas"]
    # a forced 2-D-only implementation falls back to the table for 3-D (context / environment) ...
    x3, w3 = jnp.zeros((1, 5, 5, 5, 2)), jnp.zeros((2, 1, 3, 3, 3))
    assert not _ops(lambda x, w: dcls_jax.conv(x, w, 1, 1, 2), x3, w3)["pallas"]
    monkeypatch.setenv(C.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown convolution implementation"):
        dcls_jax.conv(x, w, 1, 8, 4)
    monkeypatch.delenv(C.ENV_VAR)
    # ... and is an error as an argument, as are unknown names and non-depthwise convolutions
    with pytest.raises(ValueError, match="3-D"):
        dcls_jax.conv(x3, w3, 1, 1, 2, impl="pallas")
    with pytest.raises(ValueError, match="unknown"):
        dcls_jax.conv(x, w, 1, 8, 4, impl="cudnn")
    with pytest.raises(ValueError, match="unknown"):
        with C.use_impl("nope"):
            pass
    with pytest.raises(ValueError, match="depthwise"):
        dcls_jax.conv(x, jnp.zeros((4, 2, 3, 3)), 1, 1, 2, impl="fft")
    with pytest.raises(ValueError, match="real floating"):
        dcls_jax.conv(x.astype(jnp.int32), w.astype(jnp.int32), 1, 8, 4, impl="fft")
    xi, wi = jnp.arange(2 * 6 * 6).reshape(1, 6, 6, 2), jnp.ones((2, 1, 3, 3), jnp.int32)   # integers: exact
    np.testing.assert_array_equal(dcls_jax.conv(xi, wi, 1, 1, 2),
                                  _reference(xi.astype(jnp.float32), wi.astype(jnp.float32), 1, 1))
    with pytest.raises(ValueError, match="larger than the padded input"):
        dcls_jax.conv(x[:, :10, :10], w, 1, 0, 4)
    for groups, wk in ((0, w), (3, w), (4, jnp.zeros((4, 2, 3, 3)))):     # as torch: groups must fit the channels
        with pytest.raises(ValueError, match=f"groups {groups} does not fit"):
            dcls_jax.conv(x, wk, 1, 1, groups)


@pytest.mark.parametrize("impl", ("xla", "shifted", "fft", "shifted_fft", "pallas", "native"))
def test_empty_batch_through_every_path(impl):
    """A batch of zero images (and a map of zero rows, padded): the result's shape and zero gradients, as lax."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 1, 5, 3)), jnp.float32)
    for shape, pad in (((0, 9, 8, 6), 2), ((2, 0, 8, 6), 3)):
        x = jnp.zeros(shape, jnp.float32)
        y, (dx, dw) = jax.value_and_grad(lambda x, w: dcls_jax.conv(x, w, 1, pad, 6, impl=impl).sum(),
                                         argnums=(0, 1))(x, w)
        assert dcls_jax.conv(x, w, 1, pad, 6, impl=impl).shape == _reference(x, w, 1, pad).shape
        assert float(y) == 0 and dx.shape == x.shape and not np.any(dw)


# DCLS parity with PyTorch dcls 0.1.1 through every forced implementation (test_dcls.py runs the default one).
@pytest.mark.parametrize("impl", ("xla", "shifted", "fft", "shifted_fft", "pallas", "native"))
@pytest.mark.parametrize("case", ("dw-v0", "published-v1"))
def test_dcls_parity_through_every_path(case, impl):
    test_dcls = importlib.import_module("test_dcls")
    cfg, version = {"dw-v0": (test_dcls.CONFIGS["2d-dw"], "v0"),
                    "published-v1": ((8, 8, 34, 17, 8, 1, 8, "zeros", False, (9, 9)), "v1")}[case]
    with C.use_impl(impl):
        test_dcls._check_parity(cfg, version)


def _abstract_gpu():
    """jax >= 0.12 asks which GPU a Triton kernel is lowered for when none is attached; older versions do not."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("flavour, platform, target", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                       ("tpu", "tpu", "tpu_custom_call")])
def test_pallas_kernels_lower_natively(monkeypatch, flavour, platform, target):
    """The Pallas kernels lowered for the platform they are written for, without one attached: forward, input
    and kernel gradients, strided and not, fp32 and bf16, each a native kernel call (Triton on GPU, never Mosaic
    GPU, jax 0.10's default for a pallas_call without compiler parameters; Mosaic on TPU)."""
    monkeypatch.setattr(pallas_conv, "PALLAS_FLAVOUR", flavour)
    monkeypatch.setattr(pallas_conv, "PALLAS_INTERPRET", False)

    def step(x, w):
        loss = lambda x, w: sum(dcls_jax.conv(x, w, s, 8, x.shape[-1], impl="pallas").astype(jnp.float32).sum()
                                for s in (1, 2))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct((2, 20, 18, 40), dtype)
        w = jax.ShapeDtypeStruct((40, 1, 17, 15), dtype)
        with _abstract_gpu() if flavour == "gpu" else contextlib.nullcontext():
            text = jax.jit(step).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        calls = re.findall(r"custom_call @([\w$.]+)", text)
        # stride 1: forward, input gradient, kernel gradient; stride 2: four phases, three calls each
        assert calls.count(target) == 3 + 4 * 3, calls
        assert set(calls) == {target}, calls
