"""The command lines of train.py and evaluate.py under careless and hostile use (issues 13 and 18).

Everything that can be checked before compute is, and fails in one line with exit status 2: bad config keys and
values, `lr=nan`, a missing or broken config file, bad flags and ranges, an unwritable --output / --table /
--overlays (evaluate.py fails there before JAX is even imported). Results are never silently wrong: evaluate.py
writes NaN as JSON null and exits non-zero for a non-finite score; train.py stops with status 1 on a non-finite
loss and never checkpoints it. A corrupted latest training checkpoint (SHA-256 manifest) is moved aside and the
run resumes from the previous one, bit for bit as if nothing had happened, logging every step once.

The training runs use configs/smoke.py (a tiny ConvNeXt-dcls on generated images, no dataset): one compile of
its train step, shared by every run of this module through the same configuration.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from dcls_jax.optim import path_names
from evaluation import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache")))


def _python(code: str, *args, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------------
# Both programs: the process's malloc settings


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_freed_blocks():
    """A 96 MiB block freed and allocated again on a worker thread (as XLA:CPU's per-call buffers are): glibc
    maps it afresh and page-faults all of it every time; after runtime.keep_freed_memory() only the first time."""
    code = """
        import ctypes, ctypes.util, resource, sys, threading
        from evaluation import runtime
        applied = runtime.keep_freed_memory() if sys.argv[1] == "1" else None
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        def work(out, size=96 << 20):
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                p = libc.malloc(size)
                ctypes.memset(p, 1, size)
                libc.free(p)
                out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        out = []
        t = threading.Thread(target=work, args=(out,))
        t.start(); t.join()
        print(applied, *out)
    """
    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, kept = (_python(code, flag).stdout.split() for flag in ("0", "1"))
    assert default[0] == "None" and all(int(f) >= pages // 2 for f in default[1:]), default
    assert kept[0] == "True" and int(kept[1]) >= pages // 2 and all(int(f) < pages // 50 for f in kept[2:]), kept
    for program in ("evaluate.py", "train.py"):
        with open(os.path.join(ROOT, program)) as f:
            assert 'if __name__ == "__main__":\n    runtime.keep_freed_memory()' in f.read(), program


# ------------------------------------------------------------------------------------------------------------
# train.py: configuration and input errors


def test_train_help_lists_every_key_and_examples():
    import configs
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for field in configs.dataclasses.fields(configs.Config):
        default = field.default_factory() if field.default is configs.dataclasses.MISSING else field.default
        assert f"  {field.name} (" in proc.stdout and f") = {default!r}" in proc.stdout, field.name
    assert "examples:" in proc.stdout and "configs/smoke.py" in proc.stdout
    assert "--num-processes" in proc.stdout and "--process-id" in proc.stdout


def test_train_real_command_line_errors(tmp_path):
    """`python train.py ...` itself: exit status 2, exactly one line on stderr, no traceback."""
    cases = [(["--set", "lr=abc"], "config key 'lr' expects float, got 'abc'"),
             (["--bogus"], "unrecognized arguments: --bogus")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "train.py", "--config", SMOKE, *extra], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("train.py: error: "), (extra, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)
    proc = subprocess.run([sys.executable, "train.py", "--config", str(tmp_path / "nope.py")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr, proc.stderr


_CLI_RUNNER = """
import contextlib, io, json, sys
import jax
import train
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = train.cli(argv)
        except SystemExit as e:       # argparse's own errors
            code = e.code
    out.append({"code": code, "stderr": err.getvalue()})
out.append({"live_arrays": len(jax.live_arrays())})
print(json.dumps(out))
"""


def test_train_config_errors_exit_2_one_line_before_compute(tmp_path):
    """Many mistakes, each: status 2, one line naming the problem, no array ever created (2 CPU devices)."""
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    nofunc = tmp_path / "nofunc.py"
    nofunc.write_text("X = 1\n")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {'lr': 1}\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise KeyError('boom')\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    smoke = ["--config", SMOKE]
    cases = [
        (smoke + ["--set", "lr=abc"], "config key 'lr' expects float, got 'abc'"),
        (smoke + ["--set", "lr=nan"], "lr must be a finite number, got nan"),
        (smoke + ["--set", "weight_decay=inf"], "weight_decay must be a finite number"),
        (smoke + ["--set", "lr=-1"], "lr must be positive"),
        (smoke + ["--set", "batch_size=0"], "batch_size must be positive"),
        (smoke + ["--set", "eval_crop_pct=2"], "eval_crop_pct must be in (0, 1]"),
        (smoke + ["--set", "ema_decay=1"], "ema_decay must be in [0, 1)"),
        (smoke + ["--set", "keep_checkpoints=0"], "keep_checkpoints must be in [1, inf)"),
        (smoke + ["--set", "seed=-1"], "seed must be in [0, 2147483647]"),
        (smoke + ["--set", "image_size=100000"], "image_size must be in [1, 4096]"),
        (smoke + ["--set", "lr=1e400"], "lr must be a finite number, got inf"),
        (smoke + ["--set", "model_kwargs={'dims': (8, 16, 32, 10000000)}"], "GiB of parameters"),
        (smoke + ["--set", "rrc_scale=(1.0, 0.5)"], "rrc_scale must be two positive numbers"),
        (smoke + ["--set", "model_kwargs={'depths': (1,"], "expects a Python dict literal"),
        (smoke + ["--set", "model_kwargs=[1]"], "config key 'model_kwargs' expects dict"),
        (smoke + ["--set", "no_decay_1d=maybe"], "expects a bool"),
        (smoke + ["--set", "nokeyvalue"], "is not of the form key=value"),
        (smoke + ["--set", "modle=resnet50"], "unknown config key 'modle'; did you mean model"),
        (smoke + ["--set", "model=resnet51"], "unknown model 'resnet51'"),
        (smoke + ["--set", "data=csv"], "data 'csv' is not 'tfds', 'imagefolder', 'synthetic' or 'clickme'"),
        (smoke + ["--set", "data=imagefolder", "--set", f"data_dir={tmp_path / 'none'}"], "does not exist"),
        (smoke + ["--set", "synthetic_size=4"], "synthetic_size 4 is smaller than one batch (8)"),
        (smoke + ["--set", "batch_size=3", "--set", "total_steps=1"], "batch_size 3 is not divisible by the 2 devices"),
        (smoke + ["--workdir", str(afile / "sub")], "workdir"),
        (smoke + ["--set", "init_checkpoint=/nonexistent.pth"], "init_checkpoint '/nonexistent.pth' does not exist"),
        (smoke + ["--set", "model_kwargs={'depthz': (1, 1, 1, 1)}"], "unknown config override"),
        (["--config", str(tmp_path / "missing.py")], "does not exist"),
        (["--config", str(broken)], "failed to load: SyntaxError"),
        (["--config", str(nofunc)], "has no get_config()"),
        (["--config", str(wrong)], "must return configs.Config, got dict"),
        (["--config", str(raising)], "get_config raised KeyError"),
        (["--config", str(afile)], "is not a .py file"),
        (["--config", os.path.join(ROOT, "configs", "convnext_dcls.py:huge")], "unknown argument 'huge'"),
        (smoke + ["--num-processes", "0"], "--num-processes must be >= 1"),
        (smoke + ["--num_processes", "2", "--process_id", "2"], "--process-id must be in [0, 2)"),
        (smoke + ["--coordinator", "localhost"], "is not HOST:PORT"),
        (smoke + ["--coordinator", "h:1"], "--coordinator needs --num-processes and --process-id"),
        (smoke + ["--bogus"], "unrecognized arguments: --bogus"),
        (smoke + ["--set"], "expected one argument"),
        ([], "the following arguments are required: --config"),
    ]
    proc = _python(_CLI_RUNNER, json.dumps([argv for argv, _ in cases]), devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, message), r in zip(cases, results):
        assert r["code"] == 2, (argv, r)
        lines = r["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), (argv, r["stderr"])
        assert message in lines[0], (argv, message, lines[0])
    assert results[-1]["live_arrays"] == 0


def test_train_old_flag_spellings_still_parse():
    import train
    args, _ = train.parse_args(["--config", SMOKE, "--num_processes", "4", "--process_id", "3"])
    assert (args.num_processes, args.process_id) == (4, 3)
    args, _ = train.parse_args(["--config", SMOKE, "--num-processes", "4", "--process-id", "1"])
    assert (args.num_processes, args.process_id) == (4, 1)


# ------------------------------------------------------------------------------------------------------------
# train.py: the smoke config, TensorBoard, checkpoint integrity, non-finite losses

STEPS, EVERY = 8, 4


def _smoke_argv(workdir, *sets):
    argv = ["--config", SMOKE, "--workdir", str(workdir), "--set", f"total_steps={STEPS}",
            "--set", f"checkpoint_every={EVERY}"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _flat(state):
    import jax

    import train
    return {".".join(path_names(p)): np.asarray(x.addressable_data(0))
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _log(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """configs/smoke.py for STEPS steps with a checkpoint every EVERY, in this process."""
    import train
    workdir = tmp_path_factory.mktemp("smoke")
    state, evaluation = train.main(_smoke_argv(workdir))
    return workdir, _flat(state), evaluation


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Reads TensorBoard event files by hand: TFRecord framing (length, crc, payload, crc), Event protos."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_smoke_config_trains_without_a_dataset(smoke_run):
    workdir, _, evaluation = smoke_run
    log = _log(workdir)
    train_records = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in train_records]
    assert all(map(math.isfinite, losses)) and np.mean(losses[-2:]) < losses[0] - 0.2, losses
    assert [r["step"] for r in log if "top1" in r] == [STEPS] and evaluation["top1"] >= 0.5, evaluation
    # The same numbers as TensorBoard events (float32 in the protos).
    scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)
    assert scalars["eval/top1"] == [(STEPS, pytest.approx(evaluation["top1"]))]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoint_hashes"))) == ["4.json", "8.json"]


def _flip_byte(step_dir):
    """Flips one byte in the middle of the largest file of a checkpoint step (array data)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))
    return path


