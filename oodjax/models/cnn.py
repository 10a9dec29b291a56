"""Plain convolutional classifiers: the small MNIST-size CNN, VGG (with BatchNorm) and AlexNet.

All take normalised NHWC float32 images and return logits [B, K]; the last layer is an
`nn.Dense` whose input is the penultimate feature vector.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.models.layers import ConvBlock, Dtype, MaxPool, head_dtype, precision


class SmallCNN(nn.Module):
  """conv-BN-ReLU-pool blocks, then one hidden Dense layer and the linear head.

  The default (32, 64) conv widths with a 128-unit hidden layer reach about 90% on
  Fashion-MNIST in a few epochs on CPU. The penultimate features are the hidden layer's
  post-ReLU activations [B, hidden].

  Attributes:
    num_classes: K.
    widths: output channels of the conv blocks; each block is followed by a 2x2 max-pool.
    hidden: width D of the hidden Dense layer.
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  num_classes: int
  widths: tuple[int, ...] = (32, 64)
  hidden: int = 128
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    for width in self.widths:
      x = MaxPool()(ConvBlock(width, **precision(self))(x, train))
    x = x.reshape(x.shape[0], -1)  # [B, H' * W' * C']
    x = nn.relu(nn.Dense(self.hidden, **precision(self))(x))  # [B, D]
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(x)


class VGGStage(nn.Module):
  """Conv-BN-ReLU blocks at one resolution (the max-pool after it belongs to the parent)."""
  widths: tuple[int, ...]
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.widths:
      x = ConvBlock(width, **precision(self))(x, train)
    return x


# Channels of the conv layers, one tuple per stage (Simonyan & Zisserman 2015, Table 1, D).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
  """VGG with BatchNorm for CIFAR: five stages each halving the resolution, then a linear head.

  At 32x32 the last stage leaves a 1x1x512 map, so the head is a single Dense 512 -> K (the
  usual CIFAR adaptation; ImageNet VGG's 4096-wide classifier would hold most of the weights).

  Attributes:
    num_classes: K.
    stages: conv widths per stage; each stage is followed by a 2x2 max-pool.
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  num_classes: int
  stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    for widths in self.stages:
      x = MaxPool()(VGGStage(widths, **precision(self))(x, train))
    x = x.reshape(x.shape[0], -1)  # [B, D]
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(x)


class AlexNet(nn.Module):
  """AlexNet scaled to 32x32 inputs (no BatchNorm, dropout in the classifier).

  Five conv-ReLU layers (5x5, 5x5, 3x3, 3x3, 3x3; stride 1) with 3x3 stride-2 max-pools after
  the first, second and fifth, as in Krizhevsky et al. 2012; the 11x11 stride-4 stem of the
  ImageNet network would shrink a 32x32 image to nothing, so it became a 5x5 stride-1 conv and
  the classifier was narrowed to `hidden` units.

  Attributes:
    num_classes: K.
    widths: channels of the five conv layers.
    hidden: width D of the two hidden Dense layers.
    dropout_rate: dropout before each hidden Dense layer when training.
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  num_classes: int
  widths: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)
  hidden: int = 1024
  dropout_rate: float = 0.5
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    kernel_sizes = (5, 5, 3, 3, 3)
    for i, (width, k) in enumerate(zip(self.widths, kernel_sizes)):
      x = ConvBlock(width, kernel_size=k, use_norm=False, **precision(self))(x, train)
      if i in (0, 1, 4):
        x = MaxPool(window=3, stride=2)(x)
    x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 256] at 32x32
    for _ in range(2):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(nn.Dense(self.hidden, **precision(self))(x))  # [B, D]
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(x)
