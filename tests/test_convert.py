"""models.convert (checkpoint reader, conversion engine, orbax, CLI), data.download and evaluation.checkpoints (URLs,
the published-checkpoint cache).

torch writes the reference files (torch.save) and holds the reference values; the engine is tested on tiny
models registered here, independent of the architecture files.
"""
import argparse
import builtins
import collections
import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from data.download import cache_path, cached_download, download
from dcls_jax import Dcls2d
from models import checkpoints, convert, registry
from models.layers import BatchNorm2d, Conv2d, Dropout, Linear, Sequential
from tests.torch_ref import dclsify, randomize_batchnorm, to_nhwc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# Toy models: a JAX model registered under test names and its PyTorch twin
# ---------------------------------------------------------------------------------------------------------

class ToyBlock(nnx.Module):
    def __init__(self, width, P, *, rngs):
        self.conv = Conv2d(width, width, 3, padding=1, rngs=rngs)
        self.P = P  # one Param shared by both blocks, as DCLS shares positions per stage
        self.bn = BatchNorm2d(width)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x) + self.P[...]))


class Toy(nnx.Module):
    def __init__(self, *, rngs, width=4, num_classes=3, drop_rate=0.0):
        self.stem = Conv2d(3, width, 3, padding=1, rngs=rngs)
        P = nnx.Param(jnp.zeros((width,)))
        self.blocks = Sequential([ToyBlock(width, P, rngs=rngs) for _ in range(2)])
        self.drop = Dropout(drop_rate, rngs=rngs)
        self.head = Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.blocks(self.stem(x)).mean((1, 2))))


class TorchBlock(torch.nn.Module):
    def __init__(self, width, P):
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)
        self.P = P
        self.bn = torch.nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x) + self.P[:, None, None]))


class TorchToy(torch.nn.Module):
    def __init__(self, width=4, num_classes=3):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        P = torch.nn.Parameter(torch.randn(width))
        self.blocks = torch.nn.Sequential(*[TorchBlock(width, P) for _ in range(2)])
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _original_names(sd):
    """The toy's "original repository" layout: its head is called fc."""
    return {re.sub(r"^fc\.", "head.", k): v for k, v in sd.items()}


def _register(entry):
    if entry.name not in registry.MODELS:
        registry.register(entry)


TOY = "test_convert_toy"
_register(registry.Entry(
    TOY, Toy, "test", "blocks", 8, 8, remap_keys=_original_names,
    infer_overrides=lambda sd: {"num_classes": sd["head.weight"].shape[0]} if "head.weight" in sd else {}))


class DclsToy(nnx.Module):
    def __init__(self, *, rngs):
        kw = dict(kernel_count=3, padding=2, dilated_kernel_size=5, version="gauss", rngs=rngs)
        self.c1 = Dcls2d(4, 4, **kw)
        self.c2 = Dcls2d(4, 4, P=self.c1.P, SIG=self.c1.SIG, **kw)


_register(registry.Entry("test_convert_dcls", DclsToy, "test", "c2", 8, 8))


@pytest.fixture(scope="module")
def torch_toy():
    torch.manual_seed(0)
    return randomize_batchnorm(TorchToy(num_classes=5)).eval()


def _torch_sd(model):
    return {k: v for k, v in model.state_dict().items()}


