"""ResNet-50 (He et al. 2016) as timm 1.0.31 defines `resnet50`, and its DCLS variant.

Attribute names follow timm's state-dict paths (`conv1`, `bn1`, `layer3.2.conv2`, `layer2.0.downsample.0`, `fc`),
so a timm state dict maps one to one onto `nnx.state(model)`. The 3x3 convolution of every bottleneck (`conv2`)
is `Config.conv` (a `models.layers.ConvSpec`): `resnet50` a Conv2d, `resnet50_dcls` a `dcls_jax.Dcls2d` (5 elements
in a 7x7 dilated kernel, version "v0") whose positions are shared within each stage. Both published checkpoints
(timm's resnet50.a1_in1k and the DCLS one) use timm's names, so no key remapping is needed.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (BatchNorm2d, Conv2d, ConvSpec, CutModel, DropPath, Dropout, Linear, Sequential,
                           check_stages, global_avg_pool, kaiming_normal_fan_out, share_positions)
from models.entry import TEST_CLASSES, Checkpoint, Entry, build, infer_kernel_count, register, register_test

EXPANSION = 4     # bottleneck output channels / width
STEM_WIDTH = 64   # timm's single-conv stem is always 64 wide


DENSE = ConvSpec.dense(3)                          # `resnet50`: timm's 3x3 conv2
DCLS = ConvSpec.dcls(5, 7, "v0")                   # `resnet50_dcls`: 5 taps in a 7x7 kernel, weight N(0, .02)


@dataclasses.dataclass(frozen=True)
class Config:
    layers: tuple[int, ...] = (3, 4, 6, 3)       # bottlenecks per stage
    channels: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x wider
    num_classes: int = 1000
    drop_rate: float = 0.0                         # dropout before the classifier
    drop_path_rate: float = 0.0                    # stochastic depth, linear in the block index from 0 to this
    zero_init_last: bool = True                    # zero-init each bottleneck's last BatchNorm weight
    conv: ConvSpec = DENSE                         # each bottleneck's conv2 (models.layers.ConvSpec)

    @classmethod
    def resnet50(cls, **kw):
        return cls(**kw)


def max_pool_3x3_s2(x):
    """torch MaxPool2d(3, stride=2, padding=1) on NHWC (padding never wins the max)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class Bottleneck(nnx.Module):
    """1x1 conv -> BN -> ReLU -> conv2 (3x3, stride) -> BN -> ReLU -> 1x1 conv -> BN -> drop_path, plus the
    (projected) shortcut, -> ReLU."""

    def __init__(self, in_channels: int, width: int, stride: int, conv: Callable[..., nnx.Module], cfg: Config,
                 drop_path: float, *, rngs: nnx.Rngs):
        out_channels = width * EXPANSION
        self.conv1 = Conv2d(in_channels, width, 1, bias=False, rngs=rngs, weight_init=kaiming_normal_fan_out)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv(width, width, stride=stride, bias=False, rngs=rngs, weight_init=kaiming_normal_fan_out)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = Conv2d(width, out_channels, 1, bias=False, rngs=rngs, weight_init=kaiming_normal_fan_out)
        self.bn3 = BatchNorm2d(out_channels, zero_init=cfg.zero_init_last)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        if stride != 1 or in_channels != out_channels:
            self.downsample = Sequential([
                Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, rngs=rngs,
                       weight_init=kaiming_normal_fan_out),
                BatchNorm2d(out_channels)])
        else:
            self.downsample = None

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.drop_path(self.bn3(self.conv3(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class ResNet(CutModel):
    """ResNet on NHWC inputs (the surface: `models.layers.CutModel`); `cfg.conv` builds each bottleneck's conv2.
    Cut points: "stem" (after the max pool) and each layer. CAM target: layer4's output after its last ReLU
    (2048 channels, 7x7 at 224)."""

    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4")
    target_layer = "layer4"

    def __init__(self, cfg: Config = Config(), *, rngs: nnx.Rngs):
        check_stages("ResNet", cfg, ("layers", "channels"))
        self.config = cfg
        self.conv1 = Conv2d(3, STEM_WIDTH, 7, stride=2, padding=3, bias=False, rngs=rngs,
                            weight_init=kaiming_normal_fan_out)
        self.bn1 = BatchNorm2d(STEM_WIDTH)
        total, index = sum(cfg.layers), 0
        in_channels = STEM_WIDTH
        for i, (depth, width) in enumerate(zip(cfg.layers, cfg.channels)):
            stage_conv = share_positions(cfg.conv)
            blocks = []
            for j in range(depth):
                rate = cfg.drop_path_rate * index / max(total - 1, 1)
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(in_channels, width, stride, stage_conv, cfg, rate, rngs=rngs))
                in_channels, index = width * EXPANSION, index + 1
            setattr(self, f"layer{i + 1}", Sequential(blocks))
        self.drop = Dropout(cfg.drop_rate, rngs=rngs)
        self.fc = Linear(in_channels, cfg.num_classes, rngs=rngs)

    def stem(self, x):
        return max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))

    def _parts(self):
        return (self.stem, self.layer1, self.layer2, self.layer3, self.layer4)

    def head(self, x, pre_logits: bool = False):
        x = self.drop(global_avg_pool(x))
        return x if pre_logits else self.fc(x)


# ---------------------------------------------------------------------------------------------------------------
# Registry entries

_build = functools.partial(build, model_cls=ResNet)  # (preset, *, rngs, **overrides) -> ResNet


register(Entry(
    name="resnet50", builder=functools.partial(_build, Config.resnet50()), family="resnet",
    target_layer=ResNet.target_layer, resize_size=235, input_size=224,
    checkpoint=Checkpoint(url="https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
                          key=None, filename="resnet50.a1_in1k.safetensors")))
register(Entry(
    name="resnet50_dcls", builder=functools.partial(_build, Config.resnet50(conv=DCLS)), family="resnet",
    target_layer=ResNet.target_layer, resize_size=235, input_size=224,
    checkpoint=Checkpoint(url="https://zenodo.org/record/8373830/files/resnet_dcls_kernel_5_model_best.pth.tar",
                          key="state_dict_ema", filename="resnet_dcls_kernel_5_model_best.pth.tar"),
    infer_overrides=infer_kernel_count("layer1.0.conv2.weight")))

# Tiny variants for tests (models.entry.register_test): one bottleneck per stage, 8..64 wide (32..256 out).
_TEST = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=TEST_CLASSES)
for _name, _conv in (("test_resnet", DENSE), ("test_resnet_dcls", DCLS)):
    register_test(_name, functools.partial(_build, Config(**{**_TEST, "conv": _conv})), "resnet", ResNet.target_layer,
                  infer_overrides=infer_kernel_count("layer1.0.conv2.weight") if _conv.is_dcls else None)
