"""The plain autoencoder of VMDLS Sec. 3.3: shapes, size, loss against numpy, and that it learns."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from oodjax.models.autoencoder import (ConvAutoencoder, PatchConv, PatchConvTranspose,
                                       reconstruction_loss)


# Shapes come from `jax.eval_shape`, which compiles nothing: on the 2-core CPU every new
# parameter shape costs seconds of compilation of its random initialiser.
@pytest.mark.parametrize("shape, widths", [
    ((28, 28, 1), (32, 64)),      # 28 -> 14 -> 7 -> 14 -> 28, the default network
    ((32, 32, 3), (32, 64)),      # 32 -> 16 -> 8 -> 16 -> 32
    ((28, 28, 1), (4, 8, 8)),     # 28 is padded to 32 (a multiple of 2^3), cropped back
    ((15, 13, 3), (4, 8)),        # odd sides: padded to 16 x 16, cropped back
])
def test_output_has_input_shape(shape, widths):
  model = ConvAutoencoder(widths=widths, latent_channels=4)
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(1), x)
  assert set(variables) == {"params"}  # plain: no BatchNorm statistics
  for train in (False, True):
    x_hat = jax.eval_shape(lambda v, x: model.apply(v, x, train=train), variables, x)
    assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32


def test_parameter_count_worked_by_hand():
  # widths (4, 8), 2 latent channels, 1 input channel, every layer with a bias:
  # patch conv 2x2 1->4: 16+4, patch conv 2x2 4->8: 128+8, code 3x3 8->2: 144+2,
  # 3x3 2->8: 144+8, patch convT 2x2 8->4: 128+4, patch convT 2x2 4->1: 16+1.
  variables = jax.eval_shape(ConvAutoencoder(widths=(4, 8), latent_channels=2).init,
                             jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  sizes = [p.size for p in jax.tree.leaves(variables)]
  assert sum(sizes) == 20 + 136 + 146 + 152 + 132 + 17
  assert len(sizes) == 12  # six layers, kernel + bias each
  # The default network (32, 64), 16 latent channels:
  # 160 + 8256 + 9232 + 9280 + 8224 + 129 parameters.
  variables = jax.eval_shape(ConvAutoencoder().init, jax.random.key(0),
                             jnp.zeros((1, 28, 28, 1)))
  assert sum(p.size for p in jax.tree.leaves(variables)) == 35281


def test_patch_conv_is_a_2x2_stride_2_convolution():
  """Against lax's convolution with the same kernel, and a float64 loop over the patches."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  layer = PatchConv(5)
  params = layer.init(jax.random.key(1), x)["params"]
  got = layer.apply({"params": params}, x)
  want = jax.lax.conv_general_dilated(x, params["kernel"], (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"][None, None, None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  xs, k = np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64)
  loop = np.zeros((2, 3, 2, 5))
  for i in range(3):
    for j in range(2):
      for dy in range(2):
        for dx in range(2):
          loop[:, i, j] += xs[:, 2 * i + dy, 2 * j + dx] @ k[dy, dx]
  np.testing.assert_allclose(got, loop + np.asarray(params["bias"]), rtol=1e-5, atol=1e-5)


def test_patch_conv_transpose_is_the_adjoint_of_the_patch_conv():
  """<PatchConv_K(u), v> = <u, PatchConvTranspose_K'(v)> with K' = K's channel axes swapped
  (biases zero), and Flax's ConvTranspose with the kernel flipped in space gives the same."""
  u = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  v = jax.random.normal(jax.random.key(1), (2, 3, 2, 5))
  kernel = jax.random.normal(jax.random.key(2), (2, 2, 3, 5))
  zeros = lambda n: jnp.zeros((n,))  # noqa: E731
  forward = PatchConv(5).apply({"params": {"kernel": kernel, "bias": zeros(5)}}, u)
  adjoint = PatchConvTranspose(3).apply(
      {"params": {"kernel": kernel.transpose(0, 1, 3, 2), "bias": zeros(3)}}, v)
  assert adjoint.shape == u.shape
  np.testing.assert_allclose(jnp.vdot(forward, v), jnp.vdot(u, adjoint), rtol=1e-5)
  params = {"kernel": kernel.transpose(0, 1, 3, 2), "bias": jnp.arange(3.0)}
  flax_t = nn.ConvTranspose(3, (2, 2), strides=(2, 2), padding="VALID").apply(
      {"params": {"kernel": params["kernel"][::-1, ::-1], "bias": params["bias"]}}, v)
  np.testing.assert_allclose(PatchConvTranspose(3).apply({"params": params}, v), flax_t,
                             rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_matches_float64_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
  x_hat = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
  want = np.zeros(3)
  for b in range(3):
    for value, approx in zip(x[b].ravel().astype(np.float64), x_hat[b].ravel()):
      want[b] += (value - float(approx)) ** 2
  got = reconstruction_loss(jnp.asarray(x), jnp.asarray(x_hat))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Hand-worked: ||(1, 2) - (0, 0)||^2 = 5 and ||(3, -1) - (1, 1)||^2 = 4 + 4 = 8.
  np.testing.assert_allclose(reconstruction_loss(jnp.array([[1.0, 2.0], [3.0, -1.0]]),
                                                 jnp.array([[0.0, 0.0], [1.0, 1.0]])), [5.0, 8.0])
  assert float(reconstruction_loss(jnp.asarray(x), jnp.asarray(x)).max()) == 0.0


def test_reconstruction_loss_gradients():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 1)))
    x_hat = jnp.asarray(rng.normal(size=(2, 3, 3, 1)))
    check_grads(reconstruction_loss, (x, x_hat), order=1, modes=("fwd", "rev"))
    # d/dx_hat sum_b ||x_b - x_hat_b||^2 = 2 (x_hat - x), worked by hand.
    grad = jax.grad(lambda b: reconstruction_loss(x, b).sum())(x_hat)
    np.testing.assert_allclose(grad, 2 * (np.asarray(x_hat) - np.asarray(x)), rtol=1e-12)


def test_reconstruction_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    reconstruction_loss(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4, 4, 3)))


def _blobs(n: int, size: int, seed: int = 0) -> np.ndarray:
  """[n, size, size, 1] sums of two Gaussian bumps, normalised to mean 0 and std 1."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  images = np.zeros((n, size, size), np.float32)
  for _ in range(2):
    cy, cx = rng.uniform(3, size - 3, (2, n, 1, 1))
    amp = rng.uniform(0.5, 1.0, (n, 1, 1))
    images += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0 ** 2))
  return ((images - images.mean()) / images.std())[..., None]


def test_adam_training_reduces_loss_by_a_large_factor():
  x = jnp.asarray(_blobs(64, 16))
  model = ConvAutoencoder(widths=(8, 16), latent_channels=8)
  # An "rbg" key: the initialisers are the module's own, but the bits come from XLA's
  # RngBitGenerator, which compiles in a fraction of the time threefry takes per kernel shape.
  variables = model.init(jax.random.key(0, impl="rbg"), x)
  assert set(variables) == {"params"}
  params = variables["params"]
  # `train` only exists for the trainers' calling convention: it changes nothing.
  np.testing.assert_array_equal(model.apply(variables, x[:2], train=True),
                                model.apply(variables, x[:2]))
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  def loss_fn(params):
    return jnp.mean(reconstruction_loss(x, model.apply({"params": params}, x, train=True)))

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  final = float(jax.jit(loss_fn)(params))
  # The untrained output is unrelated to x, so the first loss is about ||x||^2 = 256 or more.
  assert losses[0] > 100
  assert final < losses[0] / 50, (losses[0], final)  # about / 300 when written
