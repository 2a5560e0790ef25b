"""Train or fine-tune a registry model on ImageNet: data parallel over every device of every host.

    python train.py --config configs/convnext_dcls.py --set data_dir=/data/tfds --workdir /ckpt/run
    python train.py --config configs/convnext_dcls.py:small --set data=imagefolder --set data_dir=/imagenet \
        --set batch_size=1024 --workdir /ckpt/run

Every host runs the same command. `jax.distributed.initialize()` runs when a cluster is detected (TPU pod,
SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or with --coordinator HOST:PORT --num-processes N --process-id I.
The global batch is sharded over a 1-D device mesh ("data"); parameters are replicated (optimizer moments
optionally sharded, `shard_opt_state`). Each host reads only its rows of each global batch.

The run resumes from the latest orbax checkpoint in `workdir/checkpoints`: the train state (step, parameters,
batch statistics, optimizer state, EMA) and the input position (data.pipeline.Loader.state: epoch, batch in
the epoch) are restored; the data order and every random draw are functions of (seed, step), so a resumed run
reads the same examples and is bit-identical to an uninterrupted one.

Harmonization (data="clickme", objective="harmonization", configs/harmonize.py): cross-entropy plus the alignment
of the model's input gradient (or a CAM) with the ClickMe human maps (cam/harmonization.py); export_dir writes the
result for evaluate.py --checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import configs
import models
from data import augment, imagenet, pipeline
from data.download import sha256_file
from dcls_jax.optim import path_names
from evaluation import runtime
from evaluation.training import (ConfigError, TrainingError, check_config, check_devices, create, make_eval_step,
                                 make_mixer, make_train_step)

# ------------------------------------------------------------------------------------------------------------
# Synthetic data (data="synthetic"): a smoke test of the whole loop without any dataset


class SyntheticSource:
    """`synthetic_size` generated examples of a split, random access like the real sources: image i has class
    i % num_classes, a colour of that class plus uniform noise, a function of (split, i) only."""

    def __init__(self, cfg: configs.Config, split: str):
        self.size, self.num_classes, self.image_size = cfg.synthetic_size, cfg.num_classes, cfg.image_size
        self.split_key = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
        self.palette = np.random.default_rng((7, cfg.num_classes)).integers(0, 256, (cfg.num_classes, 3))

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        s = self.image_size
        noise = np.random.default_rng((self.split_key, index)).integers(-48, 49, (s, s, 3))
        image = np.clip(self.palette[index % self.num_classes] + noise, 0, 255).astype(np.uint8)
        return {"image": image, "label": index % self.num_classes}


@dataclasses.dataclass(frozen=True)
class SyntheticTransform:
    """The generated image as it is, and in training a random-erasing box (data.imagenet.Transform's outputs)."""
    train: bool
    image_size: int
    erase_prob: float

    def __call__(self, example: dict, rng) -> dict:
        if not self.train:
            return {"image": example["image"]}
        s = self.image_size
        return {"image": example["image"], "erase": augment.erase_box(s, s, rng, self.erase_prob)}

    def empty(self) -> dict:
        return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8)}


# ------------------------------------------------------------------------------------------------------------
# Checkpoint integrity: a SHA-256 manifest of every file of each finished step, checked before a restore


def _hash_tree(root: str) -> dict[str, list]:
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, root)] = [os.path.getsize(path), sha256_file(path)]
    return files


