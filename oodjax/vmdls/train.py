"""Training the VMDLS latent space (Sec. 3.1) and the autoencoder of its weighting (Sec. 3.3).

Both run through the shared loop of `oodjax.train.loop` (resume, log, checkpoint), so what is
new here is only what differs from a classifier:

* the batches: B_C classes x B_N examples each (`oodjax.data.sampler`);
* the step: Eq. 7's loss on the generator's samples z = μ + σ ⊙ ε (Eq. 1), ε drawn from the
  step's own key;
* the state: the class means m(c) the KL term pulls towards are the means of the generator's
  output z over the PREVIOUS epoch (Sec. 3.1). The step accumulates this epoch's per-class sums
  of z in the state and, at the epoch's last step, turns them into the means the next epoch
  uses. They are arrays of the train state, so a run resumed mid-epoch restores them with it.
  Before the first epoch has completed there are no means: the KL term is off during epoch 0
  (`means_ready` is False) and on from epoch 1. The authors' code also keeps it off for the first
  `generation_epoch` epochs (20 by default); `vmdls.kl_start_epoch` does the same here.
* the loss hyperparameters (term weights, margins) are arrays in the state, not constants of
  the compiled step: the Table 4 ablation variants are one state stacked along a leading axis
  and one `jax.vmap`ped step (`train_vmdls_variants`).

Config keys (besides `default_train_config()`'s; `vmdls_config()` gives defaults):

  config.vmdls.latent_dim         d.
  config.vmdls.classes_per_batch  B_C >= 2.
  config.vmdls.per_class          B_N.
  config.vmdls.kl_weight, triplet_weight, distancing_weight: the terms' weights (1, 1, 1 is
                                  Eq. 7; 0 switches a term off, as in Table 4).
  config.vmdls.triplet_margin     M_t (0.1, Sec. 3.1).
  config.vmdls.distancing_margin  M_d; None is the paper's usual M_d = d.
  config.vmdls.s2                 s^2 of the class Gaussians p(.|c) (0.1).
  config.vmdls.kl_start_epoch     first epoch with the KL term (>= 1: epoch 0 has no means).
  config.vmdls.margin_warmup      None (paper), or (start, increment): M_d at epoch e is
                                  min(start + increment * e, M_d), as the authors' code grows it
                                  (0.15 + 1 per epoch up to 32).
  config.vmdls.reducer            "all" (Eq. 7: the mean over all triplets) or "nonzero" (the
                                  code's mean over the triplets with a positive loss).
  config.vmdls.normalize          False (paper); True L2-normalises the embeddings before the
                                  distances, as the code's distance does.
  config.vmdls.train              optional overrides of `config.train` for VMDLS (epochs,
                                  learning rate...), so one config can hold a classifier and
                                  a VMDLS encoder (the main job).
  config.vmdls.train_size         optional cap on the training images VMDLS trains on (CLI).
  config.vmdls.backbone           optional zoo name (default: `config.model`).

References:
  Dinari & Freifeld 2022, VMDLS, Sec. 3.1 (Eqs. 1-7) and Sec. 3.3.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from oodjax.data.core import ImageDataset, batches
from oodjax.data.sampler import check_class_balanced, class_balanced_batches
from oodjax.models.autoencoder import ConvAutoencoder, reconstruction_loss
from oodjax.train import sharding as shd
from oodjax.train.classifier import config_hash, default_train_config, pad_eval_set
from oodjax.train.loop import Job, run_job
from oodjax.train.schedules import make_optimizer
from oodjax.train.state import TrainState, create_train_state
from oodjax.vmdls.losses import vmdls_loss
from oodjax.vmdls.model import VMDLSEncoder

PyTree = Any

# The loss hyperparameters that live in the state (one value per ablation variant).
HPARAMS = ("kl_weight", "triplet_weight", "distancing_weight", "triplet_margin",
           "distancing_margin", "s2")


def vmdls_config(latent_dim: int = 16) -> ml_collections.ConfigDict:
  """`config.vmdls` with the paper's defaults (Sec. 3.1) and a CPU-size batch."""
  return ml_collections.ConfigDict(dict(
      latent_dim=latent_dim, classes_per_batch=10, per_class=16, kl_weight=1.0,
      triplet_weight=1.0, distancing_weight=1.0, triplet_margin=0.1,
      distancing_margin=ml_collections.FieldReference(None, field_type=float), s2=0.1,
      kl_start_epoch=1, margin_warmup=ml_collections.FieldReference(None, field_type=tuple),
      reducer="all", normalize=False))