def _assert_params_equal(model, torch_sd):
    flat = {convert._key(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
    for k, v in flat.items():
        np.testing.assert_array_equal(v, torch_sd[k].float().numpy(), err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# read_checkpoint
# ---------------------------------------------------------------------------------------------------------

def test_dtypes_views_and_shared_storage(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    sd = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g), f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(), f64=torch.randn(2, generator=g).double(),
        i64=torch.tensor([1, -2, 2 ** 40]), i8=torch.tensor([-3, 4], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8), b=torch.tensor([True, False, True]),
        c64=torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        u16=torch.tensor([1, 65535], dtype=torch.uint16),  # saved with _rebuild_tensor_v3 and an untyped storage
        f8=torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
        transposed=big.t(), sliced=big[2:, 1:4], row=big[3], strided=big[::2, ::3],
        expanded=torch.arange(3.0).expand(2, 3), empty=torch.zeros(0, 3), scalar=torch.tensor(2.5),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)))
    sd["same"] = sd["f32"]  # one storage under two keys
    path = tmp_path / "x.pth"
    torch.save(sd, path)
    out = convert.read_checkpoint(path)
    assert list(out) == list(sd)
    for k, t in sd.items():
        want = t.detach().float().numpy() if t.dtype in (torch.bfloat16, torch.float8_e4m3fn) else t.detach().numpy()
        assert out[k].shape == tuple(t.shape), k
        np.testing.assert_array_equal(out[k].astype(want.dtype), want, err_msg=k)
    assert out["bf16"].dtype == ml_dtypes.bfloat16 and out["f16"].dtype == np.float16
    assert out["u16"].dtype == np.uint16 and out["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert out["i64"].dtype == np.int64 and out["b"].dtype == np.bool_ and out["c64"].dtype == np.complex64
    out["same"][0, 0] += 1  # copies, writable, independent of the shared storage
    assert out["f32"][0, 0] == sd["f32"][0, 0].item()


def test_parameter_with_python_state(tmp_path):
    p = torch.nn.Parameter(torch.arange(4.0))
    p.note = "extra attribute"  # torch pickles this with _rebuild_parameter_with_state
    torch.save({"w": p}, tmp_path / "p.pth")
    np.testing.assert_array_equal(convert.read_checkpoint(tmp_path / "p.pth")["w"], np.arange(4.0, dtype=np.float32))


def test_containers_keys_and_prefixes(tmp_path):
    a, b = {"w": torch.ones(2)}, {"module.w": torch.zeros(2), "module.v": torch.ones(1)}
    torch.save({"state_dict": a, "state_dict_ema": b, "epoch": 3}, tmp_path / "c.pth")
    default = convert.read_checkpoint(tmp_path / "c.pth")  # EMA first, "module." stripped
    assert set(default) == {"w", "v"} and default["w"].sum() == 0
    assert convert.read_checkpoint(tmp_path / "c.pth", key="state_dict")["w"].sum() == 2
    with pytest.raises(ValueError, match="no container key 'nope'; available keys: 'state_dict', 'state_dict_ema'"):
        convert.read_checkpoint(tmp_path / "c.pth", key="nope")
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, tmp_path / "none.pth")
    with pytest.raises(ValueError, match=r"no state dict found .* available keys: 'epoch', 'optimizer'"):
        convert.read_checkpoint(tmp_path / "none.pth")
    torch.save({"model": {"w": torch.ones(1)}, "model_ema": {"w": torch.zeros(1)}}, tmp_path / "m.pth")
    assert convert.read_checkpoint(tmp_path / "m.pth")["w"][0] == 0
    assert convert.read_checkpoint(tmp_path / "m.pth", key="model")["w"][0] == 1


class _Evil:
    """Pickles as os.system(command): loading it with pickle runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _record_imports(monkeypatch):
    imported = []
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (imported.append(name), real(name, *a, **k))[1])
    return imported


def test_training_checkpoint_with_code_beside_the_weights(tmp_path, torch_toy, monkeypatch):
    """A timm-style training checkpoint: args Namespace, optimizer state, epoch, strings, numpy scalars,
    and pickled calls to os.system beside the weights. Weights intact; nothing named is imported or run."""
    marker = tmp_path / "pwned"
    sd = _torch_sd(torch_toy)
    # AdamW's state_dict() after a step, written out (torch.optim takes seconds to import)
    params = list(torch_toy.parameters())
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                               "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                                   "amsgrad": False, "foreach": None, "params": list(range(len(params)))}]}
    args = argparse.Namespace(model="toy", lr=1e-3, sched=["cosine", 5], crop=(224, 224), hook=_Evil(f"touch {marker}"))
    torch.save({"epoch": 7, "arch": "toy", "state_dict": sd, "optimizer": optimizer, "args": args,
                "state_dict_ema": sd, "metric": np.float64(81.5), "version": 2,
                "evil": _Evil(f"touch {marker}")}, tmp_path / "train.pth.tar")
    imported = _record_imports(monkeypatch)
    out = convert.read_checkpoint(tmp_path / "train.pth.tar")
    monkeypatch.undo()
    assert not marker.exists()
    assert not {"os", "posix", "argparse", "torch", "torch._utils", "collections", "numpy"} & set(imported), imported
    assert set(out) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)


def test_code_inside_the_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(2), "x.weight": _Evil(f"touch {marker}")}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"entry 'x.weight' is a pickled (os|posix)\.system object; refusing"):
        convert.read_checkpoint(tmp_path / "bad.pth")
    torch.save({"model": _Evil(f"touch {marker}")}, tmp_path / "bad2.pth")
    with pytest.raises(ValueError, match=r"entry 'model' is a pickled (os|posix)\.system object"):
        convert.read_checkpoint(tmp_path / "bad2.pth")
    assert not marker.exists()


def _rewrite_zip(src, dst, edit):
    """Copies a torch zip, passing each (name, bytes) through edit(name, data) -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))


