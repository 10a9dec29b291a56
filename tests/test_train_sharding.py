"""Sharded training on 8 fake CPU devices agrees with one device.

Runs in a subprocess because XLA_FLAGS must be set before jax is first imported.
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np

from tests.train_helpers import run_with_fake_devices

TESTS_DIR = os.path.dirname(__file__)

SCRIPT = textwrap.dedent(r"""
  import json, sys, tempfile
  import jax, jax.numpy as jnp, numpy as np, optax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  sys.path.insert(0, sys.argv[1])
  from train_helpers import TinyNet, tiny_config, tiny_dataset
  from oodjax.data.core import batches
  from oodjax.train import (create_train_state, make_classification_loss, make_mesh,
                            make_train_step, state_sharding, jit_train_step, batch_sharding,
                            train_classifier)

  assert jax.device_count() == 8
  out = {}

  def sgd_losses(mesh, num_steps=5):
    model, tx = TinyNet(), optax.sgd(0.1, momentum=0.9, nesterov=True)
    ds = tiny_dataset(96)
    sample = jnp.zeros((1, 8, 8, 1))
    init = lambda rng: create_train_state(model, tx, rng, sample)
    shardings = state_sharding(jax.eval_shape(init, jax.random.key(0)), mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jit_train_step(make_train_step(make_classification_loss(model.apply), tx), mesh,
                          shardings)
    losses = []
    for batch in batches(ds, 16, seed=0, drop_remainder=True, sharding=batch_sharding(mesh)):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
    return losses[:num_steps]

  out["one"] = sgd_losses(make_mesh((1,), ("data",)))
  out["eight"] = sgd_losses(make_mesh((-1,), ("data",)))
  out["four_by_two"] = sgd_losses(make_mesh((-1, 2), ("data", "model")))

  # The full trainer over all 8 devices, then again: the finished run is restored from its
  # checkpoint into the sharded abstract state.
  def run(workdir, shape):
    config = tiny_config(num_epochs=1)  # 6 steps, checkpoints at 4 and 6
    config.unlock(); config.mesh.shape = shape; config.lock()
    return train_classifier(config, workdir, model=TinyNet(), train_ds=tiny_dataset(),
                            eval_ds=tiny_dataset(20, seed=1), progress=False)
  with tempfile.TemporaryDirectory() as d8, tempfile.TemporaryDirectory() as d1:
    state8, summary8 = run(d8, (-1,))
    state1, _ = run(d1, (1,))
    restored, summary_r = run(d8, (-1,))
    leaf = restored.params["Dense_0"]["kernel"]
    out["restored_devices"] = len(leaf.sharding.device_set)
    out["restored_replicated"] = bool(leaf.sharding.is_fully_replicated)
    out["restored_finished"] = summary_r["already_finished"]
    out["max_param_diff_restored"] = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in
        zip(jax.tree.leaves(restored.params), jax.tree.leaves(state8.params)))
    out["max_param_diff_1_vs_8"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
        zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)))
    out["eval_8"] = summary8["eval"]["eval_count"]
  print("RESULT " + json.dumps(out))
""")


def test_eight_fake_devices_match_one_device():
  proc = run_with_fake_devices(SCRIPT, 8, TESTS_DIR, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert len(out["one"]) == 5
  np.testing.assert_allclose(out["eight"], out["one"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["four_by_two"], out["one"], rtol=0, atol=1e-5)
  assert out["restored_finished"] and out["restored_devices"] == 8
  assert out["restored_replicated"]
  assert out["max_param_diff_restored"] == 0.0
  # 6 SGD steps (momentum, BatchNorm, dropout) on 8 devices vs 1: only rounding differs.
  assert out["max_param_diff_1_vs_8"] < 1e-4
  assert out["eval_8"] == 20
