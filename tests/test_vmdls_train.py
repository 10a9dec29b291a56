"""VMDLS training: the previous epoch's class means, the KL switch, resuming mid-epoch, errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from oodjax.data.core import normalize
from oodjax.data.sampler import class_balanced_indices
from oodjax.train import checkpoint as ckpt
from oodjax.train import default_train_config
from oodjax.vmdls import train as vtrain
from oodjax.vmdls.model import VMDLSEncoder
from tests.train_helpers import TinyNet, tiny_dataset


def _config(**vmdls):
  config = default_train_config()
  config.seed = 3
  config.train.update(dict(num_epochs=3, optimizer="adam", learning_rate=1e-2,
                           weight_decay=0.0, schedule="constant", log_every_steps=2))
  config.checkpoint.update(dict(every_steps=3, keep=10, async_save=False))
  config.vmdls = vtrain.vmdls_config(latent_dim=2)
  config.vmdls.update({"classes_per_batch": 3, "per_class": 4, **vmdls})
  return config


def test_class_means_are_the_previous_epochs_means_of_z_and_kl_waits_for_them():
  """One epoch of steps with a zero learning rate and σ ≈ 0, so z = μ(x) exactly: the means
  after the epoch are each class's mean of μ over the images the sampler drew (numpy)."""
  ds = tiny_dataset(48)
  model = VMDLSEncoder(backbone=TinyNet(num_classes=3), latent_dim=2)
  tx = optax.sgd(0.0)
  sample = jnp.zeros((1, 8, 8, 1))
  hp = vtrain.loss_hparams(_config().vmdls)
  state = vtrain.create_vmdls_state(model, tx, jax.random.key(0), sample, 3, hp)
  params = jax.tree.map(lambda a: a, state.params)
  params["log_sigma"]["bias"] = jnp.full((2,), -40.0)  # σ = e^-40: z = μ to float precision
  params["log_sigma"]["kernel"] = jnp.zeros_like(params["log_sigma"]["kernel"])
  state = state.replace(params=params)
  steps = 4
  step_fn = jax.jit(vtrain.make_vmdls_train_step(model, tx, steps_per_epoch=steps))
  drawn_mu, drawn_labels = [], []
  rng = jax.random.key(1)
  for b in range(steps):
    assert not bool(state.means_ready)
    idx = class_balanced_indices(ds.labels, 3, 4, seed=3, epoch=0, batch_index=b)
    batch = {"image": normalize(ds.images[idx], ds.mean, ds.std),
             "label": ds.labels[idx].astype(np.int32)}
    # μ in training mode (BatchNorm on batch statistics), as the step computes it.
    (mu, _, _), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                batch["image"], train=True, method="encode",
                                mutable=["batch_stats"], rngs={"dropout": jax.random.split(
                                    jax.random.fold_in(rng, b))[1]})
    drawn_mu.append(np.asarray(mu, np.float64))
    drawn_labels.append(batch["label"])
    state, metrics = step_fn(state, batch, rng)
    assert float(metrics["kl_on"]) == 0.0  # epoch 0: no means yet, no KL
  assert bool(state.means_ready)
  mu, labels = np.concatenate(drawn_mu), np.concatenate(drawn_labels)
  expected = np.stack([mu[labels == c].mean(axis=0) for c in range(3)])
  np.testing.assert_allclose(state.class_means, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.mean_counts, 0)  # reset for the next epoch
  # Epoch 1: the KL term is on.
  idx = class_balanced_indices(ds.labels, 3, 4, seed=3, epoch=1, batch_index=0)
  batch = {"image": normalize(ds.images[idx], ds.mean, ds.std),
           "label": ds.labels[idx].astype(np.int32)}
  _, metrics = step_fn(state, batch, rng)
  assert float(metrics["kl_on"]) == 1.0