def test_unknown_modules_are_never_imported(tmp_path):
    """A global naming a module nobody imported ('this' prints the Zen of Python on import)."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "zen": _Evil("true")}, tmp_path / "a.pth")
    _rewrite_zip(tmp_path / "a.pth", tmp_path / "b.pth", lambda name, data: data.replace(
        b"cposix\nsystem\n", b"cthis\nsystem\n") if name.endswith(".pkl") else data)
    assert b"cthis\nsystem" in zipfile.ZipFile(tmp_path / "b.pth").read("a/data.pkl")
    assert "this" not in sys.modules
    assert list(convert.read_checkpoint(tmp_path / "b.pth")) == ["w"]
    assert "this" not in sys.modules


def test_pickle_cannot_alter_the_stand_ins(tmp_path):
    """A pickle that sets state on torch.FloatStorage (BUILD) before the weights changes nothing."""
    torch.save({"w": torch.arange(3.0)}, tmp_path / "a.pth")
    retype = b"ctorch\nFloatStorage\nN}Vname\nVLongStorage\ns\x86b0"  # FloatStorage.name = "LongStorage"
    _rewrite_zip(tmp_path / "a.pth", tmp_path / "b.pth", lambda name, data: data.replace(
        b"\x80\x02", b"\x80\x02" + retype, 1) if name.endswith(".pkl") else data)
    for path in (tmp_path / "b.pth", tmp_path / "a.pth"):
        np.testing.assert_array_equal(convert.read_checkpoint(path)["w"], np.arange(3.0, dtype=np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex64])
def test_big_endian_archive(tmp_path, dtype):
    t = (torch.arange(6.0) - 2.5).reshape(2, 3).to(dtype)
    torch.save({"t": t}, tmp_path / "le.pth")
    unit = t.element_size() // (2 if t.is_complex() else 1)

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
        return data
    _rewrite_zip(tmp_path / "le.pth", tmp_path / "be.pth", to_big)
    got = convert.read_checkpoint(tmp_path / "be.pth")["t"]
    want = t.float().numpy() if dtype == torch.bfloat16 else t.numpy()
    np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_safetensors(tmp_path):
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch
    arrays = {"a": np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32),
              "module.b": np.arange(4, dtype=np.int64), "c": np.array([True, False]),
              "d": np.ones(2, np.float16)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "np"})
    out = convert.read_checkpoint(tmp_path / "x.safetensors")
    assert set(out) == {"a", "b", "c", "d"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(out[k.removeprefix("module.")], v)
        assert out[k.removeprefix("module.")].dtype == v.dtype
    bf = torch.randn(3, 5).bfloat16()
    save_torch({"bf": bf}, tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(convert.read_checkpoint(tmp_path / "bf.safetensors")["bf"].astype(np.float32),
                                  bf.float().numpy())
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert.read_checkpoint(tmp_path / "cut.safetensors")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        convert.read_checkpoint(tmp_path / "cut.pth")
    _rewrite_zip(tmp_path / "ok.pth", tmp_path / "short.pth",
                 lambda name, data: data[:100] if "/data/" in name else data)
    with pytest.raises(ValueError, match=r"storage '0' holds 100 bytes, expected 16384; the file is truncated"):
        convert.read_checkpoint(tmp_path / "short.pth")
    _rewrite_zip(tmp_path / "ok.pth", tmp_path / "badpkl.pth",
                 lambda name, data: data[:20] if name.endswith(".pkl") else data)
    with pytest.raises(ValueError, match="cannot parse the checkpoint's pickle"):
        convert.read_checkpoint(tmp_path / "badpkl.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy \(torch < 1.6\).*re-save it"):
        convert.read_checkpoint(tmp_path / "legacy.pth")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ValueError, match="not a zip archive|unknown checkpoint format"):
        convert.read_checkpoint(tmp_path / "junk.bin")


# ---------------------------------------------------------------------------------------------------------
# from_state_dict
# ---------------------------------------------------------------------------------------------------------

def test_from_state_dict_matches_pytorch(tmp_path, torch_toy):
    """Original key names (fc.*) in a "model" container; num_classes inferred from the head; shared P saved
    twice by PyTorch; logits equal to PyTorch's."""
    sd = {re.sub(r"^head\.", "fc.", k): v for k, v in _torch_sd(torch_toy).items()}
    assert torch_toy.blocks[0].P is torch_toy.blocks[1].P and "blocks.1.P" in sd
    torch.save({"model": sd, "epoch": 1}, tmp_path / "toy.pth")
    model = convert.from_state_dict(TOY, convert.read_checkpoint(tmp_path / "toy.pth"))
    assert model.head.weight.get_value().shape == (5, 4)
    assert model.blocks[0].P is model.blocks[1].P
    assert model.drop.deterministic and model.blocks[0].bn.use_running_average  # eval mode
    _assert_params_equal(model, _torch_sd(torch_toy))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch_toy(x).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(to_nhwc(x)))), want, rtol=0, atol=1e-5)


