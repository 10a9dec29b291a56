"""DenseNet-BC for CIFAR-size inputs (Huang et al. 2017, Sec. 3 "DenseNet-BC", Sec. 4.2).

The paper's "dense block" is a `DenseStage` here (the stage naming used across the zoo), made of
bottleneck `DenseLayer`s; `Transition`s between stages compress the channels and halve the
resolution.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.models.layers import (Dtype, NormReLU, conv_init, global_avg_pool, head_dtype,
                                  precision)


def _conv(features: int, kernel_size: int, **dtypes) -> nn.Conv:
  return nn.Conv(features, (kernel_size, kernel_size), padding=kernel_size // 2,
                 use_bias=False, kernel_init=conv_init, **dtypes)


class DenseLayer(nn.Module):
  """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), its output concatenated to its input.

  Attributes:
    growth_rate: k, the channels this layer adds.
  """
  growth_rate: int
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C + k]."""
    p = precision(self)
    y = _conv(4 * self.growth_rate, 1, **p)(NormReLU(**p)(x, train))
    y = _conv(self.growth_rate, 3, **p)(NormReLU(**p)(y, train))
    return jnp.concatenate([x, y], axis=-1)


class DenseStage(nn.Module):
  """A dense block: `num_layers` DenseLayers at one resolution, C -> C + num_layers * k."""
  num_layers: int
  growth_rate: int
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for _ in range(self.num_layers):
      x = DenseLayer(self.growth_rate, **precision(self))(x, train)
    return x


class Transition(nn.Module):
  """BN-ReLU-conv1x1 to `features` channels, then 2x2 average pooling."""
  features: int
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p = precision(self)
    x = _conv(self.features, 1, **p)(NormReLU(**p)(x, train))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet-BC: conv3x3(2k), three dense stages with two transitions, BN-ReLU, pool, Dense.

  Attributes:
    num_classes: K.
    depth: 6n + 4 for n bottleneck layers per stage (100 -> 16 layers per stage).
    growth_rate: k.
    compression: theta, the fraction of channels a transition keeps (rounded down).
    stage_sizes: layers per dense stage, overriding `depth` (DenseNet-121: (6, 12, 24, 16)
      with k = 32); None derives three equal stages from `depth`.
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  num_classes: int
  depth: int = 100
  growth_rate: int = 12
  compression: float = 0.5
  stage_sizes: tuple[int, ...] | None = None
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    stages = self.stage_sizes
    if stages is None:
      if (self.depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {self.depth}")
      stages = (((self.depth - 4) // 6),) * 3
    p = precision(self)
    x = _conv(2 * self.growth_rate, 3, **p)(x)
    for i, num_layers in enumerate(stages):
      x = DenseStage(num_layers, self.growth_rate, **p)(x, train)
      if i < len(stages) - 1:
        x = Transition(int(x.shape[-1] * self.compression), **p)(x, train)
    x = NormReLU(**p)(x, train)  # the feature map the head pools
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(
        global_avg_pool(x))  # [B, D] -> [B, K]