def test_corrupt_latest_checkpoint_falls_back_and_resumes(smoke_run, tmp_path, capsys):
    """Step 8's checkpoint has a flipped byte: moved aside, resumed from step 4, the same final parameters as the
    uninterrupted run (bit for bit), every step logged once with the values of the uninterrupted run."""
    import train
    source, final, _ = smoke_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    flipped = _flip_byte(workdir / "checkpoints" / "8")
    with open(workdir / "metrics.jsonl", "a") as f:   # a record cut short by a kill
        f.write('{"step": 9, "epoch": 1.1, "lo')
    state, _ = train.main(_smoke_argv(workdir))
    err = capsys.readouterr().err
    assert "dropped 1 unreadable line(s)" in err, err
    assert "checkpoint step 8" in err and "SHA-256 mismatch" in err and os.path.relpath(
        flipped, workdir / "checkpoints" / "8") in err, err
    assert "resuming from step 4" in err, err
    corrupt = os.listdir(workdir / "checkpoints_corrupt")
    assert len(corrupt) == 2 and any(c.startswith("8-") and c.endswith(".sha256.json") for c in corrupt)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]   # step 8 saved again, from good state
    resumed = _flat(state)
    assert resumed.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)
    log, original = _log(workdir), _log(source)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps    # once each, no repeats after the resume
    assert [r["step"] for r in log if "top1" in r] == [STEPS]
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in original if "loss" in r]
    with open(workdir / "metrics_superseded.jsonl") as f:   # the interrupted trajectory's records: kept aside
        assert [r["step"] for r in map(json.loads, f)] == [5, 6, 7, 8, 8]
    # TensorBoard: the resumed run's events purge the interrupted run's from step 5 on.
    assert len(os.listdir(workdir / "tensorboard")) == 2

    # Another run's checkpoint is a configuration error (no fallback, nothing moved), not corruption.
    with pytest.raises(train.ConfigError, match="cannot resume .* its run has seed=0, this config seed=1"):
        train.main(_smoke_argv(workdir, "seed=1"))
    with pytest.raises(train.ConfigError, match="its run has model_kwargs="):
        train.main(_smoke_argv(workdir, "model_kwargs={'depths': (1, 1, 1, 1), 'dims': (8, 16, 32, 32)}"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]

    # Every checkpoint corrupt: one clear error, nothing restored.
    _flip_byte(workdir / "checkpoints" / "4")
    _flip_byte(workdir / "checkpoints" / "8")
    with pytest.raises(train.ConfigError, match="no usable checkpoint .* steps \\[4, 8\\] are all corrupt"):
        train.main(_smoke_argv(workdir))


def test_non_finite_loss_stops_training(tmp_path, monkeypatch, capsys):
    """A loss that turns NaN at step 3 (injected into the train step's metrics): status 1, one line naming the
    step, no checkpoint of the bad state, the log valid JSON with null."""
    import jax
    import jax.numpy as jnp

    import train
    make = training.make_train_step
    poison = jax.jit(lambda step, loss: jnp.where(step >= 3, jnp.nan, loss))

    def make_poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def poisoned(state, rest, batch):
            new, metrics = step_fn(state, rest, batch)
            return new, dict(metrics, loss=poison(new["step"], metrics["loss"]))
        return poisoned

    monkeypatch.setattr(train, "make_train_step", make_poisoned)
    workdir = tmp_path / "nan"
    assert train.cli(_smoke_argv(workdir)) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: non-finite training loss at step 3 (loss nan"), err
    assert not os.listdir(workdir / "checkpoints")
    log = _log(workdir)
    assert [r["step"] for r in log] == [1, 2, 3] and log[2]["loss"] is None


# ------------------------------------------------------------------------------------------------------------
# evaluate.py: checks before compute, valid JSON, non-finite scores


_EVAL_RUNNER = """
import contextlib, io, json, sys, time
import evaluate
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = evaluate.main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start,
                "jax_imported": "jax" in sys.modules})
print(json.dumps(out))
"""


def test_evaluate_unwritable_outputs_fail_before_any_model(tmp_path):
    """An --output, --table or --overlays that cannot be written fails at once: exit 2, the flag named, JAX not
    even imported (so nothing was built or compiled), well under a few seconds."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    run = ["--model", "resnet50", "--random-init", "--sample", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    cases = [
        (run + ["--output", str(afile / "out.json")], "--output"),
        (run + ["--output", str(tmp_path / "adir")], "is a directory"),
        (["--models", "resnet50", "--random-init", "--sample", "--table", str(afile / "t" / "table.md")], "--table"),
        (run + ["--overlays", str(afile)], "--overlays"),
        (run + ["--overlays", str(afile / "sub")], "--overlays"),
        (run + ["--output", "/proc/version/out.json"], "--output"),
    ]
    if os.geteuid() != 0:   # permissions do not bind root
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((run + ["--output", str(ro / "out.json")], "--output"))
    proc = _python(_EVAL_RUNNER, json.dumps([argv for argv, _ in cases]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (argv, flag), r in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert r["code"] == 2, (argv, r)
        assert r["stderr"].startswith("error: ") and flag in r["stderr"], (argv, r["stderr"])
        assert not r["jax_imported"] and r["seconds"] < 3, (argv, r)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-overlays", "-3"], "--num-overlays must be >= 0"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, --num-processes)"),
    (["--num-overlays", "x"], "invalid int value"),
    (["--batch-size", str(10**9)], "GiB of host memory"),
])
def test_evaluate_flag_ranges(flags, message, capsys):
    import evaluate
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--model", "resnet50", "--sample", "--random-init", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_json_safe_turns_non_finite_into_null():
    import evaluate
    value = {"a": float("nan"), "b": [np.float32("inf"), 1.5, np.float64(-np.inf)], "c": {"d": np.float32(2.0)},
             "e": (float("-inf"), "x", None, 3)}
    text = json.dumps(evaluate.json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [None, 1.5, None], "c": {"d": 2.0}, "e": [None, "x", None, 3]}


_NAN_RUNNER = """
import sys
import numpy as np
from flax import nnx
from tests import test_evaluate
test_evaluate.register_tiny()
import evaluate
load = evaluate.load_model

def nan_weights(name, args):   # a random-init model whose weights are all NaN (a corrupt checkpoint)
    model, *rest = load(name, args)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, __import__("jax").tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), params))
    return model, *rest

