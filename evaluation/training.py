"""Training as a library: the configuration checks, the optimizer and its schedule, the jitted train and eval
steps and the train state of a registry model (`create`). train.py is the command line around them (data
loading, checkpoints, logging); benchmarks/bench_train.py times `make_train_step` without the script.

    t = training.create(cfg, mesh, total_steps, steps_per_epoch)     # a Trainee: state, graphdef, tx, schedule
    step = training.make_train_step(cfg, t.graphdef, t.tx, t.schedule, steps_per_epoch, t.state_sharding)
    state, metrics = step(t.state, t.rest, batch)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import configs
import dcls_jax
import models
from cam import harmonization
from data import augment
from dcls_jax.optim import path_names
from dcls_jax.options import compiler_options


OPTIMIZERS = ("adamw", "lamb")
OBJECTIVES = ("ce", "harmonization")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A problem found before any computation; the command line prints it and exits with status 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the command line prints it and exits with status 1."""


# Ranges of the numeric config keys: (low, high, low inclusive, high inclusive); None: unbounded.
RANGES = {
    "num_classes": (1, None, True, None), "image_size": (1, 4096, True, True), "seed": (0, 2**31 - 1, True, True),
    "eval_crop_pct": (0, 1, False, True), "data_workers": (0, None, True, None), "prefetch": (0, None, True, None),
    "hflip": (0, 1, True, True), "random_erasing": (0, 1, True, True), "mixup_prob": (0, 1, True, True),
    "mixup_switch_prob": (0, 1, True, True), "mixup_group": (0, None, True, None),
    "total_steps": (0, None, True, None), "epochs": (0, None, True, None),
    "warmup_epochs": (0, None, True, None), "b1": (0, 1, True, False), "b2": (0, 1, True, False),
    "eps": (0, None, False, None), "weight_decay": (0, None, True, None), "grad_clip": (0, None, True, None),
    "position_lr_mult": (0, None, True, None), "ema_decay": (0, 1, True, False),
    "checkpoint_every": (0, None, True, None), "keep_checkpoints": (1, None, True, None),
    "stop_at_step": (0, None, True, None), "eval_batch_size": (0, None, True, None),
    "log_every": (1, None, True, None), "synthetic_size": (1, None, True, None),
}


def _range_problems(cfg: configs.Config) -> list[str]:
    """Every float key finite (`--set lr=nan` is refused before any step), and the ranges of RANGES."""
    problems = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{f.name} must be a finite number, got {v}")
        elif f.name in RANGES and isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi, lo_in, hi_in = RANGES[f.name]
            if ((lo is not None and (v < lo if lo_in else v <= lo))
                    or (hi is not None and (v > hi if hi_in else v >= hi))):
                interval = (("[" if lo_in else "(") + f"{lo}, " + (f"{hi}" + ("]" if hi_in else ")")
                                                                  if hi is not None else "inf)"))
                problems.append(f"{f.name} must be in {interval}, got {v}")
    for name in ("rrc_scale", "rrc_ratio"):
        v = getattr(cfg, name)
        if (len(v) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v)
                or v[0] > v[1]):
            problems.append(f"{name} must be two positive numbers (low, high) with low <= high, got {v!r}")
    return problems


