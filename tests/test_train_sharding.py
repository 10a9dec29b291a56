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


# --- FSDP: parameters and optimizer state sharded over an "fsdp" mesh axis ------------------

FSDP_SCRIPT = textwrap.dedent(r"""
  import json, sys, tempfile
  import flax.linen as nn
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_numpy_rank_promotion", "raise")
  sys.path.insert(0, sys.argv[1])
  from train_helpers import tiny_config, tiny_dataset
  from oodjax.train import train_classifier

  class WideNet(nn.Module):  # a 1024 x 64 Dense (sharded) beside small leaves (replicated)
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
          nn.Conv(16, (3, 3))(x)))
      x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
      return nn.Dense(3)(x)

  def run(workdir, shape, axes, rule):
    config = tiny_config(num_epochs=2, batch_size=16, log_every_steps=1, optimizer="adam",
                         learning_rate=1e-3)
    config.unlock()
    config.mesh.shape, config.mesh.axes = shape, axes
    config.mesh.param_sharding = rule
    config.lock()
    state, summary = train_classifier(config, workdir, model=WideNet(),
                                      train_ds=tiny_dataset(96), progress=False)
    losses = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")
              if json.loads(l)["kind"] == "train"]
    return state, summary, losses

  out = {}
  with tempfile.TemporaryDirectory() as dp, tempfile.TemporaryDirectory() as fs:
    s_dp, sum_dp, out["dp"] = run(dp, (-1,), ("data",), "replicated")
    s_fs, sum_fs, out["fsdp"] = run(fs, (2, 4), ("data", "fsdp"), "fsdp")
    out["memory_dp"], out["memory_fsdp"] = sum_dp["memory"], sum_fs["memory"]
    out["returned_replicated"] = all(l.sharding.is_fully_replicated
                                     for l in jax.tree.leaves(s_fs.params))
    out["param_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                            zip(jax.tree.leaves(s_dp.params), jax.tree.leaves(s_fs.params)))
    # The FSDP run's checkpoint, restored by a data-parallel config (resharded on restore).
    restored, summary_r, _ = run(fs, (-1,), ("data",), "replicated")
    out["restored_finished"] = summary_r["already_finished"]
    out["restored_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                               zip(jax.tree.leaves(restored.params), jax.tree.leaves(s_fs.params)))
  print("RESULT " + json.dumps(out))
""")


def test_fsdp_matches_data_parallel_and_shards_the_state():
  proc = run_with_fake_devices(FSDP_SCRIPT, 8, TESTS_DIR, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert len(out["dp"]) == 12  # 2 epochs x 6 steps, one loss per step
  np.testing.assert_allclose(out["fsdp"], out["dp"], rtol=0, atol=1e-5)
  # Only the reduction order differs; Adam's m / sqrt(v) magnifies rounding on near-zero
  # gradients, as in the 1-vs-8-device check above.
  assert out["param_diff"] < 1e-4
  dp, fsdp = out["memory_dp"], out["memory_fsdp"]
  assert dp["state_bytes"] == dp["state_bytes_total"] == fsdp["state_bytes_total"]
  # Params + Adam's two moments: the Dense kernel (1024 x 64, 93% of the state) split in 4.
  dense = 3 * 1024 * 64 * 4
  assert fsdp["state_bytes"] == fsdp["state_bytes_total"] - dense + dense // 4
  assert fsdp["argument_bytes"] < dp["argument_bytes"]
  assert out["returned_replicated"]
  assert out["restored_finished"] and out["restored_diff"] == 0.0


def test_fsdp_rule_shards_the_largest_divisible_axis():
  import types

  import pytest
  from jax.sharding import PartitionSpec as P

  from oodjax.train import sharding as shd
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4}, axis_names=("data", "fsdp"))

  def spec(*shape):
    return shd.fsdp_spec(None, np.zeros(shape, np.float32), mesh=mesh)

  assert spec(1024, 64) == P("fsdp")  # rows: the largest divisible axis
  assert spec(3, 3, 64, 64) == P(None, None, None, "fsdp")  # a tie goes to the last axis
  assert spec(4099, 12) == P(None, "fsdp")  # 4099 is not divisible by 4
  assert spec(4097, 3) == P()  # nothing divisible: replicated
  assert spec(64) == P() and spec() == P()  # small leaves and scalars stay whole
  assert shd.param_rule("replicated", mesh) is None
  with pytest.raises(ValueError, match="unknown parameter sharding"):
    shd.param_rule("zero2", mesh)
  with pytest.raises(ValueError, match="needs an 'fsdp' mesh axis"):
    shd.param_rule("fsdp", types.SimpleNamespace(shape={"data": 8}, axis_names=("data",)))
