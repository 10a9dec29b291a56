"""ResNets and wide ResNets, for CIFAR-size inputs by default.

CIFAR stem (the default): one 3x3 stride-1 convolution and no max-pool, so a 32x32 image keeps
its resolution through the first stage (He et al. 2016, Sec. 4.2 style; the widths are those of
the ImageNet ResNets as in most OOD papers). `ResNet(stem="imagenet")` has the ImageNet stem
instead (7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool padded by 1), torchvision's layout,
so its checkpoints import (`oodjax.models.torch_import`). Each stage is a `ResNetStage` of
blocks; the first block of every stage but the first halves the resolution.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.models.layers import (BatchNorm, Dtype, MaxPool, NormReLU, conv_init,
                                  global_avg_pool, head_dtype, precision)


def _conv(features: int, kernel_size: int, strides: int = 1, **dtypes) -> nn.Conv:
  # Symmetric padding k // 2 as in the reference implementations (SAME would pad only the
  # bottom/right when striding an even-sized map).
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=kernel_size // 2, use_bias=False, kernel_init=conv_init, **dtypes)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (post-activation, He et al. 2016a, Fig. 2).

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the projection shortcut.
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  features: int
  strides: int = 1
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    p = precision(self)
    norm = functools.partial(BatchNorm, use_running_average=not train, **p)
    y = nn.relu(norm()(_conv(self.features, 3, self.strides, **p)(x)))
    y = norm()(_conv(self.features, 3, **p)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(_conv(self.features, 1, self.strides, **p)(x))
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (He et al. 2016a, Fig. 5).

  The stride sits on the 3x3 conv ("ResNet v1.5"), as in torchvision.

  Attributes:
    features: channels of the 3x3 conv; the block outputs 4 * features.
    strides: stride of the 3x3 conv and of the projection shortcut.
  """
  features: int
  strides: int = 1
  expansion: int = 4
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, 4 * features]."""
    p = precision(self)
    norm = functools.partial(BatchNorm, use_running_average=not train, **p)
    out_features = self.features * self.expansion
    y = nn.relu(norm()(_conv(self.features, 1, **p)(x)))
    y = nn.relu(norm()(_conv(self.features, 3, self.strides, **p)(y)))
    y = norm()(_conv(out_features, 1, **p)(y))
    if self.strides != 1 or x.shape[-1] != out_features:
      x = norm()(_conv(out_features, 1, self.strides, **p)(x))
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """`num_blocks` blocks; the first one applies `strides`.

  Attributes:
    block: the block module class (or a `functools.partial` of one), called as
      `block(features, strides=...)(x, train)`.
    num_blocks: number of blocks.
    features: the blocks' `features`.
    strides: stride of the first block.
  """
  block: Callable[..., nn.Module]
  num_blocks: int
  features: int
  strides: int = 1
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.features, strides=self.strides if i == 0 else 1,
                     **precision(self))(x, train)
    return x


STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
  """ResNet: stem conv-BN-ReLU, stages, global average pool, Dense.

  Attributes:
    num_classes: K.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: `BasicBlock` or `BottleneckBlock`.
    width: channels of the stem and of the first stage; stage i has width * 2**i.
    stem: "cifar" (3x3 stride-1 conv) or "imagenet" (7x7 stride-2 conv, then a 3x3 stride-2
      max-pool padded by 1: a 224x224 image reaches the first stage at 56x56).
    dtype, param_dtype: compute and parameter dtypes (`oodjax.models.layers.precision`).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Callable[..., nn.Module] = BasicBlock
  width: int = 64
  stem: str = "cifar"
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    if self.stem not in STEMS:
      raise ValueError(f"unknown ResNet stem {self.stem!r}; known: {STEMS}")
    p = precision(self)
    x = _conv(self.width, 3 if self.stem == "cifar" else 7,
              strides=1 if self.stem == "cifar" else 2, **p)(x)
    x = nn.relu(BatchNorm(**p)(x, use_running_average=not train))
    if self.stem == "imagenet":
      x = MaxPool(window=3, stride=2, padding=1)(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      x = ResNetStage(self.block, num_blocks, self.width * 2**i,
                      strides=1 if i == 0 else 2, **p)(x, train)
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(
        global_avg_pool(x))  # [B, D] -> [B, K]


class WideBasicBlock(nn.Module):
  """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut
  (Zagoruyko & Komodakis 2016, Fig. 1d).

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the projection shortcut.
    dropout_rate: dropout between the convs when training (0.3 in the paper's dropout runs).
  """
  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    p = precision(self)
    o = NormReLU(**p)(x, train)
    y = _conv(self.features, 3, self.strides, **p)(o)
    y = NormReLU(**p)(y, train)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _conv(self.features, 3, **p)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      # The projection reads the pre-activated input, as in the authors' code.
      x = _conv(self.features, 1, self.strides, **p)(o)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-k: conv3x3(16), three stages of width 16k, 32k, 64k, BN-ReLU, pool, Dense.

  Attributes:
    num_classes: K.
    depth: 6n + 4 for n blocks per stage.
    widen_factor: k.
    dropout_rate: dropout inside the blocks when training.
  """
  num_classes: int
  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
    num_blocks = (self.depth - 4) // 6
    p = precision(self)
    block = functools.partial(WideBasicBlock, dropout_rate=self.dropout_rate)
    x = _conv(16, 3, **p)(x)
    for i, width in enumerate((16, 32, 64)):
      x = ResNetStage(block, num_blocks, width * self.widen_factor,
                      strides=1 if i == 0 else 2, **p)(x, train)
    x = NormReLU(**p)(x, train)  # the feature map the head pools
    return nn.Dense(self.num_classes, dtype=head_dtype(self), param_dtype=self.param_dtype)(
        global_avg_pool(x))  # [B, D] -> [B, K]
