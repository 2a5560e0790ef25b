"""Harmonize a study model with human attention: fine-tune it on the ClickMe training split (318 shards) with the
harmonization objective of Fel et al. (NeurIPS 2022), cam/harmonization.py:

    loss = CE (label smoothing 0.1) + harmonization_lambda * pyramidal MSE(standardize_cut(model map),
           standardize_cut(human map)) + harmonization_weight_l2 * sum(w^2) / 2

with the reference's constants (lambda 1, L2 1e-5, 5 pyramid levels, its input-gradient map). Argument: any of
the 16 study models (default convnext_tiny_dcls), optionally ":<cam method>" to align that CAM instead of the
input gradient (e.g. "resnet50_dcls:gradcam", at the model's study target layer), or "runlocal".

From a published checkpoint to a harmonized model and its score (one host; add --coordinator ... on several):

    python -m models.convert --model resnet50_dcls --checkpoint https://zenodo.org/records/8373830/files/\
resnet_dcls_kernel_5_model_best.pth.tar --key state_dict_ema --out /ckpt/resnet50_dcls
    python train.py --config configs/harmonize.py:resnet50_dcls --set init_checkpoint=/ckpt/resnet50_dcls \
        --set data_dir=$TFDS_DIR --set clickme_dir=/data/clickme --workdir /ckpt/h_resnet50_dcls \
        --set export_dir=/ckpt/h_resnet50_dcls/model
    python evaluate.py --model resnet50_dcls --checkpoint /ckpt/h_resnet50_dcls/model --output h.json
    python evaluate.py --model resnet50_dcls --checkpoint /ckpt/h_resnet50_dcls/model --cam saliency

(init_checkpoint may also be the .pth itself, with init_checkpoint_key.) clickme_dir holds train-0..317 and
val-0..16 .tfrecords (or leave it unset to download them into data_dir); the tfds build "clickme/with_train" is
prepared once in data_dir. The run logs `ce` and `align` (the alignment term) every log_every steps, resumes
from workdir, and writes the model for evaluate.py to export_dir at the end (a multi-host run prints the
one-process export command instead). Inputs are Harmonization's 224 x 224 float images as they are (no crop,
no augmentation: every transform would have to move the human map too); evaluate.py then scores with the
study's transforms.

Recipe: the paper trains its harmonized models on TPUs with ImageNet and ClickMe mixed (tokens 0 for images
without maps); this config is a fine-tune on ClickMe alone:
AdamW lr 1e-5 at batch 256, 5 epochs, 1 warmup epoch, no weight decay beyond the reference's L2 term, no EMA.
Expected: not measured here (the paper reports ResNet50 ~33% -> 45% ClickMe alignment with its own recipe).
"""
from configs import Config

STUDY_MODELS = tuple(f"{base}{suffix}" for base in ("resnet50", "convnext_tiny", "convnext_small", "convnext_base",
                                                    "caformer_s18", "convformer_s18", "fastvit_sa24", "fastvit_sa36")
                     for suffix in ("", "_dcls"))


def get_config(arg: str = "convnext_tiny_dcls") -> Config:
    common = dict(data="clickme", objective="harmonization", train_split="train", val_split="validation",
                  num_classes=1000, image_size=224, rand_augment=None, mixup=0.0, cutmix=0.0, random_erasing=0.0,
                  hflip=0.0, label_smoothing=0.1, harmonization_lambda=1.0, harmonization_weight_l2=1e-5,
                  weight_decay=0.0, ema_decay=0.0, drop_path=None)
    if arg == "runlocal":   # a few steps of a tiny model on the bundled validation sample's size
        return Config(model="convnext_tiny_dcls", model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
                      image_size=32, batch_size=4, total_steps=4, lr=1e-4, lr_base_batch=0, warmup_steps=0,
                      val_split=None, data_workers=0, checkpoint_every=0, log_every=1,
                      **{k: v for k, v in common.items() if k not in ("image_size", "val_split")})
    model, _, method = arg.partition(":")
    if model not in STUDY_MODELS:
        raise ValueError(f"unknown argument {arg!r}; expected one of {', '.join(STUDY_MODELS)} (optionally "
                         f"':<cam method>'), or runlocal")
    return Config(model=model, harmonization_map=method or "input_gradient", batch_size=256, lr=1e-5,
                  lr_base_batch=256, min_lr=1e-7, epochs=5, warmup_epochs=1, checkpoint_every=1000, **common)
