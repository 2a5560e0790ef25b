"""ResNet-50 (He et al. 2016) as timm 1.0.31 defines `resnet50`, and its DCLS variant.

Attribute names follow timm's state-dict paths (`conv1`, `bn1`, `layer3.2.conv2`, `layer2.0.downsample.0`, `fc`),
so a timm state dict maps one to one onto `nnx.state(model)`. The 3x3 convolution of every bottleneck (`conv2`)
is an injected factory: `resnet50` uses a Conv2d, `resnet50_dcls` a `dcls_jax.Dcls2d` (5 elements in a 7x7
dilated kernel, version "v0") whose positions are shared within each stage. Both published checkpoints
(timm's resnet50.a1_in1k and the DCLS one) use timm's names, so no key remapping is needed.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dcls_jax import Dcls2d
from models.layers import (BatchNorm2d, Conv2d, CutModel, DropPath, Dropout, Linear, Sequential,
                           global_avg_pool, kaiming_normal_fan_out, share_positions)
from models.entry import Checkpoint, Entry, infer_kernel_count, override, register

EXPANSION = 4     # bottleneck output channels / width
STEM_WIDTH = 64   # timm's single-conv stem is always 64 wide


@dataclasses.dataclass(frozen=True)
class Config:
    layers: tuple[int, ...] = (3, 4, 6, 3)       # bottlenecks per stage
    channels: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x wider
    num_classes: int = 1000
    drop_rate: float = 0.0                         # dropout before the classifier
    drop_path_rate: float = 0.0                    # stochastic depth, linear in the block index from 0 to this
    zero_init_last: bool = True                    # zero-init each bottleneck's last BatchNorm weight
    kernel_count: int = 5                          # the DCLS conv2 (`resnet50_dcls`): elements per kernel
    dilated_kernel_size: int = 7                   # ... and the size of the dense kernel they are placed in

    @classmethod
    def resnet50(cls, **kw):
        return cls(**kw)


def dense_conv2(cfg: Config) -> Callable[..., nnx.Module]:
    """The plain bottleneck conv2 factory: 3x3 Conv2d without bias, kaiming_normal(fan_out) (timm's init)."""
    return functools.partial(Conv2d, kernel_size=3, padding=1, bias=False, weight_init=kaiming_normal_fan_out)


def dcls_conv2(cfg: Config) -> Callable[..., nnx.Module]:
    """The DCLS bottleneck conv2 factory: Dcls2d v0 without bias, weight N(0, .02) as the study's replacement
    function initialises it; positions keep Dcls2d's own init N(0, 0.5) clamped to +-d//2."""
    def build(in_channels, out_channels, *, stride, rngs, P=None):
        layer = Dcls2d(in_channels, out_channels, kernel_count=cfg.kernel_count, stride=stride,
                       padding=cfg.dilated_kernel_size // 2, dilated_kernel_size=cfg.dilated_kernel_size,
                       bias=False, version="v0", rngs=rngs, P=P)
        layer.weight.set_value(0.02 * jax.random.normal(rngs.params(), layer.weight.get_value().shape))
        return layer
    return build


def max_pool_3x3_s2(x):
    """torch MaxPool2d(3, stride=2, padding=1) on NHWC (padding never wins the max)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class Bottleneck(nnx.Module):
    """1x1 conv -> BN -> ReLU -> conv2 (3x3, stride) -> BN -> ReLU -> 1x1 conv -> BN -> drop_path, plus the
    (projected) shortcut, -> ReLU."""

    def __init__(self, in_channels: int, width: int, stride: int, conv2: Callable[..., nnx.Module], cfg: Config,
                 drop_path: float, *, rngs: nnx.Rngs):
        out_channels = width * EXPANSION
        self.conv1 = Conv2d(in_channels, width, 1, bias=False, rngs=rngs, weight_init=kaiming_normal_fan_out)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv2(width, width, stride=stride, rngs=rngs)
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
    """ResNet on NHWC inputs. `conv2(in, out, *, stride, rngs[, P]) -> module` builds each bottleneck's 3x3 conv.
    Cut points: "stem" (after the max pool) and each layer; the CAM target is layer4's output after its last
    ReLU (2048 channels, 7x7 at 224)."""

    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4")
    target_layer = "layer4"

    def __init__(self, cfg: Config = Config(), *, conv2: Callable[..., nnx.Module] | None = None,
                 rngs: nnx.Rngs):
        if len(cfg.layers) != 4 or len(cfg.channels) != 4:
            raise ValueError(f"ResNet needs 4 stages, got layers={cfg.layers} channels={cfg.channels}")
        conv2 = conv2 or dense_conv2(cfg)
        self.config = cfg
        self.conv1 = Conv2d(3, STEM_WIDTH, 7, stride=2, padding=3, bias=False, rngs=rngs,
                            weight_init=kaiming_normal_fan_out)
        self.bn1 = BatchNorm2d(STEM_WIDTH)
        total, index = sum(cfg.layers), 0
        in_channels = STEM_WIDTH
        for i, (depth, width) in enumerate(zip(cfg.layers, cfg.channels)):
            stage_conv2 = share_positions(conv2)
            blocks = []
            for j in range(depth):
                rate = cfg.drop_path_rate * index / max(total - 1, 1)
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(in_channels, width, stride, stage_conv2, cfg, rate, rngs=rngs))
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

def _build(preset: Config, conv2: Callable[[Config], Callable[..., nnx.Module]], *, rngs: nnx.Rngs,
           **overrides) -> ResNet:
    cfg = override(preset, overrides)
    return ResNet(cfg, conv2=conv2(cfg), rngs=rngs)


register(Entry(
    name="resnet50", builder=functools.partial(_build, Config.resnet50(), dense_conv2), family="resnet",
    target_layer=ResNet.target_layer, resize_size=235, input_size=224,
    checkpoint=Checkpoint(url="https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors",
                          key=None, filename="resnet50.a1_in1k.safetensors")))
register(Entry(
    name="resnet50_dcls", builder=functools.partial(_build, Config.resnet50(), dcls_conv2), family="resnet",
    target_layer=ResNet.target_layer, resize_size=235, input_size=224,
    checkpoint=Checkpoint(url="https://zenodo.org/record/8373830/files/resnet_dcls_kernel_5_model_best.pth.tar",
                          key="state_dict_ema", filename="resnet_dcls_kernel_5_model_best.pth.tar"),
    infer_overrides=infer_kernel_count("layer1.0.conv2.weight")))
