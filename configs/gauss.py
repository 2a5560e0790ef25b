"""ConvNeXt-dcls with Gaussian interpolation (arXiv 2306.00817) on ImageNet-1k: `convnext_tiny_dcls_gauss`
(every depthwise conv a Dcls2d "gauss", 23 x 23 with 26 taps, P and SIG shared per stage), trained with the
ConvNeXt-dcls recipe except that P and SIG are both in the position group (no weight decay, 5x the learning rate)
and P is not clamped.

    python train.py --config configs/gauss.py --set data_dir=$TFDS_DIR --workdir /ckpt/gauss
    python train.py --config configs/gauss.py:runlocal --set data_dir=/small/imagefolder   # smoke test

Argument: tiny (default) or runlocal. Published checkpoint of the same model: zenodo record 8029747
(`python evaluate.py --model convnext_tiny_dcls_gauss` downloads and converts it). Expected numbers: those of
arXiv 2306.00817 for ConvNeXt-T-dcls gauss (not reproduced here).
"""
from configs import Config
from configs.convnext_dcls import get_config as _dcls

MODEL = "convnext_tiny_dcls_gauss"


def get_config(arg: str = "tiny") -> Config:
    if arg not in ("tiny", "runlocal"):
        raise ValueError(f"unknown argument {arg!r}; expected tiny or runlocal (only the tiny Gaussian "
                         "ConvNeXt-dcls is registered)")
    cfg = _dcls(arg)
    cfg.model = MODEL
    cfg.clamp_positions = False   # P and SIG are always in the position group (no decay, lr x 5)
    return cfg
