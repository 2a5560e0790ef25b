"""dcls_jax.autotune: the timed choice per case, the value / gradient pair it may run, its cache file (kept,
reused, hostile contents ignored), and its refusals. Values and gradients are checked against lax."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcls_jax
from dcls_jax import autotune
from test_conv import rel  # noqa: E402 (tests/ is on sys.path)

C = autotune._conv_mod
SHAPE, K, PAD = (2, 12, 11, 5), (5, 4), 2


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh process's view: nothing in memory, the cache file in tmp_path."""
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_loaded", [])
    path = tmp_path / "tune" / "autotune.json"
    monkeypatch.setattr(autotune, "cache_file", lambda: path)
    return path


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=SHAPE), jnp.float32),
            jnp.asarray(rng.normal(size=(SHAPE[-1], 1, *K)), jnp.float32))


def _fake_times(monkeypatch, table):
    """measure() answers from `table` {impl: (forward ms, forward+backward ms)} and counts its calls."""
    calls = []

    def measure(impl, *args):
        calls.append(impl)
        return table[impl]
    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def _value_and_grads(x, w, **kw):
    def f(x, w):
        return dcls_jax.conv(x, w, 1, PAD, SHAPE[-1], **kw)
    y, vjp = jax.vjp(f, x, w)
    ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return (y, *vjp(ct))


def test_fastest_value_and_gradient_pair_kept_and_reused(cache, monkeypatch):
    table = {"native": (5.0, 9.0), "shifted": (1.0, 8.0), "fft": (3.0, 2.0), "xla": (4.0, 7.0)}
    calls = _fake_times(monkeypatch, table)
    x, w = _data()
    got = jax.jit(lambda x, w: _value_and_grads(x, w, impl="autotune"))(x, w)
    want = _value_and_grads(x, w, impl="xla")
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) <= 1e-5
    assert sorted(calls) == sorted(autotune.candidates(SHAPE, (SHAPE[-1], 1, *K), jnp.float32, "cpu"))
    assert C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune") == "shifted+fft"
    # the value alone runs the fastest forward; under differentiation the fastest pair (here fft both ways)
    value = lambda x, w: dcls_jax.conv(x, w, 1, PAD, SHAPE[-1], impl="autotune").sum()   # noqa: E731
    assert " fft[" not in str(jax.make_jaxpr(value)(x, w))
    assert " fft[" in str(jax.make_jaxpr(jax.grad(value, argnums=(0, 1)))(x, w))
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries.values()) == [["shifted", "fft"]]
    # the same process, then a new one (memory cleared): no timing, the file's choice
    n = len(calls)
    C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune")
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_loaded", [])
    assert C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune") == "shifted+fft"
    assert len(calls) == n
    # another case is timed and added to the file, the first kept
    C.selected_impl((1, *SHAPE[1:]), w.shape, 1, PAD, SHAPE[-1], impl="autotune")
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_context_and_environment_select_it(cache, monkeypatch):
    _fake_times(monkeypatch, {"native": (1.0, 1.0), "shifted": (2.0, 2.0), "fft": (3.0, 3.0), "xla": (4.0, 4.0)})
    args = ((2, 12, 11, 5), (5, 1, 5, 4), 1, PAD, 5)
    with C.use_impl("autotune"):
        assert C.selected_impl(*args) == "native"
    monkeypatch.setenv(C.ENV_VAR, "autotune")
    assert C.selected_impl(*args) == "native"
    assert C.selected_impl((2, 12, 11, 6), (6, 3, 5, 4), 1, PAD, 2) == "xla"      # not depthwise: lax


@pytest.mark.parametrize("contents", ["{not json", json.dumps([1, 2]), json.dumps({"version": 99, "entries": {}}),
                                      "HOSTILE"])
def test_hostile_or_stale_cache_file_is_ignored_and_replaced(cache, monkeypatch, contents):
    x, w = _data()
    key = autotune._key(x.shape, w.shape, (1, 1), (PAD, PAD), jnp.float32, "cpu")
    if contents == "HOSTILE":   # entries naming what this case cannot run, or nothing at all
        contents = json.dumps({"version": 1, "entries": {key: ["pallas", "pallas"], "other": ["rm -rf", "x"],
                                                         "third": "native"}})
    cache.parent.mkdir(parents=True)
    cache.write_text(contents)
    calls = _fake_times(monkeypatch, {"native": (2.0, 2.0), "shifted": (1.0, 1.0), "fft": (3.0, 3.0),
                                      "xla": (4.0, 4.0)})
    assert C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune") == "shifted"
    assert calls
    data = json.loads(cache.read_text())
    assert data["version"] == 1 and data["entries"] == {key: ["shifted", "shifted"]}


def test_real_timing_picks_a_runnable_path_equal_to_lax(cache):
    x, w = _data(1)
    got = jax.jit(lambda x, w: _value_and_grads(x, w, impl="autotune"))(x, w)
    for a, b in zip(got, _value_and_grads(x, w, impl="xla")):
        assert rel(a, b) <= 1e-5
    [choice] = json.loads(cache.read_text())["entries"].values()
    assert set(choice) <= set(autotune.candidates(SHAPE, w.shape, jnp.float32, "cpu"))
    assert "pallas" not in autotune.candidates(SHAPE, w.shape, jnp.float32, "cpu")          # interpret mode
    assert "xla" not in autotune.candidates((1, 30, 30, 4), (4, 1, 17, 17), jnp.float32, "cpu")   # minutes


def test_refusals_and_unwritable_cache(cache, monkeypatch):
    _fake_times(monkeypatch, {"native": (1.0, 1.0), "shifted": (2.0, 2.0), "fft": (3.0, 3.0), "xla": (4.0, 4.0)})
    x, w = _data()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(RuntimeError, match="could choose differently"):
        C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune")
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    blocked = cache.parent.parent / "a-file"       # the cache's folder cannot be made: kept in this process only
    blocked.write_text("")
    monkeypatch.setattr(autotune, "cache_file", lambda: blocked / "autotune.json")
    with pytest.warns(UserWarning, match="this process only"):
        assert C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune") == "native"
    monkeypatch.setattr(jax, "process_count", lambda: 2)   # decided: multi-process runs take it as it is
    assert C.selected_impl(x.shape, w.shape, 1, PAD, SHAPE[-1], impl="autotune") == "native"
    monkeypatch.setattr(autotune, "measure", lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with pytest.raises(RuntimeError, match="no implementation ran"):
        C.selected_impl((1, 9, 9, 3), (3, 1, 3, 3), 1, 1, 3, impl="autotune")
