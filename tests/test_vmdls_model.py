"""The VMDLS encoder (Eq. 1): g(x) read from an unedited backbone, μ, σ and the samples."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.models import forward_with_insides, get_model
from oodjax.vmdls.model import VMDLSEncoder


def _encoder(name="small_cnn_tiny", d=3):
  model = VMDLSEncoder(backbone=get_model(name, num_classes=5), latent_dim=d)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x


def test_g_is_the_backbone_penultimate_vector_and_mu_sigma_are_its_dense_layers():
  model, variables, x = _encoder()
  mu, sigma, g = model.apply(variables, x, method="encode")
  # Independently: the backbone alone, with the encoder's backbone weights, read by insides.
  backbone = get_model("small_cnn_tiny", num_classes=5)
  sub = {k: v["backbone"] for k, v in variables.items()}
  _, insides = forward_with_insides(backbone, sub, x, which=("head",))
  np.testing.assert_allclose(g, insides.features, rtol=1e-6, atol=1e-6)
  p = jax.tree.map(np.asarray, variables["params"])
  g = np.asarray(g, np.float64)
  np.testing.assert_allclose(mu, g @ p["mu"]["kernel"] + p["mu"]["bias"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      sigma, np.exp(g @ p["log_sigma"]["kernel"] + p["log_sigma"]["bias"]), rtol=1e-5)
  assert mu.shape == sigma.shape == (4, 3) and bool(jnp.all(sigma > 0))
  np.testing.assert_allclose(model.apply(variables, x), mu, rtol=1e-6)


def test_sample_is_mu_plus_sigma_times_standard_normal_noise():
  model, variables, x = _encoder()
  key = jax.random.key(7)
  z = model.apply(variables, x, key, method="sample")
  mu, sigma, _ = model.apply(variables, x, method="encode")
  eps = jax.random.normal(key, mu.shape)
  np.testing.assert_allclose(z, mu + sigma * eps, rtol=1e-6, atol=1e-6)


def test_insides_read_the_encoder_like_a_classifier():
  """forward_with_insides: logits = μ, head features = g, blocks = the backbone's blocks."""
  model, variables, x = _encoder("resnet_tiny")
  mu, sigma, g = model.apply(variables, x, method="encode")
  logits, insides = forward_with_insides(model, variables, x, which=("head", "blocks"))
  np.testing.assert_allclose(logits, mu, rtol=1e-6)
  np.testing.assert_allclose(insides.features, g, rtol=1e-6)
  assert insides.head_kernel.shape == (g.shape[-1], 3)
  assert len(insides.blocks) >= 2


def test_training_mode_updates_batch_stats_and_gradients_reach_the_backbone():
  model, variables, x = _encoder()

  def loss(params):
    (mu, sigma, _), updates = model.apply({**variables, "params": params}, x, train=True,
                                          method="encode", mutable=["batch_stats"])
    return jnp.sum(mu ** 2) + jnp.sum(sigma), updates

  grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
  assert "batch_stats" in updates
  conv_grad = jax.tree.leaves(grads["backbone"]["ConvBlock_0"])
  assert any(float(jnp.abs(g).max()) > 0 for g in conv_grad)
  # The backbone's own head is unused: no gradient flows into it.
  head = [k for k in grads["backbone"] if k.startswith("Dense")][-1]
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["backbone"][head]))


class _NoDenseHead(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return jnp.mean(nn.Conv(4, (3, 3))(x), axis=(1, 2))


def test_a_backbone_whose_output_is_not_a_dense_output_is_a_clear_error():
  model = VMDLSEncoder(backbone=_NoDenseHead(), latent_dim=2)
  with pytest.raises(ValueError, match="penultimate"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
