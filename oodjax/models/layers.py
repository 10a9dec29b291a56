"""Building blocks shared by the model zoo.

Naming convention, relied on by `oodjax.models.insides`: a module whose class name ends in
"Block" is one repeated unit of a network (a residual block, a conv-BN-ReLU unit) and one whose
name ends in "Stage" is a group of blocks working at one resolution. Pooling between stages
belongs to the parent, so a block's or stage's output is never a pooled map: the last one before
the head is the feature map Grad-CAM wants. Where a network max-pools between blocks it calls a
`MaxPool` module (class name ending in "Pool"), so the pooled map, what the next block reads, is
a module output too (VMDLS's feature ensemble reads it there).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's defaults (momentum 0.1 there is 0.9 here). Flax's own 0.99 makes the running
# statistics lag far behind the weights in the few-epoch CPU runs we do.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# He initialisation (fan-out, as in the ResNet paper): keeps activations of deep ReLU stacks
# at unit scale; Flax's default LeCun init halves their variance at every layer.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def precision(module: nn.Module) -> dict[str, Dtype]:
  """{"dtype", "param_dtype"} of a zoo module, to hand to the layers and blocks it creates.

  Every zoo model and block has `dtype` (the compute dtype; None: Flax's default, float32 for
  float32 inputs) and `param_dtype` (the parameters' storage dtype, float32). With dtype
  bfloat16 the convolutions and hidden Dense layers compute in bfloat16 on float32 master
  weights, BatchNorm reduces its statistics in float32 and keeps them in float32, and the head
  computes the logits in float32 (`head_dtype`).
  """
  return {"dtype": module.dtype, "param_dtype": module.param_dtype}


def head_dtype(module: nn.Module) -> Dtype:
  """The head's compute dtype: float32 whenever the model computes in a lower precision, so
  logits, softmax and the loss are float32."""
  return None if module.dtype is None else jnp.float32


class ConvBlock(nn.Module):
  """Conv (stride 1, SAME) -> optional BatchNorm -> ReLU.

  Attributes:
    features: output channels C.
    kernel_size: square kernel side.
    use_norm: whether to BatchNorm the convolution (the conv has no bias then).
    dtype, param_dtype: compute and parameter dtypes (`precision`).
  """
  features: int
  kernel_size: int = 3
  use_norm: bool = True
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H, W, features]."""
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), padding="SAME", use_bias=not self.use_norm,
                kernel_init=conv_init, **precision(self))(x)
    if self.use_norm:
      x = BatchNorm(**precision(self))(x, use_running_average=not train)
    return nn.relu(x)


class MaxPool(nn.Module):
  """Max-pooling with SAME padding, as a module without parameters.

  Odd sizes round up (28 -> 14 -> 7 -> 4 -> 2 -> 1), so the same network runs on 28x28 and
  32x32 inputs. Being a module (rather than a function call in the parent) makes the pooled map
  visible to `forward_with_insides`; it adds nothing to the parameter tree.

  Attributes:
    window: square window side.
    stride: step in both spatial directions.
    padding: "SAME", or an int p for p rows/columns of -inf on every side (PyTorch's
      `MaxPool2d(padding=p)`: the ImageNet ResNet stem's 3x3/2 pool pads 1 on both sides,
      where SAME would pad 0 before and 1 after an even-sized map).
  """
  window: int = 2
  stride: int = 2
  padding: str | int = "SAME"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), C] with SAME padding,
    [B, (H + 2p - window) // stride + 1, ..., C] with padding p."""
    padding = self.padding
    if not isinstance(padding, str):
      padding = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (self.window, self.window), strides=(self.stride, self.stride),
                       padding=padding)


class NormReLU(nn.Module):
  """BatchNorm -> ReLU, the pre-activation of pre-activation networks (WRN, DenseNet).

  A module of its own so that the final one of a network, whose output is the map the head
  pools, is a module output that `forward_with_insides` sees.
  """
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.relu(BatchNorm(**precision(self))(x, use_running_average=not train))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))
