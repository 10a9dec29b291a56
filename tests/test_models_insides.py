"""forward_with_insides against independent references: plain apply, float64 numpy, Flax's own
capture_intermediates, hand-worked gradients and finite differences."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.models import (Insides, feature_map_gradient, forward_with_insides, get_model,
                           is_stage, is_top_level)
from test_models import TINY, random_variables

EPS = 1e-5  # the zoo's BatchNorm epsilon (PyTorch's default)
CIFAR = (3, 32, 32, 3)

# One compilation per (model, input shape, options), shared by the tests.
fwi = jax.jit(forward_with_insides, static_argnums=0, static_argnames=("which", "is_block"))


@functools.cache
def _setup(name: str, shape=CIFAR):
  model = get_model(name, 5)
  x = jax.random.normal(jax.random.key(1), shape)
  return model, random_variables(model, shape), x


def f64(a) -> np.ndarray:
  return np.asarray(a, np.float64)


class UserMLP(nn.Module):
  """A model the library has never seen: setup-style, BatchNorm on [B, C] vectors."""

  def setup(self):
    self.hidden = nn.Dense(6)
    self.norm_a = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
    self.norm_b = nn.BatchNorm(use_running_average=True, epsilon=0.1)
    self.out = nn.Dense(3)

  def __call__(self, x):  # no `train` argument
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.norm_a(self.hidden(x)))
    return self.out(self.norm_b(x))


class SoftmaxOnTop(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.softmax(nn.Dense(3)(jnp.mean(x, axis=(1, 2))))


def _user_mlp():
  model = UserMLP()
  x = jax.random.normal(jax.random.key(2), (4, 2, 2, 2))
  return model, random_variables(model, x.shape, seed=3), x


@pytest.mark.parametrize("name", TINY)
def test_logits_match_apply_and_head_gives_logits(name):
  model, variables, x = _setup(name)
  logits, insides = fwi(model, variables, x)
  # Two compiled programs fuse differently: agreement to float32 rounding, not bitwise.
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, x), rtol=1e-5, atol=1e-5)
  D = insides.features.shape[1]
  assert insides.head_kernel.shape == (D, 5) and insides.head_bias.shape == (5,)
  rebuilt = f64(insides.features) @ f64(insides.head_kernel) + f64(insides.head_bias)
  np.testing.assert_allclose(rebuilt, f64(logits), rtol=1e-5, atol=1e-5)


def test_small_cnn_penultimate_is_the_hidden_layer():
  model, variables, x = _setup("small_cnn_tiny", (3, 28, 28, 1))
  _, insides = fwi(model, variables, x, which=("head", "feature_map"))
  assert insides.head_name == "Dense_1" and insides.features.shape == (3, 16)
  assert np.all(insides.features >= 0)  # post-ReLU
  # Grad-CAM map: the second conv block before its pool, [B, 14, 14, 8].
  assert insides.feature_map_name == "ConvBlock_1" and insides.feature_map.shape == (3, 14, 14, 8)


def test_bn_inputs_on_a_user_model_match_numpy():
  model, variables, x = _user_mlp()
  logits, insides = forward_with_insides(model, variables, x)
  p, s = variables["params"], variables["batch_stats"]
  h = f64(x).reshape(4, 8) @ f64(p["hidden"]["kernel"]) + f64(p["hidden"]["bias"])
  y_a = (h - f64(s["norm_a"]["mean"])) / np.sqrt(f64(s["norm_a"]["var"]) + 1e-3)
  r = np.maximum(y_a * f64(p["norm_a"]["scale"]) + f64(p["norm_a"]["bias"]), 0.0)
  y_b = (r - f64(s["norm_b"]["mean"])) / np.sqrt(f64(s["norm_b"]["var"]) + 0.1)
  out = (y_b * f64(p["norm_b"]["scale"]) + f64(p["norm_b"]["bias"])) @ f64(p["out"]["kernel"])
  out = out + f64(p["out"]["bias"])
  assert insides.bn_names == ("norm_a", "norm_b")
  np.testing.assert_allclose(insides.bn_inputs[0], y_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(insides.bn_inputs[1], y_b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(insides.features, y_b * f64(p["norm_b"]["scale"])
                             + f64(p["norm_b"]["bias"]), rtol=1e-5, atol=1e-5)
  assert insides.head_name == "out"
  np.testing.assert_array_equal(insides.input_bn, x)  # the input is already normalised
  # Nothing of rank 4 and no Block/Stage classes: missing, not an error, by default.
  assert insides.blocks == () and insides.feature_map is None


def test_bn_inputs_on_a_conv_model_match_captured_conv_outputs():
  model, variables, x = _setup("small_cnn_tiny")
  _, insides = fwi(model, variables, x, which=("bn",))
  # Flax's own capture of every conv output: each conv feeds a BatchNorm directly.
  _, state = model.apply(variables, x, capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
                         mutable=["intermediates"])
  assert insides.bn_names == ("ConvBlock_0/BatchNorm_0", "ConvBlock_1/BatchNorm_0")
  for name, y in zip(insides.bn_names, insides.bn_inputs):
    block = name.split("/")[0]
    z = f64(state["intermediates"][block]["Conv_0"]["__call__"][0])  # [B, H, W, C]
    stats = variables["batch_stats"][block]["BatchNorm_0"]
    expected = (z - f64(stats["mean"])) / np.sqrt(f64(stats["var"]) + EPS)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_model_without_batchnorm_has_no_bn_inputs():
  model, variables, x = _setup("alexnet_tiny")
  _, insides = fwi(model, variables, x, which=("bn",))
  assert insides.bn_inputs == () and insides.bn_names == ()
  np.testing.assert_array_equal(insides.input_bn, x)


def test_blocks_match_captured_module_outputs():
  model, variables, x = _setup("resnet_tiny")
  _, insides = fwi(model, variables, x, which=("blocks",))
  assert insides.block_names == ("ResNetStage_0/BasicBlock_0", "ResNetStage_0",
                                 "ResNetStage_1/BasicBlock_0", "ResNetStage_1")
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  for name, block in zip(insides.block_names, insides.blocks):
    node = state["intermediates"]
    for key in name.split("/"):
      node = node[key]
    np.testing.assert_allclose(block, node["__call__"][0], rtol=1e-5, atol=1e-5)
  assert [b.shape for b in insides.blocks][-1] == (3, 16, 16, 16)
  _, stages = fwi(model, variables, x, which=("blocks",), is_block=is_stage)
  assert stages.block_names == ("ResNetStage_0", "ResNetStage_1")


def test_top_level_blocks_of_a_user_model():
  model, variables, x = _user_mlp()
  _, insides = forward_with_insides(model, variables, x, which=("blocks",),
                                    is_block=is_top_level)
  assert insides.block_names == ("hidden", "norm_a", "norm_b", "out")
  assert [b.shape for b in insides.blocks] == [(4, 6)] * 3 + [(4, 3)]


def test_which_collects_only_what_is_asked():
  model, variables, x = _setup("resnet_tiny")
  _, insides = fwi(model, variables, x, which=("bn",))
  assert insides.features is None and insides.blocks == () and insides.feature_map is None
  assert len(insides.bn_inputs) == 6
  with pytest.raises(ValueError, match="unknown insides"):
    forward_with_insides(model, variables, x, which=("logits",))
  with pytest.raises(ValueError, match="perturb names no module"):
    forward_with_insides(model, variables, x, which=(), perturb={"ResNetStage_7": 0.0})


def test_head_errors_when_the_output_is_not_a_dense_output():
  model = SoftmaxOnTop()
  x = jnp.ones((2, 8, 8, 1))
  variables = random_variables(model, x.shape)
  with pytest.raises(ValueError, match="not the output of its last nn.Dense"):
    forward_with_insides(model, variables, x, which=("head",))
  _, insides = forward_with_insides(model, variables, x)  # everything available
  assert insides.features is None and insides.head_kernel is None and insides.head_name is None
  _, insides = forward_with_insides(model, variables, x, which=("bn", "feature_map"))
  assert insides.bn_names == ("BatchNorm_0",) and insides.feature_map_name == "BatchNorm_0"


def test_traced_once_per_shape_and_jit_matches_eager():
  model, variables, x = _setup("small_cnn_tiny")
  traces = []

  @jax.jit
  def run(variables, x):
    traces.append(x.shape)
    return forward_with_insides(model, variables, x)

  logits, insides = run(variables, x)
  run(variables, x + 1.0)
  assert len(traces) == 1
  run(variables, x[:2])
  assert len(traces) == 2
  eager_logits, eager = forward_with_insides(model, variables, x)
  np.testing.assert_allclose(logits, eager_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(insides), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert insides.bn_names == eager.bn_names


def test_vmap_over_a_stack_of_batches_matches_a_loop():
  model, variables, x = _setup("small_cnn_tiny")
  stack = jnp.stack([x, 0.5 * x])  # [2, B, H, W, C], e.g. two perturbation sizes
  run = jax.jit(jax.vmap(lambda x: forward_with_insides(model, variables, x, which=("head",))))
  logits, insides = run(stack)
  for i in range(2):
    one_logits, one = fwi(model, variables, stack[i], which=("head",))
    np.testing.assert_allclose(logits[i], one_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(insides.features[i], one.features, rtol=1e-5, atol=1e-5)


def test_gradient_wrt_input_matches_plain_apply():
  model, variables, x = _setup("resnet_tiny")

  def via_insides(x):
    logits, insides = forward_with_insides(model, variables, x, which=("head", "bn"))
    return logits[:, 1].sum(), insides

  grad, insides = jax.jit(jax.grad(via_insides, has_aux=True))(x)
  expected = jax.jit(jax.grad(lambda x: model.apply(variables, x)[:, 1].sum()))(x)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
  # Differentiating a BN-based statistic, as the white-box indicators do, is finite.
  bn_grad = jax.jit(jax.grad(lambda x: sum(
      jnp.sum(y ** 2) for y in forward_with_insides(model, variables, x, which=("bn",))[1]
      .bn_inputs)))(x)
  assert np.all(np.isfinite(bn_grad)) and float(jnp.abs(bn_grad).max()) > 0


def test_feature_map_gradient_of_resnet_matches_hand_derivation():
  # After the last stage a ResNet is mean-pool then Dense: d logit_k / d F[b, h, w, c] is
  # kernel[c, k] / (h * w) at every position.
  model, variables, x = _setup("resnet_tiny")
  classes = jnp.array([0, 4, 2])
  logits, fmap, grad = jax.jit(functools.partial(feature_map_gradient, model))(
      variables, x, classes)
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, x), rtol=1e-5, atol=1e-5)
  assert fmap.shape == (3, 16, 16, 16)
  kernel = f64(variables["params"]["Dense_0"]["kernel"])  # [16, 5]
  expected = np.broadcast_to(kernel.T[np.asarray(classes)][:, None, None, :] / 256.0, fmap.shape)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


class SmoothConvNet(nn.Module):
  """A user model that is smooth after its feature map (no ReLU/max-pool ties to break)."""

  @nn.compact
  def __call__(self, x):
    fmap = nn.Conv(6, (3, 3), strides=(2, 2))(x)  # [B, h, w, 6], the last rank-4 output
    pooled = jnp.mean(jnp.tanh(fmap) ** 2, axis=(1, 2))  # [B, 6]
    hidden = jnp.tanh(nn.Dense(8)(pooled))
    return nn.Dense(4)(hidden)


def test_feature_map_gradient_of_a_user_model_matches_finite_differences():
  model = SmoothConvNet()
  x = jax.random.normal(jax.random.key(4), (3, 8, 8, 2))
  variables = random_variables(model, x.shape)
  classes = jnp.array([1, 3, 0])
  logits, fmap, grad = feature_map_gradient(model, variables, x, classes)
  assert fmap.shape == (3, 4, 4, 6)
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6, atol=1e-6)

  def chosen(map_value):
    # The head after the feature map, written out from the weights in float64.
    p = variables["params"]
    pooled = np.mean(np.tanh(map_value) ** 2, axis=(1, 2))
    hidden = np.tanh(pooled @ f64(p["Dense_0"]["kernel"]) + f64(p["Dense_0"]["bias"]))
    out = hidden @ f64(p["Dense_1"]["kernel"]) + f64(p["Dense_1"]["bias"])
    return out[np.arange(3), np.asarray(classes)]  # [B]

  np.testing.assert_allclose(chosen(f64(fmap)), logits[np.arange(3), classes], rtol=1e-5)
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = rng.normal(size=fmap.shape)
    h = 1e-5
    finite_diff = (chosen(f64(fmap) + h * direction) - chosen(f64(fmap) - h * direction)) / (2 * h)
    analytic = np.sum(f64(grad) * direction, axis=(1, 2, 3))
    np.testing.assert_allclose(analytic, finite_diff, rtol=1e-4, atol=1e-6)


def test_feature_map_gradient_requires_a_feature_map():
  model, variables, x = _user_mlp()
  with pytest.raises(ValueError, match="rank-4"):
    feature_map_gradient(model, variables, x, jnp.zeros(4, jnp.int32))


def test_insides_is_a_pytree_with_static_names():
  leaves, treedef = jax.tree.flatten(Insides(features=jnp.ones((2, 3)), bn_names=("a",)))
  assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).bn_names == ("a",)
