"""The model zoo builds at full size (abstractly) and the tiny variants train."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.models import MODELS, get_model

FULL_SIZE = ["resnet18", "resnet34", "resnet50", "wrn28_10", "wrn40_4", "densenet_bc100",
             "densenet121", "vgg16", "alexnet"]
TINY = ["small_cnn_tiny", "resnet_tiny", "wrn_tiny", "densenet_tiny", "vgg_tiny", "alexnet_tiny"]

# Published CIFAR-10 parameter counts (K = 10): ResNets as in the usual CIFAR ports of the
# ImageNet widths, WRN from Zagoruyko & Komodakis 2016 Table 1, DenseNet-BC from Huang et al.
# 2017 Table 2 (0.8M), VGG-16 with BN and a 512 -> 10 head. AlexNet and the small CNN are
# worked out by hand from their layer shapes.
PUBLISHED_PARAMS = {
    "resnet18": 11.17e6,
    "resnet34": 21.28e6,
    "resnet50": 23.52e6,
    "wrn28_10": 36.5e6,
    "wrn40_4": 8.9e6,
    "densenet_bc100": 0.77e6,
    # torchvision's DenseNet-121 has 7,978,856: minus its 1024 -> 1000 head (1,025,000), plus a
    # 1024 -> 10 head (10,250), minus the 7x7 stem conv and its BatchNorm (9,408 + 128), plus
    # the 3x3 CIFAR stem (1,728).
    "densenet121": 6_956_298,
    "vgg16": 14.72e6,
}
HAND_COUNTED_PARAMS = {
    # conv 5x5x3x64, 5x5x64x192, 3x3x192x384, 3x3x384x256, 3x3x256x256 (with biases),
    # Dense 4*4*256 -> 1024 -> 1024 -> 10.
    "alexnet": (5 * 5 * 3 * 64 + 64) + (5 * 5 * 64 * 192 + 192) + (9 * 192 * 384 + 384)
               + (9 * 384 * 256 + 256) + (9 * 256 * 256 + 256)
               + (4096 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10),
    # conv 3x3x1x32 + BN(32), conv 3x3x32x64 + BN(64), Dense 7*7*64 -> 128 -> 10.
    "small_cnn": (9 * 32 + 2 * 32) + (9 * 32 * 64 + 2 * 64) + (7 * 7 * 64 * 128 + 128)
                 + (128 * 10 + 10),
}


@functools.cache
def _abstract_variables(name: str, num_classes: int, shape=(1, 32, 32, 3)):
  model = get_model(name, num_classes)
  return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def random_variables(model, shape, seed: int = 0):
  """Variables of `model` for inputs of `shape`, drawn with numpy from the abstract init.

  Running `model.init` compiles a random generator per parameter (seconds per tiny model on
  2 CPU cores); tests only need plausible values: He-scaled kernels, scales near 1, small
  biases and means, and running variances away from 1 so BatchNorm is not the identity.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, scale, leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)  # biases, running means

  return jax.tree.map_with_path(fill, abstract)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_models_build_abstractly(name, num_classes):
  model, variables = _abstract_variables(name, num_classes)
  x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (4, num_classes) and logits.dtype == jnp.float32
  has_bn = name != "alexnet"
  assert ("batch_stats" in variables) == has_bn


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_counts_match_published(name):
  _, variables = _abstract_variables(name, 10)
  assert _count(variables["params"]) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(HAND_COUNTED_PARAMS))
def test_param_counts_match_hand_count(name):
  shape = (1, 28, 28, 1) if name == "small_cnn" else (1, 32, 32, 3)
  _, variables = _abstract_variables(name, 10, shape)
  assert _count(variables["params"]) == HAND_COUNTED_PARAMS[name]


def test_resnet50_is_a_bottleneck_network():
  # The bottleneck expands x4: the head reads 2048 features, ResNet-18's reads 512.
  _, variables = _abstract_variables("resnet50", 10)
  assert variables["params"]["Dense_0"]["kernel"].shape == (2048, 10)
  _, variables = _abstract_variables("resnet18", 10)
  assert variables["params"]["Dense_0"]["kernel"].shape == (512, 10)


MNIST_SHAPE, CIFAR_SHAPE = (3, 28, 28, 1), (3, 32, 32, 3)
# Each tiny model at one input size in the default run, the other size with `-m slow`: a
# backward compile is 2-5 s here and the suite has to stay well under 90 s.
TRAIN_STEP_CASES = [
    pytest.param(name, shape, marks=[pytest.mark.slow] if i % 2 == j else [])
    for i, name in enumerate(TINY) for j, shape in enumerate([MNIST_SHAPE, CIFAR_SHAPE])]


@pytest.mark.parametrize("name, shape", TRAIN_STEP_CASES)
def test_tiny_models_train_step(name, shape):
  model = get_model(name, 5)
  key_x, key_dropout = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, shape)
  labels = jnp.array([0, 3, 4])
  variables = random_variables(model, shape)

  def loss_fn(params):
    logits, new_state = model.apply(
        {**variables, "params": params}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": key_dropout})
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), new_state

  # One compilation beats hundreds of eagerly dispatched ops for the backward pass.
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, new_state), grads = grad_fn(variables["params"])
  assert np.isfinite(float(loss))
  grad_norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(grad_norms)) and max(grad_norms) > 0
  if "batch_stats" in variables:
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(new_state["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new))
  assert jax.eval_shape(model.apply, variables, x).shape == (3, 5)


@pytest.mark.slow  # compiling the random initialisers takes seconds per model
@pytest.mark.parametrize("name", TINY)
def test_real_init_gives_finite_unit_scale_outputs(name):
  model = get_model(name, 5)
  x = jax.random.normal(jax.random.key(1), CIFAR_SHAPE)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits = model.apply(variables, x)
  assert np.all(np.isfinite(logits)) and 0 < float(jnp.std(logits)) < 100


def test_get_model_passes_overrides_and_rejects_unknown_names():
  model = get_model("resnet_tiny", 7, width=4)
  assert model.num_classes == 7 and model.width == 4
  with pytest.raises(ValueError, match="known:.*resnet18"):
    get_model("resnet19", 10)


def test_every_family_has_a_tiny_variant():
  assert set(TINY) <= set(MODELS) and set(FULL_SIZE) | {"small_cnn"} <= set(MODELS)