@flax.struct.dataclass
class VMDLSTrainState(TrainState):
  """A TrainState with what the VMDLS step keeps between steps.

  Attributes:
    class_means: [C, d] m(c), the previous epoch's mean of z per class (Sec. 3.1).
    mean_sums: [C, d] this epoch's running sum of z per class.
    mean_counts: [C] this epoch's number of samples per class.
    means_ready: [] bool, whether `class_means` holds a completed epoch's means.
    hparams: {name: [] float32} the loss weights and margins (`HPARAMS`).
  """
  class_means: jax.Array
  mean_sums: jax.Array
  mean_counts: jax.Array
  means_ready: jax.Array
  hparams: dict[str, jax.Array]


def loss_hparams(vc: ml_collections.ConfigDict) -> dict[str, np.float32]:
  """The state's hyperparameters from `config.vmdls` (M_d = d when not given)."""
  margin = vc.distancing_margin if vc.distancing_margin is not None else vc.latent_dim
  values = dict(kl_weight=vc.kl_weight, triplet_weight=vc.triplet_weight,
                distancing_weight=vc.distancing_weight, triplet_margin=vc.triplet_margin,
                distancing_margin=margin, s2=vc.s2)
  for name, value in values.items():
    if not np.isfinite(value) or value < 0 or (name == "s2" and value <= 0):
      raise ValueError(f"config.vmdls.{name} = {value} must be finite and >= 0 (s2 > 0)")
  return {k: np.float32(v) for k, v in values.items()}


def create_vmdls_state(model: VMDLSEncoder, tx: optax.GradientTransformation, rng: jax.Array,
                       sample_input: jax.Array, num_classes: int,
                       hparams: dict[str, Any]) -> VMDLSTrainState:
  """Initial state: the encoder's variables, the optimizer state, no class means yet."""
  base = create_train_state(model, tx, rng, sample_input)
  d = model.latent_dim
  return VMDLSTrainState(
      step=base.step, params=base.params, batch_stats=base.batch_stats,
      opt_state=base.opt_state,
      class_means=jnp.zeros((num_classes, d), jnp.float32),
      mean_sums=jnp.zeros((num_classes, d), jnp.float32),
      mean_counts=jnp.zeros((num_classes,), jnp.float32),
      means_ready=jnp.zeros((), bool),
      hparams={k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()})


def make_vmdls_train_step(model: VMDLSEncoder, tx: optax.GradientTransformation, *,
                          steps_per_epoch: int, kl_start_epoch: int = 1,
                          margin_warmup: tuple[float, float] | None = None,
                          reducer: str = "all", normalize: bool = False):
  """Returns `train_step(state, batch, rng) -> (state, metrics)` for Eq. 7.

  The key for ε and dropout is `fold_in(rng, state.step)`, as in `oodjax.train.step`, so a
  resumed run draws the same noise as an uninterrupted one.
  """
  def train_step(state: VMDLSTrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    eps_rng, dropout_rng = jax.random.split(step_rng)
    labels = batch["label"]  # [B]
    epoch = state.step // steps_per_epoch
    hp = state.hparams
    kl_on = state.means_ready & (epoch >= kl_start_epoch)
    margin_d = hp["distancing_margin"]
    if margin_warmup is not None:
      start, increment = margin_warmup
      margin_d = jnp.minimum(start + increment * epoch.astype(jnp.float32), margin_d)

    def loss_fn(params):
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      (mu, sigma, _), updates = model.apply(
          variables, batch["image"], train=True, method="encode", mutable=["batch_stats"],
          rngs={"dropout": dropout_rng})
      eps = jax.random.normal(eps_rng, mu.shape, mu.dtype)  # [B, d]
      loss, terms = vmdls_loss(
          mu, sigma, eps, labels, state.class_means,
          kl_weight=jnp.where(kl_on, hp["kl_weight"], 0.0),
          triplet_weight=hp["triplet_weight"], distancing_weight=hp["distancing_weight"],
          triplet_margin=hp["triplet_margin"], distancing_margin=margin_d, s2=hp["s2"],
          reducer=reducer, normalize=normalize)
      z = jax.lax.stop_gradient(mu + sigma * eps)  # [B, d] the generator's output
      return loss, (updates.get("batch_stats", state.batch_stats), terms, z)

    (loss, (batch_stats, terms, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # This epoch's per-class sums of z; at the epoch's last step they become m(c).
    one_hot = jax.nn.one_hot(labels, state.class_means.shape[0], dtype=z.dtype)  # [B, C]
    sums = state.mean_sums + one_hot.T @ z  # [C, d]
    counts = state.mean_counts + one_hot.sum(axis=0)  # [C]
    epoch_ends = (state.step + 1) % steps_per_epoch == 0
    # A class not drawn during the epoch keeps its previous mean.
    means = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None],
                      state.class_means)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        class_means=jnp.where(epoch_ends, means, state.class_means),
        mean_sums=jnp.where(epoch_ends, jnp.zeros_like(sums), sums),
        mean_counts=jnp.where(epoch_ends, jnp.zeros_like(counts), counts),
        means_ready=state.means_ready | epoch_ends)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "kl_on": kl_on.astype(jnp.float32), "distancing_margin": margin_d, **terms}
    return new_state, metrics

  return train_step


