"""bfloat16 compute on float32 master weights: the zoo's `dtype` and `train.compute_dtype`."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax import data
from oodjax.config import load_config
from oodjax.models import forward_with_insides, get_model
from oodjax.train import train_classifier
from oodjax.train.classifier import config_hash
from test_models import random_variables

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["small_cnn_tiny", "resnet_tiny", "wrn_tiny", "densenet_tiny", "vgg_tiny", "alexnet_tiny"]


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_models_compute_in_bfloat16_on_float32_weights(name):
  model = get_model(name, 5)
  low = model.clone(dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = random_variables(model, x.shape)
  # The same variables serve both: float32 parameters and BatchNorm statistics.
  low_vars = jax.eval_shape(low.init, jax.random.key(1), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), low_vars) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, insides = forward_with_insides(low, variables, x, which=("blocks", "head"))
  # The blocks compute in bfloat16; the head (logits, softmax, loss) in float32.
  assert {b.dtype for b in insides.blocks} == {jnp.dtype(jnp.bfloat16)}
  assert logits.dtype == jnp.float32
  reference = model.apply(variables, x)
  # bfloat16 keeps 8 bits of mantissa: close to the float32 logits, not equal.
  scale = float(jnp.max(jnp.abs(reference)))
  error = float(jnp.max(jnp.abs(logits - reference)))
  assert 0 < error < 0.1 * max(scale, 1.0)
  if "batch_stats" in variables:  # training-mode statistics come back in float32
    _, updates = low.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
    assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_compute_dtype_is_validated_and_hashed_only_when_set():
  config = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py"))
  low = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py"),
                    ["train.compute_dtype=bfloat16"])
  assert config_hash(config) != config_hash(low)
  with config.unlocked():
    del config.train["compute_dtype"]  # a config from before the option: the same hash
  assert config_hash(config) == config_hash(
      load_config(str(ROOT / "configs" / "fmnist_small_cnn.py")))
  bad = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py:smoke"),
                    ["train.compute_dtype=float16"])
  ds = data.load("embedded/fashion_mnist", "train").take(slice(0, 256))
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    train_classifier(bad, "/nonexistent-never-written", model=get_model("small_cnn", 10),
                     train_ds=ds)


@pytest.mark.slow
def test_bfloat16_training_matches_float32_accuracy_on_the_smoke_config(tmp_path):
  """The smoke config's 2,048 images, trained twice for three epochs (one epoch leaves a
  model near 60% whose accuracy moves by points with any rounding): bfloat16 compute reaches
  the float32 run's test accuracy within 1 point."""
  accuracies = {}
  test = data.load("embedded/fashion_mnist", "test")
  for dtype in ("float32", "bfloat16"):
    config = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py:smoke"),
                         [f"train.compute_dtype={dtype}", "train.num_epochs=3"])
    train = data.load("embedded/fashion_mnist", "train").take(slice(0, config.train_size))
    state, summary = train_classifier(config, tmp_path / dtype, model=get_model("small_cnn", 10),
                                      train_ds=train, eval_ds=test, progress=False)
    accuracies[dtype] = summary["eval"]["eval_accuracy"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / dtype / "metrics.jsonl")
              .read_text().splitlines() if json.loads(line)["kind"] == "train"]
    assert np.all(np.isfinite(losses))
  assert accuracies["float32"] > 0.7
  assert abs(accuracies["bfloat16"] - accuracies["float32"]) <= 0.01, accuracies