evaluate.load_model = nan_weights
sys.exit(evaluate.main(sys.argv[1:]))
"""


def test_evaluate_nan_score_is_null_and_exit_nonzero(tmp_path):
    from tests.test_evaluate import TINY
    out, table = tmp_path / "out.json", tmp_path / "table.md"
    proc = _python(_NAN_RUNNER, "--models", TINY, "--random-init", "--sample", "--cam", "gradcam", "--no-progress",
                   "--cache-dir", tmp_path / "cache", "--output", out, "--table", table, "--workers", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: non-finite alignment score" in proc.stderr and f"{TINY} / gradcam" in proc.stderr, proc.stderr

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the JSON")
    result = json.loads(out.read_text(), parse_constant=refuse)["results"][0]["cams"]["gradcam"]
    assert result["score"] is None and result["mean_rho"] is None and result["n_evaluated"] == 0
    assert result["n_skipped"] > 0 and set(result["rho_per_image"].values()) == {None}
    assert table.exists()


def test_second_run_on_the_same_workdir_is_refused(tmp_path):
    """A run holds workdir/.train.lock: a second one started there fails at once, naming the holder."""
    import fcntl

    import train
    workdir = tmp_path / "busy"
    workdir.mkdir()
    with open(workdir / ".train.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 1 on elsewhere")
        f.flush()
        with pytest.raises(train.ConfigError, match=r"is in use by another training run \(pid 1 on elsewhere\)"):
            train.main(_smoke_argv(workdir))
    assert not (workdir / "checkpoints").exists()
