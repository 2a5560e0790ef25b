"""Fine-tune a converted PyTorch checkpoint (e.g. the published ConvNeXt-dcls weights) on a new ImageFolder.

Loads `init_checkpoint` through models.convert (PyTorch .pth/.safetensors, or an orbax model directory),
keeps the parameters matching `init_skip` (the classifier) at their fresh init for the new `num_classes`,
and trains for 30 epochs with a short warmup, lower lr and lighter augmentation.

    python train.py --config configs/finetune.py --set model=convnext_tiny_dcls \
        --set init_checkpoint=convnext_dcls_tiny_1k_224_ema.pth --set init_checkpoint_key=model \
        --set data_dir=/data/flowers --set num_classes=102 --workdir /ckpt/ft

Expected: dataset dependent (a sanity check on a subset of ImageNet itself with num_classes=1000 and no skip
should start near the published top-1: 82.5 for convnext_tiny_dcls).
"""
from configs import Config


def get_config(arg: str | None = None) -> Config:
    return Config(
        data="imagefolder", val_split="val", init_skip=r"^head\.fc\.",
        batch_size=512, lr=1e-4, lr_base_batch=512, epochs=30, warmup_epochs=2, min_lr=1e-6,
        weight_decay=0.05, drop_path=0.1, mixup=0.0, cutmix=0.0, random_erasing=0.0, ema_decay=0.0,
        checkpoint_every=500)
