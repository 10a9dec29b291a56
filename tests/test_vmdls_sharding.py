"""VMDLS training over 8 fake CPU devices agrees with one device (the batch split on "data").

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
  import jax, numpy as np
  sys.path.insert(0, sys.argv[1])
  from train_helpers import TinyNet, tiny_dataset
  from oodjax.train import default_train_config
  from oodjax.vmdls import train as vtrain

  assert jax.device_count() == 8

  def run(mesh_shape):
    config = default_train_config()
    config.seed = 3
    config.train.update(dict(num_epochs=2, optimizer="sgd", learning_rate=0.05,
                             log_every_steps=1))
    config.mesh.shape = mesh_shape
    config.checkpoint.update(dict(every_steps=100, keep=1, async_save=False))
    config.vmdls = vtrain.vmdls_config(latent_dim=2)
    config.vmdls.update(dict(classes_per_batch=2, per_class=4))  # B = 8: one per device
    with tempfile.TemporaryDirectory() as workdir:
      _, state, _ = vtrain.train_vmdls(config, workdir, backbone=TinyNet(num_classes=3),
                                       train_ds=tiny_dataset(48), progress=False)
      losses = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")
                if '"train"' in l]
    return losses, np.asarray(state.class_means).tolist()

  out = {"one": run((1,)), "eight": run((-1,))}
  print(json.dumps(out))
""")


def test_vmdls_training_on_eight_devices_matches_one():
  proc = run_with_fake_devices(SCRIPT, 8, TESTS_DIR, timeout=600)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  (loss_one, means_one), (loss_eight, means_eight) = out["one"], out["eight"]
  assert len(loss_one) == len(loss_eight) == 12
  # Triplets, KL and BatchNorm statistics are over the global batch under sharded jit.
  np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(means_eight, means_one, rtol=1e-4, atol=1e-5)