def test_problems_are_reported_by_name(torch_toy):
    sd = {k: v.numpy() for k, v in _torch_sd(torch_toy).items()}
    del sd["stem.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["blocks.0.conv.weight"] = np.zeros((4, 4, 5, 5), np.float32)
    with pytest.raises(ValueError) as e:
        convert.from_state_dict(TOY, sd)
    msg = str(e.value)
    assert "cannot load the checkpoint into 'test_convert_toy'" in msg
    assert "missing from the checkpoint (1):\n - stem.weight" in msg
    assert "unexpected in the checkpoint (1):\n + extra.weight" in msg
    assert "blocks.0.conv.weight: checkpoint (4, 4, 5, 5) vs model (4, 4, 3, 3)" in msg
    assert "num_batches_tracked" not in msg


def test_wrong_architecture_hint_and_truncated_lists():
    sd = {f"layer{i}.weight": np.zeros(2, np.float32) for i in range(30)}
    with pytest.raises(ValueError) as e:
        convert.from_state_dict(TOY, sd)
    msg = str(e.value)
    assert "unexpected in the checkpoint (30):" in msg and "... and 10 more" in msg
    assert "hint: only 0 of the model's 17 parameters are in the checkpoint" in msg


def test_shared_parameter_copies(torch_toy):
    sd = {k: v.numpy() for k, v in _torch_sd(torch_toy).items()}
    once = {k: v for k, v in sd.items() if k != "blocks.1.P"}  # a shared tensor stored once is enough
    np.testing.assert_array_equal(convert.from_state_dict(TOY, once).blocks[1].P.get_value(), sd["blocks.0.P"])
    sd["blocks.1.P"] = sd["blocks.1.P"] + 1
    with pytest.raises(ValueError, match=r"shared in the model but different in the checkpoint .*\n +blocks.0.P != "
                                         r"blocks.1.P"):
        convert.from_state_dict(TOY, sd)


def test_dcls_shared_positions(tmp_path):
    """dcls_jax.Dcls2d layers sharing P and SIG load a PyTorch DCLS state dict that repeats them per layer."""
    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.c1, parent.c2 = torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 3)
    dclsify([[(parent, "c1"), (parent, "c2")]], kernel_count=3, dilated_kernel_size=5, version="gauss")
    with torch.no_grad():
        parent.c1.SIG.uniform_(0.2, 0.5)
    torch.save(parent.state_dict(), tmp_path / "dcls.pth")
    sd = convert.read_checkpoint(tmp_path / "dcls.pth")
    assert {"c1.P", "c2.P", "c1.SIG", "c2.SIG"} <= set(sd)
    model = convert.from_state_dict("test_convert_dcls", sd)
    assert model.c1.P is model.c2.P and model.c1.SIG is model.c2.SIG
    _assert_params_equal(model, parent.state_dict())
    sd["c2.SIG"] = sd["c2.SIG"] * 2
    with pytest.raises(ValueError, match=r"c1.SIG != c2.SIG"):
        convert.from_state_dict("test_convert_dcls", sd)


