"""ENVISE students: every registered BSN and its RvSN twin build, share one parameter tree, keep
only the stem and the head real, expose their feature map and head, and learn.

Full-size students (VGG-16, AlexNet, ResNet-18/50) are only traced (`jax.eval_shape`); the tiny
ones run for real on 28x28x1 and 32x32x3 inputs. The expected numbers of binary layers are
counted from the architectures' definitions (VGG-16: 13 convs; ResNet-18: 16 convs + 3
projections; ResNet-50: 48 convs + 4 projections; AlexNet: 5 convs + 2 hidden Dense), not read
from the code under test.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oodjax.envise.binary import BinaryConv, BinaryDense
from oodjax.envise.students import STUDENTS, BinaryVGG, binary_twin, get_student
from oodjax.models import feature_map_gradient, forward_with_insides

K = 5
TINY = ("binary_tiny", "binary_alexnet_tiny", "binary_resnet_tiny",
        "binary_resnet_bottleneck_tiny")
FULL = ("binary_vgg16", "binary_alexnet", "binary_resnet18", "binary_resnet50")
# Binary layers (all but the stem and the head) of each full-size student.
FULL_BINARY_LAYERS = {"binary_vgg16": 12, "binary_alexnet": 6, "binary_resnet18": 19,
                      "binary_resnet50": 52}
SHAPES = ((2, 28, 28, 1), (2, 32, 32, 3))
LAYER_TYPES = (nn.Conv, nn.Dense, BinaryConv, BinaryDense)


def layer_kinds(model, shape):
  """{module path: class name} of every conv/dense layer, from an abstract trace of init."""
  kinds = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, LAYER_TYPES) and context.method_name == "__call__":
      kinds["/".join(context.module.path)] = type(context.module).__name__
    return next_fun(*args, **kwargs)

  def init(key, x):
    with nn.intercept_methods(interceptor):
      return model.init(key, x)

  jax.eval_shape(init, jax.random.key(0), jnp.zeros(shape))
  return kinds


def random_variables(model, shape, seed=0):
  """Variables of `model` for inputs of `shape`, drawn with numpy (He-scaled kernels, small BN
  shifts, unit running variances). Skips `model.init`'s compiled random number generation,
  which costs several seconds of XLA compile per kernel shape on CPU."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
              ).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def shapes_tree(model, shape):
  tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def test_registry_and_bad_input():
  assert set(TINY + FULL) <= set(STUDENTS)
  with pytest.raises(ValueError, match="unknown student"):
    get_student("binary_vgg19", K)
  with pytest.raises(ValueError, match="non-empty first stage"):
    BinaryVGG(K, stages=((), (8,))).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="binary"):
    binary_twin(nn.Dense(3))


@pytest.mark.parametrize("name", FULL)
def test_full_students_trace_with_twin_trees_and_binary_layers(name):
  shape = (1, 32, 32, 3)
  bsn, rvsn = get_student(name, 100), get_student(name, 100, binary=False)
  out = jax.eval_shape(lambda v, x: bsn.apply(v, x), jax.eval_shape(
      bsn.init, jax.random.key(0), jnp.zeros(shape)), jnp.zeros(shape))
  assert out.shape == (1, 100)
  assert shapes_tree(bsn, shape) == shapes_tree(rvsn, shape)
  kinds = layer_kinds(bsn, shape)
  assert {p for p, kind in kinds.items() if not kind.startswith("Binary")} == {"stem", "head"}
  assert kinds["stem"] == "Conv" and kinds["head"] == "Dense"
  assert sum(kind.startswith("Binary") for kind in kinds.values()) == FULL_BINARY_LAYERS[name]
  real_kinds = layer_kinds(rvsn, shape)
  assert real_kinds.keys() == kinds.keys()
  assert not any(kind.startswith("Binary") for kind in real_kinds.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", TINY)
def test_tiny_students_run_and_twins_match(name, shape):
  bsn, rvsn = get_student(name, K), get_student(name, K, binary=False)
  x = jax.random.normal(jax.random.key(1), shape)
  assert shapes_tree(bsn, shape) == shapes_tree(rvsn, shape)
  variables = random_variables(bsn, shape)
  kinds = layer_kinds(bsn, shape)
  assert {p for p, kind in kinds.items() if not kind.startswith("Binary")} == {"stem", "head"}
  assert any(kind.startswith("Binary") for kind in kinds.values())

  logits = jax.jit(bsn.apply)(variables, x)
  real_logits = jax.jit(rvsn.apply)(variables, x)
  assert logits.shape == real_logits.shape == (shape[0], K)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(real_logits))
  assert not np.allclose(logits, real_logits)  # sign vs ReLU really differ


