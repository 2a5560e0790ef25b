"""Smoke test: a tiny ConvNeXt-dcls trained for a few steps on generated images: no dataset, no download.

    python train.py --config configs/smoke.py                          # a few steps on CPU
    python train.py --config configs/smoke.py --workdir /tmp/smoke     # with checkpoints, metrics.jsonl, TensorBoard
    python train.py --config configs/smoke.py --set total_steps=50 --set model=resnet50_dcls \
        --set model_kwargs="{'layers': (1, 1, 1, 1), 'channels': (8, 16, 32, 64)}"

The images (data="synthetic") are a per-class colour plus noise, deterministic in (seed, index), so the
loss falls within a few steps; every other part (optimizer groups, EMA, clamp, evaluation, checkpoints,
resume) is the real code path. Expected: the training loss below its first value after 8 steps; validation
top-1 near 1 after ~30 steps. Not a measure of anything but that the machinery runs.
"""
from configs import Config


def get_config(arg: str | None = None) -> Config:
    return Config(model="convnext_tiny_dcls",
                  model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_count": 3,
                                "dilated_kernel_size": 3},
                  data="synthetic", synthetic_size=64, val_split="validation", num_classes=4, image_size=32,
                  batch_size=8, total_steps=8, lr=0.01, lr_base_batch=0, warmup_steps=0, drop_path=0.0,
                  rand_augment=None, mixup=0.0, cutmix=0.0, random_erasing=0.0, label_smoothing=0.0,
                  ema_decay=0.9, eval_every=0, checkpoint_every=4, log_every=1, data_workers=0)
