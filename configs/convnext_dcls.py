"""ConvNeXt-dcls on ImageNet-1k from scratch: the ICLR 2023 recipe (Khalfaoui-Hassani et al.).

300 epochs, AdamW (eps 1e-8), lr 4e-3 at global batch 4096 (linear in the batch), weight decay 0.05 (none on
1-d parameters, biases and the positions P), 20 warmup epochs then cosine to 1e-6, drop path 0.1 / 0.4 / 0.5
(T / S / B), EMA 0.9999, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25, label
smoothing 0.1; P gets 5x the learning rate and is clamped to +-8 after every step.

    python train.py --config configs/convnext_dcls.py --set data_dir=$TFDS_DIR --workdir /ckpt/cnx_t_dcls
    python train.py --config configs/convnext_dcls.py:small --set data=imagefolder --set data_dir=/imagenet ...
    python train.py --config configs/convnext_dcls.py:runlocal --set data_dir=/small/imagefolder   # smoke test

Expected ImageNet-1k top-1 (224, EMA, as published): tiny 82.5 (ConvNeXt-T 82.1), small 83.7 (83.1),
base 84.1 (83.8). Argument: tiny (default), small, base, with "_plain" for the non-DCLS baseline
(e.g. "tiny_plain"), and "runlocal" (a tiny model at 32 x 32, batch 16, 2 epochs of a small 10-class ImageFolder
with train/ and val/ splits: a smoke test).
"""
from configs import Config

DROP_PATH = {"tiny": 0.1, "small": 0.4, "base": 0.5}


def get_config(arg: str = "tiny") -> Config:
    if arg == "runlocal":
        return Config(model="convnext_tiny_dcls",
                      model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
                      num_classes=10, image_size=32, batch_size=16, epochs=2, warmup_epochs=1, lr_base_batch=0,
                      data="imagefolder", val_split="val", data_workers=0, ema_decay=0.99,
                      checkpoint_every=0, log_every=1)
    size, _, plain = arg.partition("_")
    if size not in DROP_PATH or plain not in ("", "plain"):
        raise ValueError(f"unknown argument {arg!r}; expected tiny, small, base (optionally _plain) or runlocal")
    return Config(model=f"convnext_{size}" + ("" if plain else "_dcls"), drop_path=DROP_PATH[size])
