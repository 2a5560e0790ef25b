"""DCLS (Dilated Convolution with Learnable Spacings) for Flax NNX, identical to PyTorch dcls 0.1.1."""
from dcls_jax.conv import conv
from dcls_jax.kernel import VERSIONS, construct_kernel
from dcls_jax.layers import Dcls1d, Dcls2d, Dcls3d
from dcls_jax.optim import clamp_positions, clamp_positions_transform, position_bounds, position_labels

__all__ = ["Dcls1d", "Dcls2d", "Dcls3d", "VERSIONS", "clamp_positions", "clamp_positions_transform",
           "construct_kernel", "conv", "position_bounds", "position_labels"]
