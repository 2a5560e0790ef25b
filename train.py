"""Train or fine-tune a registry model on ImageNet: data parallel over every device of every host.

    python train.py --config configs/convnext_dcls.py --set data_dir=/data/tfds --workdir /ckpt/run
    python train.py --config configs/convnext_dcls.py:small --set data=imagefolder --set data_dir=/imagenet \
        --set batch_size=1024 --workdir /ckpt/run

Every host runs the same command. `jax.distributed.initialize()` runs when a cluster is detected (TPU pod,
SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or with --coordinator HOST:PORT --num_processes N --process_id I.
The global batch is sharded over a 1-D device mesh ("data"); parameters are replicated (optimizer moments
optionally sharded, `shard_opt_state`). Each host reads only its rows of each global batch.

The run resumes from the latest orbax checkpoint in `workdir/checkpoints`: the train state (step, parameters,
batch statistics, optimizer state, EMA) is restored, and the data order and every random draw are functions of
(seed, step), so a resumed run is bit-identical to an uninterrupted one.

Harmonization (data="clickme", objective="harmonization", configs/harmonize.py): cross-entropy plus the alignment
of the model's input gradient (or a CAM) with the ClickMe human maps (cam/harmonization.py); export_dir writes the
result for evaluate.py --checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import configs
import dcls_jax
import models
from cam import harmonization
from data import augment, imagenet

OPTIMIZERS = ("adamw", "lamb")
OBJECTIVES = ("ce", "harmonization")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A problem found before any computation; the command line prints it and exits with status 2."""


# ------------------------------------------------------------------------------------------------------------
# Configuration checks