def _nearest_mean_correct(model: VMDLSEncoder, state: VMDLSTrainState, batch):
  """Counts for the eval accuracy of the nearest class mean in the latent space."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  mu = model.apply(variables, batch["image"], train=False)  # [B, d]
  d2 = jnp.sum((mu[:, None, :] - state.class_means[None]) ** 2, axis=-1)  # [B, C]
  labels = batch["label"]
  valid = labels >= 0
  correct = (jnp.argmin(d2, axis=-1) == labels) & valid
  return {"correct": jnp.sum(correct.astype(jnp.int32)),
          "count": jnp.sum(valid.astype(jnp.int32))}


def vmdls_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.train` with `config.vmdls.train`'s entries over it (VMDLS's own epochs, rate...)."""
  train = ml_collections.ConfigDict(config.train.to_dict())
  overrides = config.vmdls.get("train")
  if overrides:
    unknown = sorted(set(overrides) - set(train))
    if unknown:
      raise ValueError(f"config.vmdls.train has unknown keys {unknown}; known: {sorted(train)}")
    train.update(overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides))
  return train


def check_vmdls_config(config: ml_collections.ConfigDict, train_ds: ImageDataset,
                       mesh) -> None:
  """Every error that would otherwise surface mid-training, raised before it starts."""
  if "vmdls" not in config:
    raise ValueError("config lacks a `vmdls` section; start from oodjax.vmdls.vmdls_config()")
  vc = config.vmdls
  if int(vc.latent_dim) < 1:
    raise ValueError(f"config.vmdls.latent_dim must be >= 1, got {vc.latent_dim}")
  if vc.reducer not in ("all", "nonzero"):
    raise ValueError(f"config.vmdls.reducer must be 'all' or 'nonzero', got {vc.reducer!r}")
  if int(vc.kl_start_epoch) < 1:
    raise ValueError("config.vmdls.kl_start_epoch must be >= 1: before the first epoch ends "
                     "there are no class means for the KL term to pull towards")
  if vc.margin_warmup is not None and len(vc.margin_warmup) != 2:
    raise ValueError(f"config.vmdls.margin_warmup must be (start, increment), got "
                     f"{vc.margin_warmup}")
  loss_hparams(vc)
  check_class_balanced(train_ds, int(vc.classes_per_batch), int(vc.per_class),
                       data_axis_size=shd.data_axis_size(mesh))
  train = vmdls_train_config(config)
  if int(train.num_epochs) < 1:
    raise ValueError(f"the VMDLS num_epochs must be >= 1, got {train.num_epochs}")


