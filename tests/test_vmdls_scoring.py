"""VMDLS scoring (Eq. 8, Secs. 3.2-3.3) against references built without oodjax's insides."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from oodjax.data.core import ImageDataset, normalize
from oodjax.models import ConvBlock, get_model, is_block_or_stage, is_pool, is_stage
from oodjax.models.autoencoder import ConvAutoencoder
from oodjax.vmdls import scoring
from oodjax.vmdls.model import VMDLSEncoder


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  n, k = 90, 3
  labels = np.repeat(np.arange(k), n // k).astype(np.int32)
  images = np.clip(rng.integers(0, 150, (n, 12, 12, 1)) + 40 * labels[:, None, None, None],
                   0, 255).astype(np.uint8)
  train = ImageDataset(images, labels, (0.4,), (0.3,), ("a", "b", "c"), "toy")
  model = VMDLSEncoder(backbone=get_model("resnet_tiny", num_classes=k), latent_dim=2)
  x = normalize(images, train.mean, train.std)
  variables = model.init(jax.random.key(0), x[:2])
  # Non-trivial BatchNorm statistics, so inference mode differs from training mode.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if "batch_stats" in jax.tree_util.keystr(p) and "mean" in
      jax.tree_util.keystr(p) else v, variables)
  ae = ConvAutoencoder(widths=(4,), latent_channels=2)
  ae_params = ae.init(jax.random.key(1), x[:1])["params"]
  return train, x, model, variables, ae, ae_params


def _reference_ensemble(model, variables, x):
  """t(x) from Flax's own capture_intermediates (not oodjax's interceptor): the stages'
  outputs pooled, then g and μ from `encode`."""
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]["backbone"]
  stages = sorted(k for k in inter if k.startswith("ResNetStage"))
  pooled = [np.asarray(inter[s]["__call__"][0]).mean(axis=(1, 2)) for s in stages][:3]
  mu, _, g = model.apply(variables, x, method="encode")
  return np.concatenate(pooled + [np.asarray(g), np.asarray(mu)], axis=1), pooled[0]


def test_feature_ensemble_is_pooled_stages_then_g_then_mu(setup):
  _, x, model, variables, _, _ = setup
  is_block = scoring.ensemble_blocks(model, variables, x)
  t, t1 = scoring.feature_ensemble(model, variables, x[:10], is_block=is_block)
  t_ref, t1_ref = _reference_ensemble(model, variables, x[:10])
  np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t1, t1_ref, rtol=1e-5, atol=1e-6)


def test_vmdls_b_is_minus_the_best_scipy_log_likelihood(setup):
  train, x, model, variables, _, _ = setup
  state = scoring.fit_vmdls(model, variables, train, batch_size=32)
  t_train, _ = _reference_ensemble(model, variables, x)
  t_train = t_train.astype(np.float64)
  for c in range(3):  # the means are the class means of t (independent of the fit's code)
    np.testing.assert_allclose(state["means"][c], t_train[train.labels == c].mean(0),
                               rtol=1e-4, atol=1e-5)
  # Log-likelihoods: scipy on the covariance the fit produced, (WᵀW)⁻¹, including its ridge.
  covs = [np.linalg.inv(np.asarray(state["whitening"][c], np.float64).T
                        @ np.asarray(state["whitening"][c], np.float64)) for c in range(3)]
  test = x[::7]
  t_test, _ = _reference_ensemble(model, variables, test)
  ll = np.stack([scipy.stats.multivariate_normal(state["means"][c], covs[c]).logpdf(t_test)
                 for c in range(3)], axis=1)
  scores, c_max = jax.jit(lambda x: scoring.score_vmdls_b(model, variables, state, x))(test)
  np.testing.assert_allclose(scores, -ll.max(axis=1), rtol=2e-3, atol=2e-2)
  np.testing.assert_array_equal(c_max, ll.argmax(axis=1))


def test_vmdls_weights_the_shifted_negative_log_likelihood_by_the_reconstruction(setup):
  train, x, model, variables, ae, ae_params = setup
  state = scoring.fit_vmdls(model, variables, train, batch_size=32, autoencoder=ae,
                            autoencoder_params=ae_params)
  base = scoring.fit_vmdls(model, variables, train, batch_size=32)
  score_b = lambda x: scoring.score_vmdls_b(model, variables, base, x)[0]  # noqa: E731

  def w_of(x):  # ‖t¹(x) − t¹(x̂)‖², t¹ from capture_intermediates
    x_hat = np.asarray(ae.apply({"params": ae_params}, x))
    return np.sum((_reference_ensemble(model, variables, x)[1]
                   - _reference_ensemble(model, variables, x_hat)[1]) ** 2, axis=1)

  log_lik_train = -np.asarray(score_b(x), np.float64)
  w_train = w_of(x)
  np.testing.assert_allclose(state["log_lik_max"], log_lik_train.max() + 1.0, rtol=1e-4)
  np.testing.assert_allclose(state["w_scale"], w_train.max(), rtol=1e-4)
  test = x[::5]
  expected = (w_of(test) / w_train.max()
              * (log_lik_train.max() + 1.0 + np.asarray(score_b(test), np.float64)))
  scores, _ = jax.jit(lambda x: scoring.score_vmdls(model, variables, state, x,
                                                     autoencoder=ae))(test)
  np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-4)
  assert np.all(np.asarray(scoring.score_vmdls(model, variables, state, x,
                                               autoencoder=ae)[0]) >= 0)
  # shift=False is the literal l_new = w · l of Sec. 3.3, as a score −w · l.
  literal = scoring.fit_vmdls(model, variables, train, batch_size=32, autoencoder=ae,
                              autoencoder_params=ae_params, shift=False)
  scores, _ = scoring.score_vmdls(model, variables, literal, test, autoencoder=ae)
  np.testing.assert_allclose(scores, w_of(test) / w_train.max() * np.asarray(score_b(test)),
                             rtol=2e-3, atol=1e-4)


def test_unlabelled_training_set_is_an_error(setup):
  train, _, model, variables, _, _ = setup
  import dataclasses
  with pytest.raises(ValueError, match="labels"):
    scoring.fit_vmdls(model, variables, dataclasses.replace(train, labels=None))


def test_small_cnn_ensemble_uses_its_pooled_blocks():
  """For a network that max-pools between blocks, the block members are the pooled maps (what
  the next block reads), checked against Flax's capture_intermediates + nn.max_pool by hand."""
  model = VMDLSEncoder(backbone=get_model("small_cnn_tiny", num_classes=3), latent_dim=2)
  x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  is_block = scoring.ensemble_blocks(model, variables, x)
  assert is_block is is_pool
  t, t1 = scoring.feature_ensemble(model, variables, x, is_block=is_block)
  # small_cnn_tiny: conv widths (4, 8), hidden 16, d = 2 -> 4 + 8 + 16 + 2.
  assert t.shape == (2, 30) and t1.shape == (2, 4)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]["backbone"]
  pooled = [np.asarray(nn.max_pool(inter[f"ConvBlock_{i}"]["__call__"][0], (2, 2),
                                   strides=(2, 2), padding="SAME")).mean(axis=(1, 2))
            for i in range(2)]
  mu, _, g = model.apply(variables, x, method="encode")
  np.testing.assert_allclose(t, np.concatenate(pooled + [g, mu], axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      jax.jit(lambda x: scoring.first_member(model, variables, x, is_block=is_block))(x),
      pooled[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["resnet_tiny", "small_cnn_tiny", "no_blocks"])
def test_ensemble_and_first_member_equals_the_separate_passes(backbone):
  """One pass over [x; x_first] cut after the first block = t(x), t¹(x) and t¹(x_first)."""
  if backbone == "no_blocks":
    model = VMDLSEncoder(backbone=get_model("small_cnn_tiny", num_classes=3), latent_dim=2)
    is_block = lambda module, path: False  # noqa: E731
  else:
    model = VMDLSEncoder(backbone=get_model(backbone, num_classes=3), latent_dim=2)
  x = jax.random.normal(jax.random.key(4), (5, 28, 28, 1))
  x_first = jax.random.normal(jax.random.key(5), (3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x[:1])
  if backbone != "no_blocks":
    is_block = scoring.ensemble_blocks(model, variables, x)
  t, t1, t1_first = jax.jit(lambda x, y: scoring.ensemble_and_first_member(
      model, variables, x, y, is_block=is_block))(x, x_first)
  want_t, want_t1 = scoring.feature_ensemble(model, variables, x, is_block=is_block)
  assert t.shape == want_t.shape and t1_first.shape == (3, t1.shape[1])
  np.testing.assert_allclose(t, want_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t1, want_t1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      t1_first, scoring.first_member(model, variables, x_first, is_block=is_block),
      rtol=1e-5, atol=1e-5)


def test_members_blocks_reads_the_maps_before_the_pool():
  """members="blocks" (the earlier definition) takes the small CNN's ConvBlock outputs."""
  model = VMDLSEncoder(backbone=get_model("small_cnn_tiny", num_classes=3), latent_dim=2)
  x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  is_block = scoring.ensemble_blocks(model, variables, x, members="blocks")
  assert is_block is is_block_or_stage
  t, _ = scoring.feature_ensemble(model, variables, x, is_block=is_block)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]["backbone"]
  blocks = [np.asarray(inter[f"ConvBlock_{i}"]["__call__"][0]).mean(axis=(1, 2))
            for i in range(2)]
  np.testing.assert_allclose(t[:, :12], np.concatenate(blocks, axis=1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="members"):
    scoring.ensemble_blocks(model, variables, x, members="stages")
  from oodjax.detectors import registry
  with pytest.raises(ValueError, match="members"):
    registry.vmdls_b_detector("pre-pool")


def test_ensemble_blocks_prefers_pools_then_stages():
  x = jnp.ones((1, 28, 28, 1))
  resnet = VMDLSEncoder(backbone=get_model("resnet_tiny", num_classes=3), latent_dim=2)
  assert scoring.ensemble_blocks(resnet, resnet.init(jax.random.key(0), x), x) is is_stage

  class Plain(nn.Module):  # blocks, no stages, no pooling modules
    @nn.compact
    def __call__(self, x, train=False):
      x = ConvBlock(3)(x, train)
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  plain = VMDLSEncoder(backbone=Plain(), latent_dim=2)
  assert (scoring.ensemble_blocks(plain, plain.init(jax.random.key(0), x), x)
          is is_block_or_stage)


def test_first_member_stops_the_forward_pass_after_the_first_block(setup):
  """t¹ alone equals the ensemble's first member, and its program has the first stage's
  convolutions only (the rest of the network is never traced)."""
  _, x, model, variables, _, _ = setup
  is_block = scoring.ensemble_blocks(model, variables, x)
  t1 = jax.jit(lambda x: scoring.first_member(model, variables, x, is_block=is_block))(x[:10])
  np.testing.assert_allclose(t1, _reference_ensemble(model, variables, x[:10])[1],
                             rtol=1e-5, atol=1e-6)

  def convs(fn):
    return str(jax.make_jaxpr(fn)(x[:2])).count("conv_general_dilated")

  full = convs(lambda x: scoring.feature_ensemble(model, variables, x, is_block=is_block)[0])
  first = convs(lambda x: scoring.first_member(model, variables, x, is_block=is_block))
  # resnet_tiny: a stem conv, then two stages of one BasicBlock (2 convs, +1 projection in the
  # second): 1 + 2 + 3 = 6 in all, 1 + 2 = 3 up to the end of the first stage.
  assert (full, first) == (6, 3)
  # Without blocks the ensemble starts at g, and so does its first member.
  no_blocks = lambda module, path: False  # noqa: E731
  np.testing.assert_allclose(
      scoring.first_member(model, variables, x[:2], is_block=no_blocks),
      model.apply(variables, x[:2], method="encode")[2], rtol=1e-5, atol=1e-6)