def test_same_key_initialises_twins_identically():
  # Same module names and initialisers, so Flax draws the same values for both twins.
  x = jnp.zeros((1, 8, 8, 1))
  bsn, rvsn = get_student("binary_tiny", K), get_student("binary_tiny", K, binary=False)
  variables, real_variables = jax.jit(lambda key: (bsn.init(key, x), rvsn.init(key, x)))(
      jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, variables, real_variables)


@pytest.mark.parametrize("name", TINY)
def test_forward_with_insides_finds_feature_map_and_head(name):
  model = get_student(name, K)
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  variables = random_variables(model, x.shape)
  run = jax.jit(lambda v, x: forward_with_insides(model, v, x, which=("feature_map", "head")))
  logits, insides = run(variables, x)
  assert insides.head_name == "head"
  assert insides.feature_map_name == "NormReLU_0"
  fmap = np.asarray(insides.feature_map)
  assert fmap.ndim == 4 and fmap.shape[1] >= 2 and np.all(fmap >= 0)  # post-ReLU map
  np.testing.assert_allclose(insides.features @ insides.head_kernel + insides.head_bias[None, :],
                             logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-5, atol=1e-5)


def permute_binary_magnitudes(params, rng):
  """Shuffles |W| within each output filter of every kernel except the stem's and the head's,
  keeping every sign: alpha = mean |W| and sign(W) are unchanged, W itself is not."""
  def shuffle(path, leaf):
    keys = [p.key for p in path]
    if keys[-1] != "kernel" or keys[0] in ("stem", "head"):
      return leaf
    leaf = np.asarray(leaf)
    mags = np.abs(leaf).reshape(-1, leaf.shape[-1])  # [n, C_out]
    mags = np.stack([rng.permutation(mags[:, o]) for o in range(leaf.shape[-1])], axis=1)
    return np.sign(leaf) * mags.reshape(leaf.shape)

  return jax.tree_util.tree_map_with_path(shuffle, params)


def test_directly_binarised_rvsn():
  rvsn = get_student("binary_tiny", K, binary=False)
  quantised = binary_twin(rvsn)
  assert quantised == get_student("binary_tiny", K) and binary_twin(quantised, False) == rvsn
  x = jax.random.normal(jax.random.key(5), (3, 28, 28, 1))
  variables = random_variables(rvsn, x.shape)
  shuffled = dict(variables, params=permute_binary_magnitudes(
      variables["params"], np.random.default_rng(0)))
  # The directly binarised RvSN reads its binary layers' weights only through sign and alpha.
  np.testing.assert_allclose(quantised.apply(variables, x), quantised.apply(shuffled, x),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(rvsn.apply(variables, x), rvsn.apply(shuffled, x), atol=1e-3)
  assert not np.allclose(quantised.apply(variables, x), rvsn.apply(variables, x), atol=1e-3)


def test_grad_cam_style_second_order_gradient_through_binary_student():
  model = get_student("binary_resnet_tiny", K)
  x = jax.random.normal(jax.random.key(7), (2, 16, 16, 3))
  variables = random_variables(model, x.shape)
  classes = jnp.array([1, 3])

  def attention_energy(params):
    _, fmap, grad = feature_map_gradient(model, dict(variables, params=params), x, classes)
    weights = jnp.mean(grad, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    return jnp.sum(jax.nn.relu(jnp.sum(weights * fmap, axis=-1)) ** 2)

  grads = jax.jit(jax.grad(attention_energy))(variables["params"])
  norms = {k: float(optax.tree.norm(v)) for k, v in grads.items()}
  assert all(np.isfinite(n) for n in norms.values())
  assert norms["head"] > 0 and norms["BinaryResNetStage_1"] > 0


@pytest.mark.parametrize("binary", [True, False])
def test_adam_reduces_loss_on_fixed_batch(binary):
  model = get_student("binary_tiny", K, binary=binary)
  x = jax.random.normal(jax.random.key(9), (10, 28, 28, 1))
  labels = jnp.arange(10) % K
  variables = random_variables(model, x.shape)
  tx = optax.adam(3e-3)

  def loss_fn(params, batch_stats):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  for _ in range(15):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