def test_dtype_cast_strict_false_and_rng_state(torch_toy):
    sd = {k: v.half().numpy() if v.is_floating_point() else v.numpy() for k, v in _torch_sd(torch_toy).items()}
    model = convert.from_state_dict(TOY, sd)
    assert model.stem.weight.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(model.stem.weight.get_value(), sd["stem.weight"].astype(np.float32))
    del sd["head.bias"]
    sd["unused"] = np.zeros(1)
    with pytest.raises(ValueError, match=" - head.bias"):
        convert.from_state_dict(TOY, sd)
    # strict=False: head.bias takes its initial value (that of create_model), "unused" is ignored; the
    # dropout's RNG state (not in any checkpoint) is initialised too.
    with pytest.warns(UserWarning, match=r"1 parameters missing from the checkpoint keep their initial values "
                                         r"\(head.bias\); 1 unexpected keys ignored"):
        loose = convert.from_state_dict(TOY, sd, strict=False, drop_rate=0.5)
    fresh = registry.create_model(TOY, num_classes=5, drop_rate=0.5)
    np.testing.assert_array_equal(loose.head.bias.get_value(), fresh.head.bias.get_value())
    loose.train()
    x = jnp.ones((4, 16))
    assert not np.array_equal(loose.drop(x), loose.drop(x))  # dropout active, its RNG advancing


# ---------------------------------------------------------------------------------------------------------
# orbax and the command line
# ---------------------------------------------------------------------------------------------------------

