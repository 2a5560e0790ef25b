"""DCLS (Dilated Convolution with Learnable Spacings) for Flax NNX, identical to PyTorch dcls 0.1.1."""
from dcls_jax.attention import attention
from dcls_jax.conv import conv
from dcls_jax.dense import linear
from dcls_jax.kernel import VERSIONS, construct_kernel
from dcls_jax.layers import Dcls1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d, normal_positions, uniform_positions
from dcls_jax.norm import layer_norm
from dcls_jax.options import compiler_options
from dcls_jax.optim import clamp_positions, clamp_positions_transform, position_bounds, position_labels
from dcls_jax.surgery import ConvInfo, depthwise, replace_convs, to_dense, to_dense_conv

__all__ = ["ConvInfo", "Dcls1d", "Dcls2d", "Dcls2dK1d", "Dcls3_1d", "Dcls3d", "VERSIONS", "attention",
           "clamp_positions", "clamp_positions_transform", "compiler_options", "construct_kernel", "conv",
           "depthwise", "layer_norm", "linear", "normal_positions", "position_bounds", "position_labels",
           "replace_convs", "to_dense", "to_dense_conv", "uniform_positions"]