class CheckpointHashes:
    """workdir/checkpoint_hashes/<step>.json: {relative path: [size, sha256]} of the finished step directory
    checkpoints/<step> (written by process 0 once orbax has finalised the step). `problem(step)` says why a step
    must not be trusted (None: verified); a step without a manifest (a run killed between orbax's finalisation and
    the manifest) is restored unverified, with a warning."""

    def __init__(self, workdir: str):
        self.ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoint_hashes")

    def _manifest(self, step: int) -> str:
        return os.path.join(self.dir, f"{step}.json")

    def write(self, steps) -> None:
        os.makedirs(self.dir, exist_ok=True)
        for step in steps:
            step_dir = os.path.join(self.ckpt_dir, str(step))
            if not os.path.isdir(step_dir):
                continue
            runtime.write_atomic(self._manifest(step), json.dumps({"step": step, "files": _hash_tree(step_dir)}))
        for name in os.listdir(self.dir):   # manifests of steps orbax has since deleted (max_to_keep)
            stem = name[:-5] if name.endswith(".json") else None
            if stem is not None and stem.isdigit() and not os.path.isdir(os.path.join(self.ckpt_dir, stem)):
                os.unlink(os.path.join(self.dir, name))

    def problem(self, step: int) -> str | None:
        try:
            with open(self._manifest(step)) as f:
                expected = json.load(f)["files"]
        except FileNotFoundError:
            return None   # not verifiable: the caller warns (see `has_manifest`)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable hash manifest ({e})"
        got = _hash_tree(os.path.join(self.ckpt_dir, str(step)))
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        changed = sorted(k for k in set(expected) & set(got) if list(expected[k]) != got[k])
        if missing or extra or changed:
            parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) \
                + ([f"SHA-256 mismatch in {changed[:3]}"] if changed else [])
            return "; ".join(parts)
        return None

    def has_manifest(self, step: int) -> bool:
        return os.path.exists(self._manifest(step))

    def quarantine(self, step: int) -> str:
        """Moves checkpoints/<step> (and its manifest) to workdir/checkpoints_corrupt/: kept, never restored."""
        dest = os.path.join(os.path.dirname(self.ckpt_dir), "checkpoints_corrupt")
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.move(os.path.join(self.ckpt_dir, str(step)), target)
        if os.path.exists(self._manifest(step)):
            shutil.move(self._manifest(step), target + ".sha256.json")
        return target


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"train.py: warning: {message}", file=sys.stderr, flush=True)


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------------------
# ClickMe input (data="clickme") and the export of a trained model for evaluate.py


def clickme_pipeline(cfg: configs.Config, split: str, training: bool, batch: int, process_index: int,
                     process_count: int):
    """The ClickMe split as data.pipeline.Loader batches (image, heatmap, label). The tfds build
    "clickme/with_train" in data_dir is prepared on first use from clickme_dir, clickme_url or the official
    bucket; with several processes, process 0 prepares it first."""
    from jax.experimental import multihost_utils

    from data import clickme
    kwargs = {"data_dir": cfg.data_dir, "config": "with_train"}
    for key, value in (("clickme_dir", cfg.clickme_dir), ("base_url", cfg.clickme_url),
                       ("num_shards", cfg.clickme_num_shards)):
        if value:
            kwargs[key] = value

    def prepare():
        try:
            return clickme.data_source(split, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot open the ClickMe {split} split (data_dir {cfg.data_dir!r}, clickme_dir "
                              f"{cfg.clickme_dir!r}): {e}") from e

    source = prepare() if process_count == 1 or process_index == 0 else None
    if process_count > 1:
        multihost_utils.sync_global_devices(f"clickme {split} prepared")
        if source is None:
            source = prepare()
    transform = pipeline.ClickmeTransform(train=training, image_size=cfg.image_size,
                                          hflip=cfg.hflip if training else 0.0)
    try:   # JPEG decoding and numpy resizing release the GIL: threads
        return pipeline.Loader(source, transform, batch, seed=cfg.seed, process_index=process_index,
                               process_count=process_count, workers=cfg.data_workers, prefetch=cfg.prefetch,
                               num_classes=clickme.NUM_CLASSES)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def export_model(cfg: configs.Config, state, directory: str):
    """Writes the model of a train state (its EMA when the run keeps one and eval_ema is set) with
    models.convert.save: `evaluate.py --model NAME --checkpoint DIRECTORY` scores it, models.convert.restore
    reads it. An earlier export in `directory` is replaced. Runs on one process."""
    from models import convert
    weights = state["ema"] if "ema" in state and cfg.eval_ema else state
    flat = {}
    for part in (weights["params"], weights["batch_stats"]):
        for path, x in jax.tree_util.tree_flatten_with_path(part)[0]:
            names = path_names(path)
            names = names[:-1] if names[-1] == "value" else names   # a restored tree keeps the Variable's key
            flat[".".join(names)] = np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
    overrides = dict(cfg.model_kwargs)
    if cfg.num_classes != models.get_entry(cfg.model).num_classes:
        overrides["num_classes"] = cfg.num_classes
    model = convert.from_state_dict(cfg.model, flat, **overrides)
    return convert.save(model, directory, cfg.model, overrides=overrides, overwrite=True)


def export_workdir(workdir: str, directory: str, step: int | None = None):
    """export_model from the latest (or `step`) checkpoint of a run's workdir, in this process alone (e.g. after a
    multi-host run): python -c "import train; train.export_workdir('WORKDIR', 'OUT')"."""
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "meta": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir} holds no checkpoint")
        tree = manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
    finally:
        manager.close()
    known = {f.name for f in dataclasses.fields(configs.Config)}
    from models.checkpoints import json_tuples
    cfg = configs.Config(**{k: json_tuples(v) for k, v in meta["config"].items() if k in known})
    return export_model(cfg, state, directory)