def _vmdls_parts(config: ml_collections.ConfigDict, backbone: nn.Module,
                 train_ds: ImageDataset):
  """What `train_vmdls` and `train_vmdls_variants` share: the model, optimizer, batches and
  the (single-run) step, built from a checked config."""
  vc, tc = config.vmdls, vmdls_train_config(config)
  model = VMDLSEncoder(backbone=backbone, latent_dim=int(vc.latent_dim))
  b_c, b_n = int(vc.classes_per_batch), int(vc.per_class)
  steps_per_epoch = max(len(train_ds) // (b_c * b_n), 1)
  tx, schedule = make_optimizer(tc, int(tc.num_epochs) * steps_per_epoch)

  def epoch_batches(epoch, start_batch, sharding):
    return class_balanced_batches(train_ds, b_c, b_n, seed=int(config.seed), epoch=epoch,
                                  start_batch=start_batch, steps_per_epoch=steps_per_epoch,
                                  augment=bool(tc.augment), sharding=sharding)

  step = make_vmdls_train_step(
      model, tx, steps_per_epoch=steps_per_epoch, kl_start_epoch=int(vc.kl_start_epoch),
      margin_warmup=None if vc.margin_warmup is None else tuple(vc.margin_warmup),
      reducer=vc.reducer, normalize=bool(vc.normalize))
  job = Job(init_fn=None, train_step=step, epoch_batches=epoch_batches,
            steps_per_epoch=steps_per_epoch, num_epochs=int(tc.num_epochs),
            batch_size=b_c * b_n, schedule=schedule)
  sample = jnp.zeros((1, *train_ds.image_shape), jnp.float32)
  return model, tx, sample, job


def train_vmdls(config: ml_collections.ConfigDict, workdir: str, *, backbone: nn.Module,
                train_ds: ImageDataset, eval_ds: ImageDataset | None = None,
                progress: bool | None = None, restore_only: bool = False
                ) -> tuple[VMDLSEncoder, VMDLSTrainState, dict[str, Any]]:
  """Trains the VMDLS encoder (backbone + generator) on `train_ds`, resuming if it can.

  Args:
    config: `default_train_config()` plus a `vmdls` section (`vmdls_config()`); its
      `train.batch_size` is ignored: a batch is classes_per_batch x per_class images.
    workdir: checkpoints and metrics.jsonl.
    backbone: a zoo classifier (its head is ignored; g(x) is its penultimate vector).
    train_ds: the in-distribution training set (labels needed).
    eval_ds: optional; evaluated at every checkpoint by the accuracy of the nearest class mean
      of μ (meaningful from the second epoch on).
    progress, restore_only: as in `oodjax.train.classifier.train_classifier`.

  Returns:
    (model, state, summary).
  """
  mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
  check_vmdls_config(config, train_ds, mesh)
  model, tx, sample, job = _vmdls_parts(config, backbone, train_ds)
  hparams = loss_hparams(config.vmdls)

  evaluate = None
  if eval_ds is not None:
    eval_step = jax.jit(functools.partial(_nearest_mean_correct, model))

    # Whole batches split over the mesh like the training batches (the padding, label -1, is
    # not counted), so the same code serves one process or several.
    padded_eval_ds = pad_eval_set(eval_ds, job.batch_size)

    def evaluate(state):
      correct = count = 0
      for batch in batches(padded_eval_ds, job.batch_size, sharding=shd.batch_sharding(mesh)):
        sums = jax.device_get(eval_step(state, batch))
        correct, count = correct + int(sums["correct"]), count + int(sums["count"])
      return {"eval_accuracy": correct / max(count, 1), "eval_count": count}

  job = dataclasses.replace(
      job, evaluate=evaluate,
      init_fn=lambda rng: create_vmdls_state(model, tx, rng, sample, train_ds.num_classes,
                                             hparams))
  state, summary = run_job(job, config, workdir, mesh=mesh, digest=config_hash(config),
                           seed=int(config.seed), progress=progress,
                           restore_only=restore_only)
  return model, state, summary


def autoencoder_config(*, num_epochs: int = 2, batch_size: int = 128,
                       learning_rate: float = 1e-3, seed: int = 0,
                       **train_overrides) -> ml_collections.ConfigDict:
  """A training config for the autoencoder: Adam, constant rate, no weight decay.

  The paper leaves the autoencoder's training to its supplement; the authors' MNIST one uses
  Adam on the mean squared error, as here. Any other `config.train` key may be overridden.
  """
  config = default_train_config()
  config.seed = seed
  config.train.update(dict(num_epochs=num_epochs, batch_size=batch_size, optimizer="adam",
                           learning_rate=learning_rate, weight_decay=0.0, schedule="constant",
                           log_every_steps=50, **train_overrides))
  return config


def train_vmdls_variants(config: ml_collections.ConfigDict, workdir: str, *,
                         backbone: nn.Module, train_ds: ImageDataset,
                         variants: Sequence[Mapping[str, float]],
                         progress: bool | None = None, restore_only: bool = False
                         ) -> tuple[VMDLSEncoder, VMDLSTrainState, dict[str, Any]]:
  """Trains V variants that differ only in loss weights and margins as ONE vmapped program.

  The Table 4 ablation (L_t; L_t + L_d; L_KL + L_t; L_KL + L_t + L_d with two M_d) is one
  state stacked along a leading axis of size V, whose `hparams` differ, and one
  `jax.vmap`ped step: one compile, one pass over the data (every variant sees the same batches
  and the same ε), one checkpoint. Each variant ends where training it alone with the same
  config and seed ends (`tests/test_vmdls_train.py` checks this to 1e-5).

  Args:
    config: as for `train_vmdls`; its `vmdls` section is every variant's base.
    workdir: checkpoints and metrics.jsonl; logged metrics are "NAME/v" per variant v, plus
      "loss", the mean over variants.
    backbone, train_ds: as for `train_vmdls`.
    variants: per variant, overrides of `HPARAMS` entries, e.g.
      [{"kl_weight": 0, "distancing_weight": 0}, {"kl_weight": 0, "distancing_margin": 32}].
    progress, restore_only: as for `train_vmdls`.

  Returns:
    (model, state, summary) with every leaf of `state` stacked [V, ...]; variant v is
    `jax.tree.map(lambda a: a[v], state)`.
  """
  mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
  check_vmdls_config(config, train_ds, mesh)
  if not variants:
    raise ValueError("no variants to train")
  vc = config.vmdls
  base = loss_hparams(vc)
  hparams = []
  for v in variants:
    unknown = sorted(set(v) - set(HPARAMS))
    if unknown:
      raise ValueError(f"variant {dict(v)} sets {unknown}; a variant may set only {HPARAMS}")
    overridden = ml_collections.ConfigDict(vc.to_dict())
    overridden.update({k: float(x) for k, x in v.items()})
    hparams.append({**base, **loss_hparams(overridden)})
  model, tx, sample, job = _vmdls_parts(config, backbone, train_ds)
  stacked_hparams = {k: np.stack([h[k] for h in hparams]) for k in HPARAMS}  # {name: [V]}

  def init_fn(rng):
    # The same initial weights for every variant (the same seed as a run of its own).
    state = create_vmdls_state(model, tx, rng, sample, train_ds.num_classes, base)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(hparams),) + a.shape), state)
    return stacked.replace(hparams={k: jnp.asarray(v) for k, v in stacked_hparams.items()})

  step = jax.vmap(job.train_step, in_axes=(0, None, None))

  def train_step(state, batch, rng):
    state, metrics = step(state, batch, rng)  # metrics {name: [V]}
    flat = {f"{k}/{v}": m[v] for k, m in metrics.items() for v in range(len(hparams))}
    return state, {"loss": jnp.mean(metrics["loss"]), **flat}

  job = dataclasses.replace(job, init_fn=init_fn, train_step=train_step)
  state, summary = run_job(job, config, workdir, mesh=mesh, digest=config_hash(config),
                           seed=int(config.seed), progress=progress,
                           restore_only=restore_only)
  return model, state, summary


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, *,
                      model: ConvAutoencoder, train_ds: ImageDataset,
                      progress: bool | None = None, restore_only: bool = False
                      ) -> tuple[TrainState, dict[str, Any]]:
  """Trains the plain autoencoder of Sec. 3.3 with the mean squared reconstruction error.

  Same loop, checkpoints and config keys (`train`, `mesh`, `checkpoint`, `seed`) as the
  classifier; its own workdir. Labels are not used.
  """
  mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
  tc = config.train
  batch_size = int(tc.batch_size)
  if batch_size > len(train_ds):
    raise ValueError(f"batch size {batch_size} exceeds the {len(train_ds)} training images")
  if batch_size % shd.data_axis_size(mesh):
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{shd.data_axis_size(mesh)} devices of the data axis")
  steps_per_epoch = len(train_ds) // batch_size
  tx, schedule = make_optimizer(tc, int(tc.num_epochs) * steps_per_epoch)
  sample = jnp.zeros((1, *train_ds.image_shape), jnp.float32)

  def train_step(state: TrainState, batch, rng):
    del rng

    def loss_fn(params):
      x = batch["image"]
      x_hat = model.apply({"params": params}, x, train=True)
      return jnp.mean(reconstruction_loss(x, x_hat)) / np.prod(x.shape[1:])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state),
            {"loss": loss, "grad_norm": optax.tree.norm(grads)})

  def epoch_batches(epoch, start_batch, sharding):
    return batches(train_ds, batch_size, seed=int(config.seed), epoch=epoch,
                   start_batch=start_batch, drop_remainder=True, augment=bool(tc.augment),
                   sharding=sharding)

  job = Job(init_fn=lambda rng: create_train_state(model, tx, rng, sample),
            train_step=train_step, epoch_batches=epoch_batches,
            steps_per_epoch=steps_per_epoch, num_epochs=int(tc.num_epochs),
            batch_size=batch_size, schedule=schedule)
  return run_job(job, config, workdir, mesh=mesh, digest=config_hash(config),
                 seed=int(config.seed), progress=progress, restore_only=restore_only)
