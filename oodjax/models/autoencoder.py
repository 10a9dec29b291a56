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


class ConvAutoencoder(nn.Module):
  """Stride-2 conv encoder, linear bottleneck, stride-2 transposed-conv decoder; no BatchNorm.

  Encoder: per width w in `widths`, a 3x3 stride-2 conv (SAME) + ReLU, halving H and W
  (rounding up); then a 3x3 conv to `latent_channels`, linear: the code. Decoder: per width in
  reversed order, a 3x3 stride-2 transposed conv + ReLU, doubling H and W; then a linear 3x3 conv
  to the input's C channels (inputs are normalised, so the output is unbounded).

  Where a halving rounded up (an odd size, e.g. 7 -> 4), the doubling overshoots (4 -> 8); the
  decoder crops each map back to the size of the encoder map at that level (8 -> 7), keeping the
  top-left part, so every input size comes back unchanged (28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28).
  The paper leaves the architecture to its SupMat; these sizes are ours.

  Attributes:
    widths: channels of the encoder convs (the decoder mirrors them).
    latent_channels: channels of the code, which is [B, H / 2^L, W / 2^L, latent_channels] for
      L = len(widths).
  """
  widths: tuple[int, ...] = (32, 64)
  latent_channels: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> x_hat [B, H, W, C]. `train` is unused (no BatchNorm or dropout); it
    is there so trainers can call every model the same way."""
    del train
    channels = x.shape[-1]
    sizes = []  # (H, W) entering each encoder conv
    for width in self.widths:
      sizes.append(x.shape[1:3])
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME",
                          kernel_init=conv_init)(x))
    x = nn.Conv(self.latent_channels, (3, 3), padding="SAME")(x)  # [B, h, w, latent], the code
    for width, (h, w) in zip(reversed(self.widths), reversed(sizes)):
      x = nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding="SAME",
                           kernel_init=conv_init)(x)
      x = nn.relu(x[:, :h, :w])  # [B, h, w, width], cropped where the doubling overshot
    return nn.Conv(channels, (3, 3), padding="SAME")(x)  # [B, H, W, C]


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