def check_config(cfg: configs.Config) -> None:
    """Checks that need no device: names, ranges, paths."""
    try:
        models.get_entry(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    problems = []
    if cfg.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer {cfg.optimizer!r} is not one of {OPTIMIZERS}")
    if cfg.compute_dtype not in DTYPES:
        problems.append(f"compute_dtype {cfg.compute_dtype!r} is not one of {tuple(DTYPES)}")
    if cfg.interpolation not in augment.INTERPOLATIONS:
        problems.append(f"interpolation {cfg.interpolation!r} is not one of {tuple(augment.INTERPOLATIONS)}")
    if cfg.batch_size <= 0:
        problems.append(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.total_steps <= 0 and cfg.epochs <= 0:
        problems.append("set epochs > 0 or total_steps > 0")
    if cfg.lr <= 0 or cfg.min_lr < 0:
        problems.append(f"lr must be positive and min_lr non-negative, got lr={cfg.lr} min_lr={cfg.min_lr}")
    if min(cfg.mixup, cfg.cutmix) < 0 or not 0 <= cfg.label_smoothing < 1:
        problems.append("mixup and cutmix alphas must be >= 0 and label_smoothing in [0, 1)")
    if cfg.rand_augment:
        try:
            augment.RandAugment.from_string(cfg.rand_augment)
        except ValueError as e:
            problems.append(str(e))
    if cfg.stop_at_step and not cfg.workdir:
        problems.append("stop_at_step needs a workdir to checkpoint into")
    problems += check_harmonization(cfg)
    if cfg.data == "clickme":
        pass   # see check_harmonization (data_dir is created when the shards are prepared)
    elif cfg.data not in ("tfds", "imagefolder"):
        problems.append(f"data {cfg.data!r} is not 'tfds', 'imagefolder' or 'clickme'")
    elif not cfg.data_dir or not os.path.isdir(cfg.data_dir):
        problems.append(f"data_dir {cfg.data_dir!r} does not exist")
    else:
        splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split else [])
        if cfg.data == "imagefolder":
            problems += [f"ImageFolder split {os.path.join(cfg.data_dir, s)!r} does not exist"
                         for s in splits if not os.path.isdir(os.path.join(cfg.data_dir, s))]
        elif not os.path.isdir(os.path.join(cfg.data_dir, cfg.tfds_name)):
            problems.append(f"no tensorflow-datasets {cfg.tfds_name!r} in data_dir {cfg.data_dir!r}")
    if cfg.init_checkpoint and not os.path.exists(cfg.init_checkpoint):
        problems.append(f"init_checkpoint {cfg.init_checkpoint!r} does not exist")
    if problems:
        raise ConfigError("; ".join(problems))


def check_harmonization(cfg: configs.Config) -> list[str]:
    """The objective and the ClickMe source (data="clickme"): what cannot work with human maps."""
    problems = []
    if cfg.objective not in OBJECTIVES:
        problems.append(f"objective {cfg.objective!r} is not one of {OBJECTIVES}")
    if cfg.objective == "harmonization":
        if cfg.data != "clickme":
            problems.append("objective 'harmonization' needs human maps: set data=clickme")
        try:
            harmonization.check_method(cfg.harmonization_map, cfg.harmonization_layer)
        except ValueError as e:
            problems.append(str(e))
        if cfg.harmonization_lambda < 0 or cfg.harmonization_weight_l2 < 0 or cfg.harmonization_levels < 1:
            problems.append("harmonization_lambda and harmonization_weight_l2 must be >= 0, harmonization_levels >= 1")
    if cfg.data == "clickme":
        moved = [k for k in ("rand_augment", "mixup", "cutmix", "random_erasing") if getattr(cfg, k)]
        if moved:
            problems.append(f"data=clickme keeps each image on its human map: set {', '.join(moved)} off "
                            f"(rand_augment=none, mixup/cutmix/random_erasing=0)")
        if cfg.clickme_dir and not os.path.isdir(cfg.clickme_dir):
            problems.append(f"clickme_dir {cfg.clickme_dir!r} does not exist")
        if cfg.clickme_dir and cfg.clickme_url:
            problems.append("clickme_dir and clickme_url exclude each other")
        if not cfg.data_dir:
            problems.append("data=clickme needs data_dir (the tensorflow-datasets directory the shards are "
                            "prepared into)")
        bad = [s for s in (cfg.train_split, cfg.val_split) if s is not None and s not in ("train", "validation")]
        if bad:
            problems.append(f"ClickMe splits are 'train' and 'validation', got {bad}")
        if cfg.num_classes != 1000:
            problems.append(f"ClickMe labels are ImageNet classes: num_classes must be 1000, got {cfg.num_classes}")
    return problems


def check_devices(cfg: configs.Config, num_devices: int, num_processes: int) -> int:
    """Batch divisibility; returns the mixup group size."""
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    for name, b in (("batch_size", cfg.batch_size), ("eval_batch_size", eval_batch)):
        if b % num_devices or b % num_processes:
            raise ConfigError(f"{name} {b} is not divisible by the {num_devices} devices "
                              f"({num_processes} processes)")
    group = cfg.mixup_group or cfg.batch_size // num_devices
    if (cfg.mixup or cfg.cutmix) and (cfg.batch_size % group or group % 2):
        raise ConfigError(f"mixup group {group} must be even and divide batch_size {cfg.batch_size}")
    return group


# ------------------------------------------------------------------------------------------------------------
# Pieces of the train step


def lr_schedule(cfg: configs.Config, total_steps: int, steps_per_epoch: int):
    """The ConvNeXt schedule: linear warmup from 0 (np.linspace(0, lr, W)), then cosine from lr to min_lr."""
    lr = cfg.lr * (cfg.batch_size / cfg.lr_base_batch if cfg.lr_base_batch else 1.0)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)
    decay = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup - 1, 1)
        cos = cfg.min_lr + 0.5 * (lr - cfg.min_lr) * (1 + jnp.cos(jnp.pi * (step - warmup) / decay))
        return jnp.where(step < warmup, warm, cos)

    return schedule


