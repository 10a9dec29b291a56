"""The plain convolutional autoencoder of VMDLS's reconstruction-based weighting (Sec. 3.3).

VMDLS trains, "on the same training data (but independently of our model) a simple
(non-conditional, non-variational) autoencoder [...] with an l2 reconstruction loss", and feeds
both a test image x and its reconstruction x_hat to the detector. This module is that
autoencoder and its loss; it maps normalised NHWC float32 images to images of the same shape.

    model = ConvAutoencoder()
    variables = model.init(jax.random.key(0), x)                 # x: [B, H, W, C]
    x_hat = model.apply(variables, x)                              # [B, H, W, C]
    loss = jnp.mean(reconstruction_loss(x, x_hat))                 # what a trainer minimises

References:
  Dinari & Freifeld, Variational- and metric-based deep latent space for out-of-distribution
  detection (VMDLS), UAI 2022, Sec. 3.3.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.models.layers import conv_init


class PatchConv(nn.Module):
  """A 2x2 convolution with stride 2 (VALID), computed as space-to-depth and one matmul.

  Each output pixel sees one non-overlapping 2x2 patch, so the convolution is a matmul of the
  [B, H/2, W/2, 4 C] patches with the [2, 2, C, F] kernel flattened to [4 C, F]: the same linear
  map as `nn.Conv(F, (2, 2), strides=(2, 2), padding="VALID")` with that kernel, run as one GEMM
  (about 2x faster on XLA:CPU than its convolution at the autoencoder's 8-32 channels).

  Attributes:
    features: output channels F.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W even) -> [B, H/2, W/2, F]."""
    b, h, w, c = x.shape
    kernel = self.param("kernel", conv_init, (2, 2, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    patches = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // 2, w // 2, 4 * c)  # (dy, dx, c) order, as the kernel's
    return patches @ kernel.reshape(4 * c, self.features) + bias[None, None, None]


class PatchConvTranspose(nn.Module):
  """A 2x2 transposed convolution with stride 2 (VALID), computed as one matmul and depth-to-space.

  Every input pixel writes one 2x2 output patch: out[2i + dy, 2j + dx] = x[i, j] @ K[dy, dx]
  (+ bias). Without the bias this is the adjoint of `PatchConv`'s map with the kernel's channel
  axes swapped, and `nn.ConvTranspose(F, (2, 2), strides=(2, 2), padding="VALID")` with the
  [2, 2, C, F] kernel flipped in space (Flax's default does not flip).

  Attributes:
    features: output channels F.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, 2h, 2w, F]."""
    b, h, w, c = x.shape
    kernel = self.param("kernel", conv_init, (2, 2, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = x @ kernel.transpose(2, 0, 1, 3).reshape(c, 4 * self.features)  # [B, h, w, 4F]
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias[None, None, None]


class ConvAutoencoder(nn.Module):
  """Patch-conv encoder, 3x3 conv bottleneck, transposed patch-conv decoder; no BatchNorm.

  Encoder: per width w in `widths`, a 2x2 stride-2 conv (`PatchConv`) + ReLU, halving H and W;
  then a linear 3x3 conv to `latent_channels`: the code, [B, H / 2^L, W / 2^L, latent_channels]
  for L = len(widths). Decoder: a 3x3 conv back to widths[-1] + ReLU, then per level in reverse
  order a 2x2 stride-2 transposed conv (`PatchConvTranspose`) to the width of the level above
  (+ ReLU), the last one linear to the input's C channels (inputs are normalised, so the output
  is unbounded). The 3x3 convs at the smallest resolution give the code its spatial context.

  Inputs whose sides are not multiples of 2^L are zero-padded at the bottom and right (zero is
  the dataset mean of normalised images) and the reconstruction is cropped back, so every input
  size comes back unchanged.

  The paper leaves the architecture to its SupMat; these choices are ours. Patch convs instead of
  3x3 stride-2 convs and transposed convs: on XLA:CPU the earlier 3x3 design (widths (16, 32))
  cost 3.3x the small CNN's forward pass on 28x28 images, this one 0.25x, which is what keeps
  VMDLS's scoring within 1.5x of a forward pass (benchmarks/README.md, "VMDLS").

  Attributes:
    widths: channels of the encoder's patch convs (the decoder mirrors them).
    latent_channels: channels of the code.
  """
  widths: tuple[int, ...] = (32, 64)
  latent_channels: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> x_hat [B, H, W, C]. `train` is unused (no BatchNorm or dropout); it
    is there so trainers can call every model the same way."""
    del train
    _, height, width, channels = x.shape
    multiple = 2 ** len(self.widths)
    x = jnp.pad(x, ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)))
    for features in self.widths:
      x = nn.relu(PatchConv(features)(x))
    x = nn.Conv(self.latent_channels, (3, 3), padding="SAME")(x)  # the code
    x = nn.relu(nn.Conv(self.widths[-1], (3, 3), padding="SAME", kernel_init=conv_init)(x))
    outputs = tuple(reversed(self.widths[:-1])) + (channels,)
    for i, features in enumerate(outputs):
      x = PatchConvTranspose(features)(x)
      if i < len(outputs) - 1:
        x = nn.relu(x)
    return x[:, :height, :width]  # [B, H, W, C]


def reconstruction_loss(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-example squared l2 reconstruction error ||x - x_hat||^2, summed over pixels.

  The sum (not the mean) over the H * W * C values is the squared l2 norm the paper names; a
  trainer minimises its mean over the batch, `jnp.mean(reconstruction_loss(x, x_hat))`, which
  is H * W * C times the per-pixel mean squared error (Adam is all but indifferent to that
  constant factor).

  Args:
    x: [B, ...] images (normalised), float.
    x_hat: [B, ...] their reconstructions, the same shape.

  Returns:
    [B] float, sum over every non-batch axis of (x - x_hat)^2.

  Raises:
    ValueError: if the shapes differ or there is no batch axis.
  """
  x, x_hat = jnp.asarray(x), jnp.asarray(x_hat)
  if x.shape != x_hat.shape:
    raise ValueError(f"x and x_hat must have the same shape, got {x.shape} and {x_hat.shape}")
  if x.ndim < 1:
    raise ValueError("x must have a leading batch axis, got a scalar")
  diff = (x - x_hat).reshape(x.shape[0], -1)  # [B, H * W * C]
  return jnp.sum(jnp.square(diff), axis=1)