# ------------------------------------------------------------------------------------------------------------
# Logging


class Progress:
    """Progress bar on a terminal (process 0), and a metrics line every `log_every` steps (also as JSON lines in
    workdir/metrics.jsonl)."""

    def __init__(self, cfg: configs.Config, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        self.bar = runtime.Progress(total_steps, enabled=self.active and cfg.progress and sys.stderr.isatty(),
                                    desc="train", unit="step", initial=start_step)
        self.total, self.every = total_steps, max(cfg.log_every, 1)
        self.batch = cfg.batch_size
        self.t0, self.s0 = time.time(), start_step
        self.file = self.tb = None
        if self.active and cfg.workdir:
            path = os.path.join(cfg.workdir, "metrics.jsonl")
            self._drop_after(path, start_step)
            self.file = open(path, "a")
            if cfg.tensorboard:
                import tensorboardX
                # purge_step: TensorBoard hides the events a previous (interrupted) run logged past the resume
                self.tb = tensorboardX.SummaryWriter(os.path.join(cfg.workdir, "tensorboard"),
                                                     purge_step=start_step + 1 if start_step else 0)

    @staticmethod
    def _drop_after(path: str, start_step: int) -> None:
        """Keeps the records of steps this run will not log again (<= start_step when resuming, none when
        starting at 0): each step appears once in metrics.jsonl, from the trajectory that was kept. The others
        (logged by an interrupted run past its last good checkpoint) move to metrics_superseded.jsonl."""
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept, superseded, cut = [], [], 0
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:   # a line cut by a kill
                cut += 1
                continue
            line = line if line.endswith("\n") else line + "\n"
            if isinstance(record, dict) and start_step and isinstance(record.get("step"), int) \
                    and record["step"] <= start_step:
                kept.append(line)
            else:
                superseded.append(line)
        if cut:
            _warn(f"dropped {cut} unreadable line(s) of {path} (cut by an interrupted run?)")
        if superseded:
            with open(os.path.join(os.path.dirname(os.path.abspath(path)), "metrics_superseded.jsonl"), "a") as f:
                f.writelines(superseded)
        if len(kept) != len(lines):
            runtime.write_atomic(path, "".join(kept))

    def write(self, record: dict):
        if not self.active:
            return
        self.bar.write("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in record.items()))
        if self.file:
            self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n")
            self.file.flush()
        if self.tb:
            group = "eval" if "eval_images" in record else "train"
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{group}/{k}", v, record["step"])
            self.tb.flush()

    def step(self, step: int, epoch: float, metrics):
        self.bar.update(step - self.bar.bar.n)
        if step % self.every == 0 or step == self.total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            ips = (step - self.s0) * self.batch / max(now - self.t0, 1e-9)
            self.t0, self.s0 = now, step
            self.write({"step": step, "epoch": round(epoch, 3), **m, "images_per_s": ips})

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()
            self.tb = None


# ------------------------------------------------------------------------------------------------------------


EXAMPLES = """examples:
  python train.py --config configs/smoke.py                    # a few steps on generated images, no dataset
  python train.py --config configs/smoke.py --workdir /tmp/smoke --set total_steps=20
  python train.py --config configs/convnext_dcls.py --set data_dir=$TFDS_DIR --workdir /ckpt/cnx_t_dcls
  python train.py --config configs/convnext_dcls.py:small --set data=imagefolder --set data_dir=/imagenet \\
      --set batch_size=1024 --workdir /ckpt/run
  python train.py --config configs/finetune.py --set init_checkpoint=model.pth --set data_dir=/flowers \\
      --set num_classes=102 --workdir /ckpt/ft
  # multi-host without a cluster manager: the same command on every host
  python train.py --config ... --coordinator host0:1234 --num-processes 2 --process-id 0

exit status: 0 done, 1 training stopped (non-finite loss or gradient), 2 configuration or input error
(one line on stderr, before any computation).
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    parser = _Parser(prog="train.py", description=__doc__.split("\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="config keys (--set KEY=VALUE; defaults of configs.Config, a recipe file changes some):\n"
                            + configs.describe() + "\n\n" + EXAMPLES)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg] (e.g. configs/smoke.py, "
                        "configs/convnext_dcls.py:small)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (keys below); values parsed by the key's type")
    parser.add_argument("--workdir", help="same as --set workdir=...")
    runtime.add_distributed_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg = configs.load(args.config)
        cfg = configs.override(cfg, args.set + ([f"workdir={args.workdir}"] if args.workdir else []))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        runtime.check_distributed_flags(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return args, cfg


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """An exclusive lock on workdir/.train.lock (process 0 holds it for the run): a second run started on the
    same workdir is refused instead of interleaving its checkpoints and logs with the first's."""
    import fcntl
    f = open(os.path.join(workdir, ".train.lock"), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ConfigError(f"workdir {workdir!r} is in use by another training run "
                              f"({f.read().strip() or 'unknown process'})") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
    finally:
        f.close()


def main(argv=None):
    """Runs training; returns the final train state (a dict of global arrays) and the last evaluation."""
    with contextlib.ExitStack() as cleanup:
        return _train(*parse_args(argv), cleanup)


def _train(args, cfg: configs.Config, cleanup: contextlib.ExitStack):
    # ==================== configuration (before any device work) ====================
    check_config(cfg)
    runtime.init_distributed(args)
    if cfg.workdir and jax.process_index() == 0:
        cleanup.enter_context(workdir_lock(cfg.workdir))
    mixup_group = check_devices(cfg, jax.device_count(), jax.process_count())

    # ==================== mesh ====================
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    pidx, pcount = jax.process_index(), jax.process_count()

    # ==================== input ====================
    def loader(split, training, batch):
        if cfg.data == "clickme":
            return clickme_pipeline(cfg, split, training, batch, pidx, pcount)
        try:
            if cfg.data == "synthetic":
                source = SyntheticSource(cfg, split)
                transform = SyntheticTransform(training, cfg.image_size, cfg.random_erasing)
            else:
                source = imagenet.open_source(cfg.data, cfg.data_dir, split, cfg.tfds_name)
                transform = imagenet.Transform(
                    train=training, image_size=cfg.image_size, crop_pct=cfg.eval_crop_pct,
                    interpolation=cfg.interpolation, scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio),
                    hflip=cfg.hflip, rand_augment=cfg.rand_augment, erase_prob=cfg.random_erasing,
                    mean=models.get_entry(cfg.model).mean)
            # PIL augmentations hold the GIL: worker processes
            pipe = pipeline.Loader(source, transform, batch, seed=cfg.seed, process_index=pidx, process_count=pcount,
                                   workers=cfg.data_workers, prefetch=cfg.prefetch, threads=cfg.data == "synthetic")
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
        if pipe.num_classes != cfg.num_classes:
            raise ConfigError(f"split {split!r} has {pipe.num_classes} classes but num_classes={cfg.num_classes}")
        return pipe

    train_data = loader(cfg.train_split, True, cfg.batch_size)
    val_data = loader(cfg.val_split, False, cfg.eval_batch_size or cfg.batch_size) if cfg.val_split else None
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = cfg.total_steps or max(1, round(cfg.epochs * steps_per_epoch))
    eval_every = steps_per_epoch if cfg.eval_every < 0 else cfg.eval_every

    def to_global(batch, sharding=data_sharding):
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

    mixer = make_mixer(cfg)

    def train_batch(local, step):
        batch = to_global(local)
        if mixer is not None:   # per-group lambda and box, drawn on the host from (seed, step) as timm does
            lam, cut, box = mixer.params(np.random.default_rng((cfg.seed, 2, step)), cfg.batch_size // mixup_group,
                                         cfg.image_size, cfg.image_size)
            batch.update(to_global({"mix_lam": lam, "mix_cut": cut, "mix_box": box}, replicated))
        return batch

    # ==================== model, optimizer, initial state ====================
    t = create(cfg, mesh, total_steps, steps_per_epoch)
    state, rest = t.state, t.rest

    # ==================== checkpoints: resume ====================
    manager, hashes, unsealed = None, None, []

    def open_manager():
        return ocp.CheckpointManager(
            os.path.join(os.path.abspath(cfg.workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=True))

    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)
        manager, hashes = open_manager(), CheckpointHashes(cfg.workdir)
        manager, state, data_state = resume(manager, open_manager, hashes, state, cfg)
        if data_state is not None:   # the input resumes where the checkpoint's run was (same order, same position)
            try:
                start = train_data.resume_step(data_state)
            except ValueError as e:
                raise ConfigError(f"cannot resume {cfg.workdir}: {e}") from None
            if start != int(jax.device_get(state["step"])):
                raise ConfigError(f"cannot resume {cfg.workdir}: its checkpoint of step {int(state['step'])} saved "
                                  f"the data position of step {start}")

    def seal():
        """Waits for the pending asynchronous save, then writes the hash manifests of the steps it finished."""
        manager.wait_until_finished()
        if pidx == 0 and unsealed:
            hashes.write(unsealed)
        unsealed.clear()

    def save(step):
        if manager is not None:
            seal()   # orbax waits for the previous save here anyway
            meta = {"step": step, "data": train_data.state(step), "config": dataclasses.asdict(cfg)}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))
            unsealed.append(step)

    # ==================== update and evaluation steps ====================
    train_step = make_train_step(cfg, t.graphdef, t.tx, t.schedule, steps_per_epoch, t.state_sharding)
    eval_step = make_eval_step(cfg, t.eval_graphdef)

    def evaluate(step):
        variants = {"": state}
        if "ema" in state and cfg.eval_ema:
            variants["ema_"] = state["ema"]
        totals = {prefix: np.zeros(3) for prefix in variants}
        for batch in val_data.iterate():
            batch.pop("index")
            batch = to_global(batch)
            for prefix, v in variants.items():
                totals[prefix] += np.asarray(jax.device_get(eval_step(v["params"], v["batch_stats"], rest, batch)))
        result = {}
        for prefix, (correct, ce, n) in totals.items():
            result.update({f"{prefix}top1": float(correct / max(n, 1)), f"{prefix}val_loss": float(ce / max(n, 1))})
        progress.write({"step": step, "eval_images": int(totals[""][2]), **result})
        return result

    # ==================== training loop ====================
    step = int(jax.device_get(state["step"]))
    progress = Progress(cfg, total_steps, step)
    if pidx == 0:
        print(f"{cfg.model}: {jax.device_count()} devices on {pcount} processes, batch {cfg.batch_size}, "
              f"{steps_per_epoch} steps/epoch, steps {step} -> {total_steps}", flush=True)
    last_eval = {}
    pending_check = None   # (step, loss, grad_norm) on the device, checked one step later (no pipeline stall)

    def check_finite():
        nonlocal pending_check
        if pending_check is None:
            return
        at, loss, grad_norm = pending_check
        pending_check = None
        loss, grad_norm = (float(x) for x in jax.device_get((loss, grad_norm)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = manager.latest_step() if manager is not None else None
            raise TrainingError(
                f"non-finite training loss at step {at} (loss {loss}, gradient norm {grad_norm}); stopped. "
                + (f"The last checkpoint (step {last}) precedes it. " if last is not None else "")
                + "Lower lr, set grad_clip, or check the data and init_checkpoint")

    try:
        if val_data is not None and cfg.eval_at_start and step == 0:
            last_eval = evaluate(0)
        stop = min(total_steps, cfg.stop_at_step) if cfg.stop_at_step else total_steps
        for batch in train_data.iterate(step, stop - step):
            batch = train_batch({k: v for k, v in batch.items() if k not in ("index", "valid")}, step)
            with jax.transfer_guard("disallow"):   # every host <-> device copy in the loop is explicit
                state, metrics = train_step(state, rest, batch)
            check_finite()   # the previous step's, done by now
            step += 1
            pending_check = (step, metrics["loss"], metrics["grad_norm"])
            progress.step(step, step / steps_per_epoch, metrics)
            if unsealed and not manager.is_saving_in_progress():   # finalised in the background: hash it now
                if pidx == 0:                                         # (no collective call: hosts may differ here)
                    hashes.write(unsealed)
                unsealed.clear()
            if val_data is not None and ((eval_every and step % eval_every == 0) or step == total_steps):
                check_finite()
                last_eval = evaluate(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != stop:
                check_finite()   # a non-finite state is never checkpointed
                save(step)
        check_finite()
        if manager is not None and manager.latest_step() != step:
            save(step)
    finally:
        if manager is not None:
            seal()   # the checkpoints already saved are good: finish them and their manifests
            manager.close()
        progress.close()
    if cfg.export_dir and pcount == 1:
        export_model(cfg, state, cfg.export_dir)
    elif cfg.export_dir and pidx == 0:
        print(f"export_dir: with several processes, export afterwards in one process: python -c \"import train; "
              f"train.export_workdir({cfg.workdir!r}, {cfg.export_dir!r})\"", flush=True)
    return state, last_eval


def _as_json(v):
    return json.loads(json.dumps(v))


# Config keys a resumed run must share with the checkpoint's (they fix the data order or the state's structure).
RESUME_KEYS = {k: (lambda a, b: a == _as_json(b)) for k in ("seed", "batch_size", "data", "model", "model_kwargs",
                                                              "num_classes", "optimizer")}
RESUME_KEYS.update({k: (lambda a, b: (a > 0) == (b > 0)) for k in ("ema_decay", "grad_clip")})


def resume(manager, open_manager, hashes: CheckpointHashes, state, cfg: configs.Config):
    """Restores the newest checkpoint that verifies (hash manifest) and restores; a corrupt newer one is moved to
    workdir/checkpoints_corrupt/ with a warning, and the run goes on from the previous good one. -> (manager,
    state, data position saved with it (data.pipeline.Loader.state; None for a checkpoint without one));
    `state` is unchanged when the directory holds no checkpoint."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return manager, state, None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    def error(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    bad = []
    for s in steps:
        problem = hashes.problem(s)
        if problem is None:
            if not hashes.has_manifest(s):
                _warn(f"checkpoint step {s} has no hash manifest (the run ended before writing it): "
                      "restoring it unverified")
            try:
                meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved = meta["config"]
            except Exception as e:   # orbax/tensorstore raise assorted types for damaged files
                problem = error(e)
        if problem is None:
            # A different run's checkpoint is a configuration error, not corruption: no fallback for it.
            for key, same in RESUME_KEYS.items():
                if key in saved and not same(saved[key], getattr(cfg, key)):
                    raise ConfigError(f"cannot resume {cfg.workdir}: its run has {key}={saved[key]!r}, "
                                      f"this config {key}={getattr(cfg, key)!r}")
            try:
                restored_state = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
            except Exception as e:
                problem = error(e)
        if problem is not None:
            _warn(f"checkpoint step {s} in {hashes.ckpt_dir} is corrupt ({problem}); "
                  + ("trying the previous one" if s != steps[-1] else "no older checkpoint"))
            bad.append(s)
            continue
        if bad:   # out of the way, so the steps can be saved again; kept for inspection
            manager.close()
            if jax.process_index() == 0:
                for b in bad:
                    _warn(f"moved corrupt checkpoint step {b} to {hashes.quarantine(b)}; resuming from step {s}")
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("corrupt checkpoints moved")
            manager = open_manager()
        return manager, restored_state, meta.get("data")
    raise ConfigError(f"no usable checkpoint in {hashes.ckpt_dir}: steps {sorted(steps)} are all corrupt (see the "
                      "warnings above); move the directory away to start afresh")


def cli(argv=None) -> int:
    """The command line: configuration and input errors are one line on stderr and exit status 2 (before any
    computation); a non-finite loss stops training with status 1."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"train.py: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"train.py: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":
    runtime.keep_freed_memory()   # before JAX allocates: see its docstring
    sys.exit(cli())