def _names(path) -> tuple[str, ...]:
    """A key path into an nnx.State as strings, without the Variable's trailing `.value`."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
                 if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def param_groups(params, cfg: configs.Config):
    """'position' (DCLS P/SIG: no weight decay, lr x position_lr_mult), 'no_decay' (1-d and biases), 'decay'."""
    positions = dcls_jax.position_labels(params, positions="position", default="default")

    def label(path, x, pos):
        if pos == "position":
            return "position"
        if cfg.no_decay_1d and (x.ndim <= 1 or _names(path)[-1] == "bias"):
            return "no_decay"
        return "decay"

    return jax.tree_util.tree_map_with_path(label, params, positions)


def make_optimizer(cfg: configs.Config, schedule, groups) -> optax.GradientTransformation:
    def group(lr_mult, weight_decay):
        parts = [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)]
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        if cfg.optimizer == "lamb":
            parts.append(optax.scale_by_trust_ratio())
        parts.append(optax.scale_by_learning_rate(lambda s: lr_mult * schedule(s)))
        return optax.chain(*parts)

    tx = optax.multi_transform({"decay": group(1.0, cfg.weight_decay), "no_decay": group(1.0, 0.0),
                                "position": group(cfg.position_lr_mult, 0.0)}, groups)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


def clamp(params, bounds):
    """Clamps each DCLS P (paths from dcls_jax.position_bounds) to [-(d_i // 2), d_i // 2], exactly."""
    def f(path, p):
        lim = bounds.get(_names(path))
        if lim is None:
            return p
        lim = jnp.asarray(lim, p.dtype).reshape((-1,) + (1,) * (p.ndim - 1))
        return jnp.clip(p, -lim, lim)
    return jax.tree_util.tree_map_with_path(f, params)


def repulsive_loss(params):
    """ConvNeXt-dcls `get_dcls_loss_rep`: per P (nd, O, I, K), 2 * sum_{k<l} relu(1 - |p_k - p_l|) / (K(K-1)OI),
    averaged over the (unique) P parameters."""
    losses = []
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _names(path)[-1] != "P":
            continue
        nd, o, i, k = p.shape
        pts = p.reshape(nd, o * i, k).transpose(1, 2, 0)
        sq = jnp.sum(jnp.square(pts[:, :, None] - pts[:, None, :]), -1)
        dist = jnp.sqrt(jnp.where(sq > 0, sq, 1.0)) * (sq > 0)   # zero distance: value 0, gradient 0
        upper = jnp.triu(jnp.ones((k, k), bool), 1)
        losses.append(2 * jnp.sum(jnp.where(upper, jax.nn.relu(1 - dist), 0)) / (k * (k - 1) * o * i))
    if not losses:
        return jnp.zeros(())
    return sum(losses) / len(losses)


def make_train_step(cfg: configs.Config, graphdef, tx, schedule, bounds, steps_per_epoch: int, state_sharding):
    """jitted (state, rest, batch) -> (state, metrics), `state` donated. `rest`: the model's other variables
    (RNG streams, reseeded every step). `batch`: global arrays, images and labels sharded over the batch, and
    the mixup parameters of each group (replicated) when mixup/cutmix is on."""
    dtype = DTYPES[cfg.compute_dtype]
    entry = models.get_entry(cfg.model)
    mixer = make_mixer(cfg)
    harmonize = cfg.objective == "harmonization"

    def step_fn(state, rest, batch):
        step = state["step"]
        k_erase, k_drop = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), step))
        x = augment.normalize(batch["image"], entry.mean, entry.std)
        if cfg.random_erasing > 0:
            x = augment.random_erase(x, batch["erase"], k_erase)
        if mixer is not None:
            x, targets = mixer.apply(x, batch["label"], batch["mix_lam"], batch["mix_cut"], batch["mix_box"])
        else:
            targets = augment.smooth_labels(batch["label"], cfg.num_classes, cfg.label_smoothing)
        x = x.astype(dtype)   # the layers cast their float32 weights to the input's dtype
        model = nnx.merge(graphdef, state["params"], state["batch_stats"], rest.unpack())
        nnx.reseed(model, dropout=k_drop)   # every dropout / drop-path stream: a key derived from (seed, step)

        def loss_fn(model):
            if harmonize:   # the same forward pass gives the logits and the model's map
                logits, align = harmonization_terms(cfg, model, batch, dtype)
            else:
                logits, align = model(x).astype(jnp.float32), None
            ce = optax.softmax_cross_entropy(logits, targets).mean()
            loss = ce
            if harmonize:
                loss = loss + cfg.harmonization_lambda * align
                if cfg.harmonization_weight_l2:
                    loss = loss + cfg.harmonization_weight_l2 * harmonization.weight_l2(model)
            if cfg.repulsive_loss:
                active = step // steps_per_epoch > cfg.repulsive_after_epoch
                loss = loss + jnp.where(active, repulsive_loss(nnx.state(model, nnx.Param)) ** 2, 0.0)
            return loss, (ce, logits, align)

        # nnx.value_and_grad (not jax's) so that the drop-path streams may advance inside the differentiation
        (loss, (ce, logits, align)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        batch_stats = nnx.state(model, nnx.BatchStat)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if bounds:
            params = clamp(params, bounds)
        new = {"step": step + 1, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
        if "ema" in state:
            d = cfg.ema_decay
            new["ema"] = jax.tree.map(lambda e, v: e * d + (1.0 - d) * v, state["ema"],
                                      {"params": params, "batch_stats": batch_stats})
        metrics = {"loss": loss, "ce": ce, "lr": schedule(step), "grad_norm": optax.tree.norm(grads),
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        if harmonize:
            metrics["align"] = align
        return new, metrics

    replicated = NamedSharding(state_sharding["step"].mesh, P())
    return jax.jit(step_fn, out_shardings=(state_sharding, replicated), donate_argnums=0)


def harmonization_terms(cfg: configs.Config, model, batch, dtype):
    """(logits, alignment term) of the harmonization objective (cam/harmonization.py) on a ClickMe batch: the
    model's map (`harmonization_map`) of the label's logit, taken with respect to the [0, 255] pixels as the
    reference does, against the human maps, constant human maps masked."""
    entry = models.get_entry(cfg.model)
    maps, logits = harmonization.model_maps(
        model, batch["image"].astype(jnp.float32), batch["label"],
        preprocess=lambda p: augment.normalize(p, entry.mean, entry.std, dtype),
        method=cfg.harmonization_map, layer=cfg.harmonization_layer)
    return logits, harmonization.alignment_loss(maps, batch["heatmap"], levels=cfg.harmonization_levels)


def make_eval_step(cfg: configs.Config, graphdef):
    """jitted (params, batch_stats, rest, batch) -> [correct, cross-entropy, count] summed over the global batch."""
    dtype = DTYPES[cfg.compute_dtype]
    entry = models.get_entry(cfg.model)

    def eval_fn(params, batch_stats, rest, batch):
        model = nnx.merge(graphdef, params, batch_stats, rest.unpack())
        logits = model(augment.normalize(batch["image"], entry.mean, entry.std, dtype)).astype(jnp.float32)
        mask = batch["mask"]
        correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.stack([correct.sum(), jnp.where(mask, ce, 0).sum(), mask.sum()])

    return jax.jit(eval_fn)


def make_mixer(cfg: configs.Config) -> augment.Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return augment.Mixup(cfg.num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                         cfg.label_smoothing)


@jax.tree_util.register_pytree_node_class
class Rest:
    """The model's variables besides parameters and batch statistics (its RNG streams), with typed PRNG keys
    held as raw key data so that they travel like any array (multi-host placement, jit arguments)."""

    def __init__(self, leaves, treedef, impls):
        self.leaves, self.treedef, self.impls = leaves, treedef, impls

    @classmethod
    def pack(cls, tree):
        leaves, treedef = jax.tree.flatten(tree)
        impls = tuple(jax.random.key_impl(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else None
                      for x in leaves)
        return cls([jax.random.key_data(x) if i else x for x, i in zip(leaves, impls)], treedef, impls)

    def unpack(self):
        return jax.tree.unflatten(self.treedef, [jax.random.wrap_key_data(x, impl=i) if i else x
                                                 for x, i in zip(self.leaves, self.impls)])

    def tree_flatten(self):
        return self.leaves, (self.treedef, self.impls)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(list(leaves), *aux)


def opt_state_sharding(abstract_opt_state, mesh):
    """ZeRO-1: each moment sharded along its first axis divisible by the device count (else replicated)."""
    n = mesh.size

    def spec(x):
        for axis, size in enumerate(x.shape):
            if size % n == 0 and size >= n:
                return NamedSharding(mesh, P(*([None] * axis), "data"))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, abstract_opt_state)


# ------------------------------------------------------------------------------------------------------------
# Model construction and fine-tuning initialisation


def build_model(cfg: configs.Config):
    kwargs = dict(cfg.model_kwargs, num_classes=cfg.num_classes)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    return models.create_model(cfg.model, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1), **kwargs)


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(_names(path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def load_init_checkpoint(cfg: configs.Config, params, batch_stats):
    """Parameters and batch statistics from `init_checkpoint` (via models.convert.load), except those whose
    name matches `init_skip`, which keep their fresh values. Every other name must exist with the same shape."""
    from models import convert
    source = convert.load(cfg.model, cfg.init_checkpoint, cfg.init_checkpoint_key, **cfg.model_kwargs)
    loaded = {**_flat(nnx.state(source, nnx.Param)), **_flat(nnx.state(source, nnx.BatchStat))}
    skip = re.compile(cfg.init_skip) if cfg.init_skip else None
    problems, used = [], set()

    def take(path, fresh):
        name = ".".join(_names(path))
        if skip is not None and skip.search(name):
            return np.asarray(fresh)
        if name not in loaded:
            problems.append(f" - {name} (missing from the checkpoint)")
            return fresh
        used.add(name)
        value = np.asarray(loaded[name])
        if value.shape != fresh.shape:
            problems.append(f" ! {name}: checkpoint {value.shape} vs model {fresh.shape}")
            return fresh
        return value.astype(fresh.dtype)

    params = jax.tree_util.tree_map_with_path(take, params)
    batch_stats = jax.tree_util.tree_map_with_path(take, batch_stats)
    problems += [f" + {name} (unused)" for name in sorted(set(loaded) - used)
                 if not (skip is not None and skip.search(name))]
    if problems:
        raise ConfigError(f"init_checkpoint {cfg.init_checkpoint!r} does not fit model {cfg.model!r} "
                          f"(init_skip={cfg.init_skip!r}):\n" + "\n".join(problems))
    return params, batch_stats


@dataclasses.dataclass
class Trainee:
    """What `create` builds: graph definitions (train / eval mode), optimizer, schedule, position bounds, the
    initial train state and its shardings, and the model's RNG streams (`Rest`)."""
    graphdef: object
    eval_graphdef: object
    tx: optax.GradientTransformation
    schedule: object
    bounds: dict
    state: dict
    state_sharding: dict
    rest: "Rest"


def create(cfg: configs.Config, mesh, total_steps: int, steps_per_epoch: int) -> Trainee:
    """Checks the model config on shapes (`nnx.eval_shape`), then builds the optimizer and the initial state
    (fresh, or from `init_checkpoint`) as global arrays: parameters replicated, optimizer moments replicated
    or sharded (`shard_opt_state`)."""
    replicated = NamedSharding(mesh, P())
    try:
        abstract = nnx.eval_shape(lambda: build_model(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg.model!r} with overrides {cfg.model_kwargs}: {e}") from None
    abstract.train()
    graphdef, abs_params, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    abstract.eval()
    eval_graphdef = nnx.graphdef(abstract)
    bounds = dcls_jax.position_bounds(abstract) if cfg.clamp_positions else {}
    schedule = lr_schedule(cfg, total_steps, steps_per_epoch)
    tx = make_optimizer(cfg, schedule, param_groups(abs_params, cfg))

    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sharding = (opt_state_sharding(abs_opt, mesh) if cfg.shard_opt_state
                    else jax.tree.map(lambda _: replicated, abs_opt))
    state_sharding = {"step": replicated, "params": replicated, "batch_stats": replicated, "opt_state": opt_sharding}
    if cfg.ema_decay > 0:
        state_sharding["ema"] = {"params": replicated, "batch_stats": replicated}

    def init_state(params, batch_stats):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
                 "opt_state": tx.init(params)}
        if cfg.ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
        return state

    # Built eagerly on each host (the same values everywhere), then placed as global replicated arrays.
    _, params, batch_stats, rest = nnx.split(build_model(cfg), nnx.Param, nnx.BatchStat, ...)
    if cfg.init_checkpoint:
        params, batch_stats = load_init_checkpoint(cfg, params, batch_stats)
    params, batch_stats, rest = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        replicated, np.asarray(x)), (params, batch_stats, Rest.pack(rest)))
    state = jax.jit(init_state, out_shardings=state_sharding)(params, batch_stats)
    return Trainee(graphdef, eval_graphdef, tx, schedule, bounds, state, state_sharding, rest)


# ------------------------------------------------------------------------------------------------------------
# ClickMe input (data="clickme") and the export of a trained model for evaluate.py


def clickme_pipeline(cfg: configs.Config, split: str, training: bool, batch: int, process_index: int,
                     process_count: int):
    """The ClickMe split as data.clickme.TrainPipeline batches (image, heatmap, label). The tfds build
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
    transform = clickme.TrainTransform(train=training, image_size=cfg.image_size,
                                       hflip=cfg.hflip if training else 0.0)
    try:
        return clickme.TrainPipeline(source, transform, batch, seed=cfg.seed, process_index=process_index,
                                     process_count=process_count, workers=cfg.data_workers, prefetch=cfg.prefetch)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _list_tuples(value):
    if isinstance(value, list):
        return tuple(_list_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _list_tuples(v) for k, v in value.items()}
    return value


def export_model(cfg: configs.Config, state, directory: str):
    """Writes the model of a train state (its EMA when the run keeps one and eval_ema is set) with
    models.convert.save: `evaluate.py --model NAME --checkpoint DIRECTORY` scores it, models.convert.restore
    reads it. An earlier export in `directory` is replaced. Runs on one process."""
    from models import convert
    weights = state["ema"] if "ema" in state and cfg.eval_ema else state
    flat = {}
    for part in (weights["params"], weights["batch_stats"]):
        for path, x in jax.tree_util.tree_flatten_with_path(part)[0]:
            names = _names(path)
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
    cfg = configs.Config(**{k: _list_tuples(v) for k, v in meta["config"].items() if k in known})
    return export_model(cfg, state, directory)


# ------------------------------------------------------------------------------------------------------------
# Logging


class Progress:
    """Progress bar on a terminal (process 0), and a metrics line every `log_every` steps (also as JSON lines in
    workdir/metrics.jsonl)."""

    def __init__(self, cfg: configs.Config, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        self.bar = self.active and cfg.progress and sys.stderr.isatty()
        self.total, self.every = total_steps, max(cfg.log_every, 1)
        self.batch = cfg.batch_size
        self.t0, self.s0 = time.time(), start_step
        self.file = (open(os.path.join(cfg.workdir, "metrics.jsonl"), "a")
                     if self.active and cfg.workdir else None)

    def write(self, record: dict):
        if not self.active:
            return
        if self.bar:
            sys.stderr.write("\r\033[K")
        print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
              flush=True)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, step: int, epoch: float, metrics):
        if self.bar:
            done = int(30 * step / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total}")
            sys.stderr.flush()
        if step % self.every == 0 or step == self.total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            ips = (step - self.s0) * self.batch / max(now - self.t0, 1e-9)
            self.t0, self.s0 = now, step
            self.write({"step": step, "epoch": round(epoch, 3), **m, "images_per_s": ips})

    def close(self):
        if self.bar:
            sys.stderr.write("\n")
        if self.file:
            self.file.close()


# ------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--workdir", help="same as --set workdir=...")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for jax.distributed.initialize")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args(argv)
    cfg = configs.load(args.config)
    cfg = configs.override(cfg, args.set + ([f"workdir={args.workdir}"] if args.workdir else []))
    return args, cfg


def init_distributed(args) -> None:
    env = os.environ
    cluster = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if args.coordinator or cluster:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator needs --num_processes and --process_id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif cluster:
        jax.distributed.initialize()


def main(argv=None):
    """Runs training; returns the final train state (a dict of global arrays) and the last evaluation."""
    # ==================== configuration (before any device work) ====================
    args, cfg = parse_args(argv)
    check_config(cfg)
    init_distributed(args)
    mixup_group = check_devices(cfg, jax.device_count(), jax.process_count())

    # ==================== mesh ====================
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    pidx, pcount = jax.process_index(), jax.process_count()

    # ==================== input ====================
    def pipeline(split, training, batch):
        if cfg.data == "clickme":
            return clickme_pipeline(cfg, split, training, batch, pidx, pcount)
        transform = imagenet.Transform(
            train=training, image_size=cfg.image_size, crop_pct=cfg.eval_crop_pct, interpolation=cfg.interpolation,
            scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio), hflip=cfg.hflip, rand_augment=cfg.rand_augment,
            erase_prob=cfg.random_erasing, mean=models.get_entry(cfg.model).mean)
        try:
            pipe = imagenet.Pipeline((cfg.data, cfg.data_dir, split, cfg.tfds_name), transform, batch,
                                     seed=cfg.seed, process_index=pidx, process_count=pcount,
                                     workers=cfg.data_workers, prefetch=cfg.prefetch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if pipe.num_classes != cfg.num_classes:
            raise ConfigError(f"split {split!r} has {pipe.num_classes} classes but num_classes={cfg.num_classes}")
        return pipe

    train_data = pipeline(cfg.train_split, True, cfg.batch_size)
    val_data = pipeline(cfg.val_split, False, cfg.eval_batch_size or cfg.batch_size) if cfg.val_split else None
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
    manager = None
    if cfg.workdir:
        os.makedirs(cfg.workdir, exist_ok=True)
        manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(cfg.workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=True))
        if manager.latest_step() is not None:
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
            for key in ("seed", "batch_size", "data", "model"):
                if meta["config"][key] != getattr(cfg, key):
                    raise ConfigError(f"cannot resume {cfg.workdir}: its run has {key}={meta['config'][key]!r}, "
                                      f"this config {key}={getattr(cfg, key)!r}")
            state = restored["state"]

    def save(step):
        if manager is not None:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "config": dataclasses.asdict(cfg)}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))

    # ==================== update and evaluation steps ====================
    train_step = make_train_step(cfg, t.graphdef, t.tx, t.schedule, t.bounds, steps_per_epoch, t.state_sharding)
    eval_step = make_eval_step(cfg, t.eval_graphdef)

    def evaluate(step):
        variants = {"": state}
        if "ema" in state and cfg.eval_ema:
            variants["ema_"] = state["ema"]
        totals = {prefix: np.zeros(3) for prefix in variants}
        for batch in val_data.iterate():
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
    if val_data is not None and cfg.eval_at_start and step == 0:
        last_eval = evaluate(0)
    stop = min(total_steps, cfg.stop_at_step) if cfg.stop_at_step else total_steps
    batches = train_data.iterate(step, stop - step)
    for batch in batches:
        batch = train_batch(batch, step)
        with jax.transfer_guard("disallow"):   # every host <-> device copy in the loop is explicit
            state, metrics = train_step(state, rest, batch)
        step += 1
        progress.step(step, step / steps_per_epoch, metrics)
        if val_data is not None and ((eval_every and step % eval_every == 0) or step == total_steps):
            last_eval = evaluate(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != stop:
            save(step)
    if manager is not None:
        if manager.latest_step() != step:
            save(step)
        manager.wait_until_finished()
        manager.close()
    if cfg.export_dir and pcount == 1:
        export_model(cfg, state, cfg.export_dir)
    elif cfg.export_dir and pidx == 0:
        print(f"export_dir: with several processes, export afterwards in one process: python -c \"import train; "
              f"train.export_workdir({cfg.workdir!r}, {cfg.export_dir!r})\"", flush=True)
    progress.close()
    return state, last_eval


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
