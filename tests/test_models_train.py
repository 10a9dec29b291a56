"""The small CNN learns Fashion-MNIST to the accuracy the detectors' experiments assume."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oodjax
from oodjax.models import get_model

FASHION = pathlib.Path(oodjax.__file__).parent / "data" / "embedded" / "fashion_mnist.npz"


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
@pytest.mark.skipif(not FASHION.exists(), reason="embedded Fashion-MNIST not built")
def test_small_cnn_reaches_88_percent_on_fashion_mnist():
  data = np.load(FASHION)
  mean, std = data["mean"].astype(np.float32), data["std"].astype(np.float32)

  def normalise(images):
    return (images.astype(np.float32) / 255.0 - mean) / std

  model = get_model("small_cnn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  epochs, batch = 4, 128
  steps_per_epoch = len(data["train_labels"]) // batch
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, epochs * steps_per_epoch))
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  rng = np.random.default_rng(0)
  for _ in range(epochs):
    order = rng.permutation(len(data["train_labels"]))
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                            normalise(data["train_images"][idx]),
                                            data["train_labels"][idx])
  logits = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats},
                                normalise(data["test_images"]))
  accuracy = float(np.mean(np.argmax(logits, -1) == data["test_labels"]))
  assert accuracy >= 0.88, accuracy