def _check_writable(directory: str) -> str | None:
    """None if `directory` can be created and written (checked with a temporary file), else the reason."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return f"{e.strerror or e}"
    return None


# ------------------------------------------------------------------------------------------------------------
# Configuration checks


def check_config(cfg: configs.Config) -> None:
    """Checks that need no device: names, ranges, paths."""
    try:
        models.get_entry(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    problems = _range_problems(cfg)
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
    if cfg.data not in ("tfds", "imagefolder", "synthetic", "clickme"):
        problems.append(f"data {cfg.data!r} is not 'tfds', 'imagefolder', 'synthetic' or 'clickme'")
    elif cfg.data == "synthetic":
        if cfg.synthetic_size < cfg.batch_size:
            problems.append(f"synthetic_size {cfg.synthetic_size} is smaller than one batch ({cfg.batch_size})")
    elif cfg.data == "clickme":
        pass   # see check_harmonization (data_dir is created when the shards are prepared)
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
    if cfg.workdir and (reason := _check_writable(cfg.workdir)):
        problems.append(f"workdir {cfg.workdir!r} cannot be written ({reason})")
    if cfg.tensorboard and cfg.workdir:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            problems.append("tensorboard=true needs the tensorboardX package (pip install tensorboardX), "
                            "or set tensorboard=false")
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


def param_groups(params, cfg: configs.Config):
    """'position' (DCLS P/SIG: no weight decay, lr x position_lr_mult), 'no_decay' (1-d and biases), 'decay'."""
    positions = dcls_jax.position_labels(params, positions="position", default="default")

    def label(path, x, pos):
        if pos == "position":
            return "position"
        if cfg.no_decay_1d and (x.ndim <= 1 or path_names(path)[-1] == "bias"):
            return "no_decay"
        return "decay"

    return jax.tree_util.tree_map_with_path(label, params, positions)


def make_optimizer(cfg: configs.Config, schedule, groups, bounds=None) -> optax.GradientTransformation:
    """AdamW or LAMB per parameter group (param_groups), after an optional global-norm clip; with `bounds`
    (dcls_jax.position_bounds) the DCLS positions are clamped after each step (dcls_jax.clamp_positions_transform)."""
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
    if bounds:
        tx = optax.chain(tx, dcls_jax.clamp_positions_transform(bounds))
    return tx


def repulsive_loss(params):
    """ConvNeXt-dcls `get_dcls_loss_rep`: per P (nd, O, I, K), 2 * sum_{k<l} relu(1 - |p_k - p_l|) / (K(K-1)OI),
    averaged over the (unique) P parameters."""
    losses = []
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path_names(path)[-1] != "P":
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


def make_train_step(cfg: configs.Config, graphdef, tx, schedule, steps_per_epoch: int, state_sharding):
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
    return jax.jit(step_fn, out_shardings=(state_sharding, replicated), donate_argnums=0,
                   compiler_options=compiler_options())


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
        mask = batch["valid"]
        correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.stack([correct.sum(), jnp.where(mask, ce, 0).sum(), mask.sum()])

    return jax.jit(eval_fn, compiler_options=compiler_options())


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
    return {".".join(path_names(path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def load_init_checkpoint(cfg: configs.Config, params, batch_stats):
    """Parameters and batch statistics from `init_checkpoint` (via models.convert.load), merged strictly by
    models.statedict.merge_state_dict, except those whose name matches `init_skip`, which keep their fresh
    values. Every other name must exist with the same shape."""
    from models import convert, statedict
    source = convert.load(cfg.model, cfg.init_checkpoint, cfg.init_checkpoint_key, **cfg.model_kwargs)
    loaded = {**_flat(nnx.state(source, nnx.Param)), **_flat(nnx.state(source, nnx.BatchStat))}
    skip = re.compile(cfg.init_skip).search if cfg.init_skip else None
    try:
        model = statedict.merge_state_dict(nnx.eval_shape(lambda: build_model(cfg)), loaded, lambda: build_model(cfg),
                                           what=f"model {cfg.model!r} (init_skip={cfg.init_skip!r})", skip=skip)
    except ValueError as e:
        raise ConfigError(f"init_checkpoint {cfg.init_checkpoint!r} does not fit: {e}") from None
    fresh = {**_flat(params), **_flat(batch_stats)}
    merged = {**_flat(nnx.state(model, nnx.Param)), **_flat(nnx.state(model, nnx.BatchStat))}

    def take(path, x):   # the merged value, in the structure (and dtype) of the fresh state
        name = ".".join(path_names(path))
        return np.asarray(x) if skip is not None and skip(name) else np.asarray(merged[name], fresh[name].dtype)

    return jax.tree_util.tree_map_with_path(take, params), jax.tree_util.tree_map_with_path(take, batch_stats)


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
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abs_params))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if memory and 4 * param_bytes > memory:   # parameters, 2 Adam moments, EMA: refused before allocating
        raise ConfigError(f"model {cfg.model!r} with overrides {cfg.model_kwargs} has {param_bytes / 2**30:.1f} GiB "
                          f"of parameters; with its optimizer state that exceeds this host's "
                          f"{memory / 2**30:.0f} GiB of memory")
    abstract.eval()
    eval_graphdef = nnx.graphdef(abstract)
    bounds = dcls_jax.position_bounds(abstract) if cfg.clamp_positions else {}
    schedule = lr_schedule(cfg, total_steps, steps_per_epoch)
    tx = make_optimizer(cfg, schedule, param_groups(abs_params, cfg), bounds)

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