def test_resume_mid_epoch_restores_the_running_class_sums(tmp_path):
  """A run restarted from a mid-epoch checkpoint ends where the uninterrupted run ends; the
  checkpoint it restarts from holds a partial epoch's sums, so they must be restored."""
  ds, config = tiny_dataset(48), _config()
  ref_dir, resumed_dir = str(tmp_path / "ref"), str(tmp_path / "resumed")
  _, ref, summary = vtrain.train_vmdls(config, ref_dir, backbone=TinyNet(num_classes=3),
                                       train_ds=ds, progress=False)
  assert summary["step"] == 12 and summary["steps_per_epoch"] == 4
  # Keep steps 3 and 6 only: step 6 is mid-epoch 1 (epoch 1 = steps 4..7).
  shutil.copytree(ref_dir, resumed_dir)
  for step in ("9", "12"):
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", step))
  manager = ckpt.make_checkpoint_manager(os.path.join(resumed_dir, "checkpoints"),
                                         every_steps=3, keep=10, async_save=False)
  try:
    assert ckpt.latest_step(manager) == 6
  finally:
    ckpt.close_checkpoint_manager(manager)
  _, resumed, summary = vtrain.train_vmdls(config, resumed_dir,
                                           backbone=TinyNet(num_classes=3), train_ds=ds,
                                           progress=False)
  assert summary["resumed_from"] == 6
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_dropping_the_restored_sums_would_change_the_means(tmp_path):
  """Guards the test above: the step-6 checkpoint's running sums are not zero."""
  ds, config = tiny_dataset(48), _config()
  config.train.num_epochs = 2
  workdir = str(tmp_path / "run")
  vtrain.train_vmdls(config, workdir, backbone=TinyNet(num_classes=3), train_ds=ds,
                     progress=False)
  model = VMDLSEncoder(backbone=TinyNet(num_classes=3), latent_dim=2)
  tx, _ = vtrain.make_optimizer(vtrain.vmdls_train_config(config), 8)
  abstract = jax.eval_shape(lambda k: vtrain.create_vmdls_state(
      model, tx, k, jnp.zeros((1, 8, 8, 1)), 3, vtrain.loss_hparams(config.vmdls)),
      jax.random.key(0))
  manager = ckpt.make_checkpoint_manager(os.path.join(workdir, "checkpoints"), every_steps=3,
                                         keep=10, async_save=False)
  try:
    state, _, meta = ckpt.restore_checkpoint(manager, 6, abstract)
  finally:
    ckpt.close_checkpoint_manager(manager)
  assert meta["batch_in_epoch"] == 2
  assert float(np.sum(state.mean_counts)) == 2 * 12
  assert float(np.abs(state.mean_sums).sum()) > 0


@pytest.mark.parametrize("overrides, match", [
    (dict(classes_per_batch=4), "classes"),
    (dict(classes_per_batch=1), "classes_per_batch"),
    (dict(reducer="mean"), "reducer"),
    (dict(kl_start_epoch=0), "kl_start_epoch"),
    (dict(s2=0.0), "s2"),
    (dict(latent_dim=0), "latent_dim"),
])
def test_bad_vmdls_configs_fail_before_training(tmp_path, overrides, match):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=match):
    vtrain.train_vmdls(config, str(tmp_path), backbone=TinyNet(num_classes=3),
                       train_ds=tiny_dataset(48), progress=False)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_vmdls_train_override_is_an_error():
  config = _config()
  config.vmdls.train = ml_collections.ConfigDict(dict(num_epoch=2))
  with pytest.raises(ValueError, match="num_epoch"):
    vtrain.vmdls_train_config(config)


def test_vmapped_variants_equal_each_variant_trained_alone(tmp_path):
  """Table 4's ablation as one vmapped program: each variant ends where its own run ends."""
  ds = tiny_dataset(48)
  # SGD, not Adam: parameters whose true gradient is 0 (the conv bias before BatchNorm; μ's
  # bias when only translation-invariant distances act) get rounding noise as gradient, which
  # differs between the batched and the single program, and Adam rescales that noise to full
  # steps (JAX-NOTES); SGD leaves it at rounding size.
  sgd = dict(optimizer="sgd", learning_rate=0.05)
  config = _config()
  config.train.update(dict(num_epochs=2, **sgd))
  variants = [{"kl_weight": 0.0, "distancing_weight": 0.0},  # L_t
              {"distancing_margin": 4.0}]                      # L_KL + L_t + L_d, M_d = 4
  _, stacked, summary = vtrain.train_vmdls_variants(
      config, str(tmp_path / "all"), backbone=TinyNet(num_classes=3), train_ds=ds,
      variants=variants, progress=False)
  assert summary["step"] == 8
  assert stacked.class_means.shape == (2, 3, 2)
  for v, overrides in enumerate(variants):
    alone_config = _config(**overrides)
    alone_config.train.update(dict(num_epochs=2, **sgd))
    _, alone, _ = vtrain.train_vmdls(alone_config, str(tmp_path / f"alone{v}"),
                                     backbone=TinyNet(num_classes=3), train_ds=ds,
                                     progress=False)
    mine = jax.tree.map(lambda a, v=v: a[v], stacked)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(mine)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # The variants really differ (the test would be empty otherwise).
  assert not np.allclose(stacked.class_means[0], stacked.class_means[1])


def test_a_variant_may_only_set_loss_hyperparameters(tmp_path):
  with pytest.raises(ValueError, match="may set only"):
    vtrain.train_vmdls_variants(_config(), str(tmp_path), backbone=TinyNet(num_classes=3),
                                train_ds=tiny_dataset(48), variants=[{"latent_dim": 3}])
