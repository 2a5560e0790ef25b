"""Training configs: one `Config` dataclass, one Python file per recipe, command-line overrides.

A recipe file defines `get_config(arg: str | None = None) -> Config` (`--config configs/x.py:arg` passes `arg`,
e.g. "runlocal"). Overrides are `--set key=value`, parsed by the field's type: `--set batch_size=256
--set lr=2e-3 --set rand_augment=none --set model_kwargs="{'depths': (1, 1, 1, 1)}"`. Unknown keys and values
that do not parse fail with a message naming the key.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
import types
import typing


@dataclasses.dataclass
class Config:
    # --- model
    model: str = "convnext_tiny_dcls"
    model_kwargs: dict = dataclasses.field(default_factory=dict)   # builder overrides (tiny test models)
    drop_path: float | None = 0.1          # stochastic depth rate (None: the builder's default)
    init_checkpoint: str | None = None     # fine-tune from a PyTorch .pth/.safetensors or an orbax model dir
    init_checkpoint_key: str | None = None  # container key in a PyTorch checkpoint ("model", "state_dict_ema")
    init_skip: str | None = None           # regex of parameter names kept at their fresh init (a new head)
    # --- data
    data: str = "tfds"                     # "tfds" (array_record imagenet2012), "imagefolder", "synthetic" or "clickme"
    data_dir: str = ""                     # tfds data_dir, or the ImageFolder root holding the split folders
    tfds_name: str = "imagenet2012"
    train_split: str = "train"
    val_split: str | None = "validation"   # None: no evaluation
    num_classes: int = 1000
    image_size: int = 224
    eval_crop_pct: float = 0.875
    interpolation: str = "bicubic"
    data_workers: int = 8                  # grain workers per host: processes for ImageNet, else threads (0: one)
    prefetch: int = 2                      # batches prepared ahead
    # --- augmentation and regularisation
    rrc_scale: tuple = (0.08, 1.0)
    rrc_ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    mixup: float = 0.8                     # mixup alpha (0: off)
    cutmix: float = 1.0                    # cutmix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_group: int = 0                   # images mixed among themselves (0: each device's share of the batch)
    label_smoothing: float = 0.1
    # --- optimisation
    batch_size: int = 4096                 # global, over all devices of all hosts
    epochs: float = 300
    total_steps: int = 0                   # > 0: overrides epochs
    optimizer: str = "adamw"               # "adamw" or "lamb"
    lr: float = 4e-3                       # at batch lr_base_batch; scaled linearly with batch_size
    lr_base_batch: int = 4096              # 0: no scaling
    min_lr: float = 1e-6
    warmup_epochs: float = 20
    warmup_steps: int = -1                 # >= 0: overrides warmup_epochs
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    no_decay_1d: bool = True               # no weight decay on 1-d parameters (norms, layer scales) and biases
    grad_clip: float = 0.0                 # global-norm clip (0: off)
    position_lr_mult: float = 5.0          # DCLS P and SIG: no weight decay, lr x this
    clamp_positions: bool = True           # clamp P to +-dilated_kernel_size//2 after every step
    repulsive_loss: bool = False           # add (repulsive position loss)^2 ...
    repulsive_after_epoch: int = 20        # ... from the epoch after this one on
    ema_decay: float = 0.9999              # 0: no EMA
    compute_dtype: str = "float32"         # "float32" or "bfloat16" (parameters stay float32)
    shard_opt_state: bool = False          # shard optimizer moments over the devices (ZeRO-1)
    # --- run
    seed: int = 0
    workdir: str = ""                      # checkpoints and logs; resumes from its latest checkpoint
    checkpoint_every: int = 1000           # steps (0: only at the end)
    keep_checkpoints: int = 3
    stop_at_step: int = 0                  # > 0: checkpoint and stop there (as if preempted)
    eval_every: int = -1                   # steps (-1: every epoch, 0: only at the end)
    eval_at_start: bool = False            # also evaluate the initial model (step 0)
    eval_batch_size: int = 0               # 0: batch_size
    eval_ema: bool = True
    log_every: int = 50
    progress: bool = True                  # progress bar on process 0
    tensorboard: bool = True               # also write the metrics as TensorBoard events (workdir/tensorboard)
    synthetic_size: int = 256              # data="synthetic": images per split (generated, no dataset needed)
    export_dir: str = ""                   # write the final model there (models.convert.save: evaluate.py --checkpoint)
    # --- harmonization (cam/harmonization.py, configs/harmonize.py)
    objective: str = "ce"                  # "ce", or "harmonization": + lambda * alignment with the ClickMe maps
    harmonization_lambda: float = 1.0      # weight of the pyramidal alignment term (the reference's 1.0)
    harmonization_weight_l2: float = 0.0   # weight of the reference's L2 term sum(w^2)/2 (1e-5 there)
    harmonization_map: str = "input_gradient"  # the model side: the reference's input gradient, or a cam method
    harmonization_layer: str | None = None  # CAM layer of a cam method (None: the model's study target layer)
    harmonization_levels: int = 5          # pyramid levels
    clickme_dir: str | None = None         # data="clickme": directory of the TFRecord shards (else downloaded)
    clickme_url: str | None = None         # data="clickme": download the shards from this mirror
    clickme_num_shards: dict = dataclasses.field(default_factory=dict)   # {split: n}: shards 0..n-1 only


def _coerce(value: str, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and value.strip().lower() in ("none", "null", ""):
            return None
        for arg in args:
            if arg is not type(None):
                return _coerce(value, arg, key)
    if hint is bool:
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {key!r} expects a bool (true/false), got {value!r}")
    if hint in (int, float, str):
        try:
            return hint(value) if hint is not int else int(value, 0)
        except ValueError:
            raise ValueError(f"config key {key!r} expects {hint.__name__}, got {value!r}") from None
    expected = origin or hint
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"config key {key!r} expects a Python {expected.__name__} literal, got {value!r}") from None
    if expected is tuple and isinstance(parsed, list):
        parsed = tuple(parsed)
    if not isinstance(parsed, expected):
        raise ValueError(f"config key {key!r} expects {expected.__name__}, got {value!r}")
    return parsed


def override(cfg: Config, assignments: list[str]) -> Config:
    """Applies "key=value" strings; unknown keys and unparsable values raise ValueError."""
    hints = typing.get_type_hints(Config)
    changes = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=3)
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        changes[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(cfg, **changes)


def load(spec: str) -> Config:
    """Loads `path/to/config.py[:arg]` and returns its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    if not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a .py file")
    module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:   # a config file is Python: any error in it (syntax, import, its own checks) is a config error
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} has no get_config()")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        what = str(e) if isinstance(e, ValueError) else f"get_config raised {type(e).__name__}: {e}"
        raise ValueError(f"config {spec!r}: {what}") from e
    if not isinstance(cfg, Config):
        raise ValueError(f"get_config() of {path!r} must return configs.Config, got {type(cfg).__name__}")
    return cfg


def describe() -> str:
    """Every config key with its type, default and the comment beside it in `Config` (for train.py --help)."""
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m:
            comments[m.group(1)] = m.group(2) or ""
    hints = typing.get_type_hints(Config)
    lines = []
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        hint = hints[f.name]
        kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        head = f"  {f.name} ({kind}) = {default!r}"
        lines.append(f"{head:<52} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)