def _flat_state(model):
    return {convert._key(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def test_orbax_round_trip(tmp_path, torch_toy):
    model = convert.from_state_dict(TOY, {k: v.numpy() for k, v in _torch_sd(torch_toy).items()})
    out = convert.save(model, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    for restored in (convert.restore(out), convert.restore(TOY, out), convert.load(TOY, out)):
        assert restored.blocks[0].P is restored.blocks[1].P and restored.blocks[0].bn.use_running_average
        a, b = _flat_state(model), _flat_state(restored)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(FileExistsError):
        convert.save(model, out)
    with pytest.raises(ValueError, match="holds a 'test_convert_toy' checkpoint, not 'test_convert_dcls'"):
        convert.restore("test_convert_dcls", out)
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(5, 4\) vs model \(7, 4\)"):
        convert.restore(out, num_classes=7)


CLI_TOY = ("import functools, runpy, sys\n"
           "from models.layers import Linear\n"
           "from models.registry import Entry, register\n"
           "register(Entry('test_convert_cli', functools.partial(Linear, 2, 3), 'test', '', 2, 2))\n"
           "runpy.run_module('models.convert', run_name='__main__', alter_sys=True)\n")


def test_cli(tmp_path, capsys):
    w, b = torch.randn(3, 2), torch.randn(3)
    torch.save({"state_dict_ema": {"module.weight": w, "module.bias": b}, "epoch": 2}, tmp_path / "lin.pth.tar")
    argv = ["--model", "test_convert_cli", "--checkpoint", tmp_path / "lin.pth.tar", "--out", tmp_path / "out"]
    ok = subprocess.run([sys.executable, "-c", CLI_TOY, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    _register(registry.Entry("test_convert_cli", functools.partial(Linear, 2, 3), "test", "", 2, 2))
    model = convert.restore(tmp_path / "out")
    np.testing.assert_array_equal(model.weight.get_value(), w.numpy())
    np.testing.assert_array_equal(model.bias.get_value(), b.numpy())

    torch.save({"state_dict": {"weight": torch.randn(4, 2)}}, tmp_path / "bad.pth")
    capsys.readouterr()
    assert convert.main(["--model", "test_convert_cli", "--checkpoint", str(tmp_path / "bad.pth"),
                         "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "weight: checkpoint (4, 2) vs model (3, 2)" in err and " - bias" in err
    assert not (tmp_path / "out2").exists() and sorted(os.listdir(tmp_path)) == ["bad.pth", "lin.pth.tar", "out"]
    for model, out, message in (("nope", "o", "unknown model 'nope'"), ("test_convert_cli", "out", "already exists")):
        with pytest.raises(SystemExit) as e:
            convert.main(["--model", model, "--checkpoint", "x", "--out", str(tmp_path / out)])
        assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# data.download on a local server
# ---------------------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path not in srv.files:
            self.send_error(404)
            return
        data = srv.files[self.path]
        start, ranged = 0, srv.ranges and self.headers.get("Range")
        if ranged:
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged)[1])
        body = data[start:]
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops:  # send part of the body, then drop the connection
            srv.drops -= 1
            body = body[: len(body) // 3]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.ranges, srv.drops = {"/file.bin": PAYLOAD}, [], True, 0
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_download_resumes_or_restarts(tmp_path, server, ranges):
    server.ranges, server.drops = ranges, 1
    dest = tmp_path / "sub" / "file.bin"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert download(f"{server.url}/file.bin", dest, expected_size=len(PAYLOAD), sha256=digest) == dest
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "sub" / "file.bin.part").exists()
    assert len(server.requests) == 2
    second_range = server.requests[1][1]
    assert second_range == f"bytes={len(PAYLOAD) // 3}-"  # resumed where the dropped transfer stopped
    download(f"{server.url}/file.bin", dest, expected_size=len(PAYLOAD))
    assert len(server.requests) == 2  # complete: no request


def test_download_verification_and_errors(tmp_path, server, monkeypatch):
    url = f"{server.url}/file.bin"
    with pytest.raises(ValueError, match="expected_size is 5"):
        download(url, tmp_path / "a.bin", expected_size=5)
    with pytest.raises(ValueError, match="SHA-256"):
        download(url, tmp_path / "a.bin", sha256="0" * 64)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="HTTP 404.*pass its local path instead"):
        download(f"{server.url}/missing", tmp_path / "m.bin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    with pytest.raises(OSError, match=r"after 2 attempts.*pass its local path instead"):
        download(f"http://127.0.0.1:{port}/file.bin", tmp_path / "u.bin", retries=1, timeout=5)
    monkeypatch.setenv("DCLS_JAX_CACHE", str(tmp_path / "cache"))
    path = cached_download(url)
    # the cache key is the whole URL: cache / host / hash of the URL / name
    assert path == cache_path(url, tmp_path / "cache") and path.read_bytes() == PAYLOAD
    assert path.parent.parent == tmp_path / "cache" / "127.0.0.1" and path.name == "file.bin"


def checkpoints_with_downloads():
    """evaluation.checkpoints: the published-checkpoint lookup and URL downloads (the model layer has none)."""
    from evaluation import checkpoints as with_downloads
    return with_downloads


def test_load_from_url_and_published_checkpoint(tmp_path, server, torch_toy, monkeypatch):
    torch.save({"model": torch_toy.state_dict(), "epoch": 3}, tmp_path / "toy.pth")
    server.files["/toy.pth"] = (tmp_path / "toy.pth").read_bytes()
    monkeypatch.setenv("DCLS_JAX_CACHE", str(tmp_path / "cache"))
    _assert_params_equal(checkpoints_with_downloads().load(TOY, f"{server.url}/toy.pth"), torch_toy.state_dict())
    _register(registry.Entry("test_convert_published", Toy, "test", "blocks", 8, 8,
                             checkpoint=registry.Checkpoint(f"{server.url}/toy.pth", "model", "toy_published.pth"),
                             infer_overrides=registry.get_entry(TOY).infer_overrides))
    _assert_params_equal(checkpoints_with_downloads().load("test_convert_published"), torch_toy.state_dict())
    assert cache_path(f"{server.url}/toy.pth", tmp_path / "cache", filename="toy_published.pth").exists()
    # the converter's command line with downloads (models.convert's refuses URLs: the model layer downloads nothing)
    out = tmp_path / "converted"
    assert checkpoints_with_downloads().main(["--model", TOY, "--checkpoint", f"{server.url}/toy.pth", "--out",
                                              str(out)]) == 0
    _assert_params_equal(convert.restore(out), torch_toy.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Issue 18: non-finite weights, corrupt converted caches, concurrent first conversions, temporary directories
# ---------------------------------------------------------------------------------------------------------

def test_nonfinite_weights_are_refused(tmp_path, torch_toy):
    sd = {k: v.numpy().copy() for k, v in _torch_sd(torch_toy).items()}
    sd["head.weight"][0, 1] = np.nan
    sd["stem.bias"][2] = -np.inf
    with pytest.raises(ValueError, match=r"non-finite values in 2 tensor\(s\)(.|\n)*stem.bias: 0 NaN, 1 infinite"
                                         r"(.|\n)*head.weight: 1 NaN, 0 infinite(.|\n)*--allow-nonfinite"):
        convert.from_state_dict(TOY, sd)
    model = convert.from_state_dict(TOY, sd, allow_nonfinite=True)           # explicit opt-out
    assert np.isnan(np.asarray(model.head.weight.get_value())[0, 1])
    bf = {k: (v.astype(ml_dtypes.bfloat16) if k == "stem.weight" else v) for k, v in sd.items()}
    bf["stem.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="stem.weight: 1 NaN"):               # bfloat16 too
        convert.from_state_dict(TOY, {**bf, "head.weight": sd["head.weight"] * 0})
    # through the CLI: exit code 1 and the message; --allow-nonfinite converts
    torch.save({"weight": torch.tensor([[1.0, float("nan")], [0, 0], [0, 0]]), "bias": torch.zeros(3)},
               tmp_path / "nan.pth")
    argv = ["--model", "test_convert_cli", "--checkpoint", tmp_path / "nan.pth", "--out", tmp_path / "out"]
    bad = subprocess.run([sys.executable, "-c", CLI_TOY, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "weight: 1 NaN" in bad.stderr and not (tmp_path / "out").exists()
    ok = subprocess.run([sys.executable, "-c", CLI_TOY, *map(str, argv), "--allow-nonfinite"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr


def test_corrupt_converted_checkpoint_is_refused(tmp_path, torch_toy):
    model = convert.from_state_dict(TOY, {k: v.numpy() for k, v in _torch_sd(torch_toy).items()})
    out = convert.save(model, tmp_path / "ck")
    manifest = json.loads((out / "manifest.json").read_text())["sha256"]
    assert "model.json" in manifest and any(k.startswith("state/") for k in manifest)
    biggest = max((p for p in (out / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x10                                               # one flipped bit
    biggest.write_bytes(bytes(data))
    with pytest.raises(convert.CorruptCheckpointError, match=r"is corrupt \(state/.* changed\); delete it"):
        convert.restore(out)
    data[len(data) // 2] ^= 0x10
    biggest.write_bytes(bytes(data))
    (out / "state" / "extra").write_bytes(b"x")
    with pytest.raises(convert.CorruptCheckpointError, match="extra added"):
        convert.restore(out)
    (out / "state" / "extra").unlink()
    (out / "model.json").write_text('{"model": "test_convert_dcls", "overrides": {}}')
    with pytest.raises(convert.CorruptCheckpointError, match="model.json changed"):
        convert.restore(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(convert.CorruptCheckpointError, match="unreadable manifest"):
        convert.restore(out)


def test_save_cleans_up_after_a_failure(tmp_path, torch_toy, monkeypatch):
    model = convert.from_state_dict(TOY, {k: v.numpy() for k, v in _torch_sd(torch_toy).items()})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "_hash_tree", fail)                           # fails after orbax wrote
    with pytest.raises(OSError, match="disk full"):
        convert.save(model, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


PUBLISHED_TOY = textwrap.dedent("""
    import hashlib, json, sys, warnings
    import numpy as np
    from flax import nnx
    import jax
    import jax.numpy as jnp
    from evaluation import checkpoints
    from models import convert, registry
    from models.layers import BatchNorm2d, Conv2d, Dropout, Linear, Sequential

    class ToyBlock(nnx.Module):  # tests.test_convert's Toy, without importing torch
        def __init__(self, width, P, *, rngs):
            self.conv = Conv2d(width, width, 3, padding=1, rngs=rngs)
            self.P = P
            self.bn = BatchNorm2d(width)

    class Toy(nnx.Module):
        def __init__(self, *, rngs, width=4, num_classes=3, drop_rate=0.0):
            self.stem = Conv2d(3, width, 3, padding=1, rngs=rngs)
            P = nnx.Param(jnp.zeros((width,)))
            self.blocks = Sequential([ToyBlock(width, P, rngs=rngs) for _ in range(2)])
            self.drop = Dropout(drop_rate, rngs=rngs)
            self.head = Linear(width, num_classes, rngs=rngs)

    registry.register(registry.Entry("test_convert_race", Toy, "test", "blocks", 8, 8,
        checkpoint=registry.Checkpoint(sys.argv[1], "model", "race.pth"),
        infer_overrides=lambda sd: {"num_classes": sd["head.weight"].shape[0]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = checkpoints.load_published("test_convert_race", sys.argv[2])
    flat = sorted((convert._key(p), np.asarray(v.get_value()).tobytes())
                  for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    h = hashlib.sha256(b"".join(k.encode() + v for k, v in flat)).hexdigest()
    print(json.dumps({"hash": h, "warnings": [str(w.message) for w in caught]}))
""")


def _published(url, cache, n=2):
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHED_TOY, url, str(cache)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}) for _ in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_concurrent_first_conversions_and_corrupt_cache(tmp_path, server, torch_toy):
    torch.save({"model": torch_toy.state_dict()}, tmp_path / "toy.pth")
    server.files["/race.pth"] = (tmp_path / "toy.pth").read_bytes()
    url = f"{server.url}/race.pth"
    flat = sorted((k, v.float().numpy().tobytes()) for k, v in torch_toy.state_dict().items()
                  if not k.endswith("num_batches_tracked") and k != "blocks.1.P")
    want = hashlib.sha256(b"".join(k.encode() + v for k, v in flat)).hexdigest()
    for attempt in range(3):                                 # two first runs on one fresh cache, three times
        results = _published(url, tmp_path / f"cache{attempt}")
        assert [r["hash"] for r in results] == [want, want]
        converted = tmp_path / f"cache{attempt}" / "converted"
        assert sorted(os.listdir(converted)) == ["test_convert_race"]      # no temporaries, no lock left
    assert sum(1 for r in server.requests if r[0] == "/race.pth") == 3       # one download per cache
    # a killed conversion's temporary directory is removed; a corrupted cache is converted again
    cache = tmp_path / "cache0"
    (cache / "converted" / ".test_convert_race.abc123").mkdir()
    state = cache / "converted" / "test_convert_race" / "state"
    victim = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    (result,) = _published(url, cache, n=1)
    assert result["hash"] == want and any("is corrupt" in w and "converting it again" in w for w in result["warnings"])
    assert sorted(os.listdir(cache / "converted")) == ["test_convert_race"]


# ---------------------------------------------------------------------------------------------------------
# Issue 14: models know their registry name; the strict merge's skip; the cache's injectable fetch
# ---------------------------------------------------------------------------------------------------------

def test_models_know_their_registry_name(tmp_path, torch_toy):
    sd = {k: v.numpy() for k, v in _torch_sd(torch_toy).items()}
    model = convert.from_state_dict(TOY, sd)
    assert registry.model_name(model) == TOY and model.registry_origin.overrides == {"num_classes": 5}
    assert registry.model_name(nnx.merge(*nnx.split(model))) == TOY            # nnx.split/merge keep it
    assert registry.model_name(registry.create_model(TOY, num_classes=5)) == TOY
    assert registry.model_name(Toy(rngs=nnx.Rngs(0))) is None                  # built without the registry
    assert nnx.split(model)[0] == nnx.split(convert.from_state_dict(TOY, sd))[0]  # equal graphdefs: one trace
    out = convert.save(model, tmp_path / "ck")                                 # save() reads the name off it
    assert json.loads((out / "model.json").read_text()) == {"model": TOY, "overrides": {"num_classes": 5}}
    assert registry.model_name(convert.restore(out)) == TOY


def test_merge_state_dict_skip_keeps_fresh_values(torch_toy):
    sd = {k: v.numpy() for k, v in _torch_sd(torch_toy).items()
          if not k.startswith("head.") and not k.endswith("num_batches_tracked")}
    sd["head.weight"] = np.zeros((7, 3), np.float32)                           # another head: wrong shape
    def build():
        return Toy(num_classes=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(1\):\n - head.bias(.|\n)*"
                                         r"head.weight: checkpoint \(7, 3\) vs model \(5, 4\)"):
        convert.merge_state_dict(nnx.eval_shape(build), sd, build)
    model = convert.merge_state_dict(nnx.eval_shape(build), sd, build, skip=lambda k: k.startswith("head."))
    fresh = build()
    np.testing.assert_array_equal(np.asarray(model.head.weight.get_value()), np.asarray(fresh.head.weight.get_value()))
    np.testing.assert_array_equal(np.asarray(model.stem.weight.get_value()), sd["stem.weight"])


def test_load_fetches_through_the_given_callable(tmp_path, torch_toy):
    torch.save({"model": torch_toy.state_dict()}, tmp_path / "toy.pth")
    calls = []

    def fetch(url, cache_dir, filename, sha256):
        calls.append((url, cache_dir, filename, sha256))
        return tmp_path / "toy.pth"

    _assert_params_equal(convert.load(TOY, "https://example.invalid/toy.pth", fetch=fetch), torch_toy.state_dict())
    assert calls == [("https://example.invalid/toy.pth", None, None, None)]
