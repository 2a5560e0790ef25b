"""ConvNeXt-dcls with Gaussian interpolation (arXiv 2306.00817): the ConvNeXt-dcls recipe, with the positions P
and the standard deviations SIG both in the position group (no weight decay, 5x the learning rate) and no clamp.

    python train.py --config configs/gauss.py --set model=<a gauss DCLS model> --set data_dir=$TFDS_DIR \
        --workdir /ckpt/gauss

The registry's published DCLS models use v0/v1 kernels; this recipe is for models whose DCLS layers are
version "gauss" (23 / 26, P and SIG shared per stage). Expected numbers: those of arXiv 2306.00817 for
the same model (not reproduced here).
"""
from configs import Config
from configs.convnext_dcls import get_config as _dcls


def get_config(arg: str = "tiny") -> Config:
    cfg = _dcls(arg)
    cfg.clamp_positions = False   # P and SIG are always in the position group (no decay, lr x 5)
    return cfg
