"""Supervised training of a classifier: config in, trained state out, resumable.

Config keys read (an `ml_collections.ConfigDict`; start from `default_train_config()`):

  config.seed                    int: parameter init, dropout keys and the data order.
  config.train.num_epochs        int >= 1.
  config.train.batch_size        int: global batch B, a multiple of the mesh's data axis.
  config.train.augment           bool: random crop (4-pixel zero padding) + horizontal flip,
                                 CIFAR-style images only; done on the device inside the
                                 jitted step, keyed by the step (`with_device_input`).
  config.train.optimizer         "sgd" | "adam" | "adamw".
  config.train.learning_rate     float: the peak / initial learning rate.
  config.train.momentum          float (sgd).
  config.train.nesterov          bool (sgd).
  config.train.weight_decay      float: L2 coefficient (decoupled for adamw).
  config.train.schedule          "step" | "cosine" | "constant".
  config.train.lr_drop_at        fractions of training where a "step" schedule drops.
  config.train.lr_drop_factor    float multiplier at each drop, e.g. 0.1.
  config.train.log_every_steps   int >= 1: a metrics line (and progress-bar update) every N.
  config.train.compute_dtype     optional, "float32" (default) or "bfloat16": the training
                                 forward and backward passes compute in bfloat16 on float32
                                 master weights; BatchNorm statistics, logits, softmax and
                                 loss stay float32 (the zoo's `dtype` attribute). Evaluation,
                                 and every detector later, use the float32 model: ODIN's input
                                 perturbation (eps ~ 1e-3) is below bfloat16's resolution near
                                 1 (2**-7), so a bfloat16 forward would round it away.
  config.mesh.shape              e.g. (-1,) (all devices on "data") or (-1, 2).
  config.mesh.axes               e.g. ("data",) or ("data", "model") or ("data", "fsdp").
  config.mesh.param_sharding     optional, "replicated" (default) or "fsdp": parameters and
                                 optimizer state sharded over the "fsdp" axis
                                 (`sharding.param_rule`); the batch is split over "data" and
                                 "fsdp". The trainer prints the per-device memory.
  config.checkpoint.every_steps  int >= 1: checkpoint (and evaluate) every N steps.
  config.checkpoint.keep         int >= 1: most recent checkpoints kept (plus the best one).
  config.checkpoint.async_save   bool: write checkpoints in a background thread.

Files written under `workdir`:

  checkpoints/    see `oodjax.train.checkpoint` for the layout.
  metrics.jsonl   one JSON object per line: {"kind": "train", "step", "epoch", "loss",
                  "accuracy", "grad_norm", "learning_rate", "images_per_s"} every
                  log_every_steps, and {"kind": "eval", "step", "epoch", "eval_accuracy",
                  "eval_loss", "eval_count"} at every checkpoint. Train values are means over
                  the steps since the previous line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oodjax.data import streaming
from oodjax.data.core import ImageDataset, batches, local_rows, place
from oodjax.data.device_input import prepare_batch
from oodjax.train import sharding as shd
from oodjax.train.loop import Job, run_job
from oodjax.train.schedules import make_optimizer
from oodjax.train.state import TrainState, create_train_state
from oodjax.train.step import (LossFn, make_classification_loss, make_eval_step,
                               make_train_step)

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = {
    "train": ("num_epochs", "batch_size", "augment", "optimizer", "learning_rate", "momentum",
              "nesterov", "weight_decay", "schedule", "lr_drop_at", "lr_drop_factor",
              "log_every_steps"),
    "mesh": ("shape", "axes"),
    "checkpoint": ("every_steps", "keep", "async_save"),
}
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# Options added after runs existed enter the hash only when set away from their default, so
# adding one leaves the hash of every existing run (and its resume) unchanged.
_HASHED_ONLY_IF_SET = {"train": {"compute_dtype": "float32"}}


def default_train_config() -> ml_collections.ConfigDict:
  """`seed`, `train`, `mesh` and `checkpoint` with defaults; experiment configs extend it.

  The defaults are the ODIN / DenseNet recipe's optimizer (SGD, Nesterov 0.9, lr 0.1 dropped
  x10 at 50% and 75%) at a size that runs on a CPU; an experiment sets epochs and batch size.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train = ml_collections.ConfigDict(dict(
      num_epochs=10, batch_size=128, augment=False, optimizer="sgd", learning_rate=0.1,
      momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="step", lr_drop_at=(0.5, 0.75),
      lr_drop_factor=0.1, log_every_steps=50, compute_dtype="float32"))
  config.mesh = ml_collections.ConfigDict(dict(shape=(-1,), axes=("data",),
                                               param_sharding="replicated"))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
  return config


# The config entries that decide what training produces; evaluation settings, the mesh and the
# checkpoint cadence may change between runs of the same training without a warning.
TRAINING_KEYS = ("seed", "dataset", "model", "train_size", "train", "vmdls", "normalization")


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short digest of the training part of a config (`TRAINING_KEYS`), stored with each
  checkpoint, so resuming under a different training config is flagged."""
  full = json.loads(config.to_json())
  for group, defaults in _HASHED_ONLY_IF_SET.items():
    for key, default in defaults.items():
      if full.get(group, {}).get(key, default) == default:
        full.get(group, {}).pop(key, None)
  text = json.dumps({k: full[k] for k in TRAINING_KEYS if k in full}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _validate(config, model, train_ds: ImageDataset | streaming.StreamedDataset,
              eval_ds: ImageDataset | None,
              mesh) -> None:
  """Raises ValueError on anything that would fail (or silently go wrong) later."""
  missing = [f"{group}.{key}" for group, keys in _REQUIRED_KEYS.items()
             for key in keys if group not in config or key not in config[group]]
  if "seed" not in config:
    missing.append("seed")
  if missing:
    raise ValueError(f"config lacks {missing}; start from default_train_config()")
  tc = config.train
  for name, value in [("train.num_epochs", tc.num_epochs), ("train.batch_size", tc.batch_size),
                      ("train.log_every_steps", tc.log_every_steps),
                      ("checkpoint.every_steps", config.checkpoint.every_steps),
                      ("checkpoint.keep", config.checkpoint.keep)]:
    if int(value) < 1:
      raise ValueError(f"config.{name} must be >= 1, got {value}")
  if tc.batch_size > len(train_ds):
    raise ValueError(f"batch size {tc.batch_size} exceeds the {len(train_ds)} training "
                     f"examples of {train_ds.name!r}")
  shards = shd.data_axis_size(mesh)
  if tc.batch_size % shards:
    raise ValueError(f"batch size {tc.batch_size} is not divisible by the {shards} devices of "
                     f"the data axis of mesh {dict(mesh.shape)}")
  num_classes = train_ds.num_classes
  if num_classes < 2:
    raise ValueError(f"{train_ds.name!r} has {num_classes} classes; a classifier needs >= 2")
  in_memory = [ds for ds in (train_ds, eval_ds) if isinstance(ds, ImageDataset)]
  for ds in in_memory:  # a streamed set is read batch by batch: nothing to check up front
    if ds.images.ndim != 4 or ds.images.dtype != np.uint8:
      raise ValueError(f"{ds.name!r}: images must be [N, H, W, C] uint8, got "
                       f"{ds.images.shape} {ds.images.dtype}")
    if ds.labels.shape != (len(ds),):
      raise ValueError(f"{ds.name!r}: labels {ds.labels.shape} do not match {len(ds)} images")
    if len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= num_classes):
      raise ValueError(f"{ds.name!r}: labels span [{ds.labels.min()}, {ds.labels.max()}], "
                       f"outside [0, {num_classes}) of the training classes")
  if eval_ds is not None:
    if eval_ds.image_shape != train_ds.image_shape:
      raise ValueError(f"eval images {eval_ds.image_shape} differ from training images "
                       f"{train_ds.image_shape}")
    if len(eval_ds) == 0:
      raise ValueError(f"eval set {eval_ds.name!r} is empty")
  # Tracing only: catches a model whose head has the wrong number of classes.
  sample = jax.ShapeDtypeStruct((1, *train_ds.image_shape), jnp.float32)
  logits = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], sample)
  if logits.shape != (1, num_classes):
    raise ValueError(f"the model maps one image to logits {logits.shape}, expected "
                     f"(1, {num_classes}) for the classes of {train_ds.name!r}")


def pad_eval_set(eval_ds: ImageDataset, batch_size: int) -> ImageDataset:
  """The eval set padded with label -1 to whole batches.

  Every batch then has the same, shardable shape (one compilation), and `make_eval_step`
  ignores the padding.
  """
  padded = eval_ds.take(shd.pad_to_batches(len(eval_ds), batch_size))
  labels = padded.labels.astype(np.int32)  # a copy: the caller's labels stay untouched
  labels[len(eval_ds):] = -1
  return dataclasses.replace(padded, labels=labels)


def _evaluate(eval_step, state, padded_eval_ds: ImageDataset, batch_size: int,
              batch_sharding) -> dict[str, float]:
  """Accuracy and mean loss over a set padded by `pad_eval_set`."""
  totals = None
  for batch in batches(padded_eval_ds, batch_size, sharding=batch_sharding, uint8=True):
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  return {"eval_accuracy": float(totals["correct"]) / count,
          "eval_loss": float(totals["loss_sum"]) / count, "eval_count": count}


def _streamed_epoch(dataset: streaming.StreamedDataset, batch_size: int, seed: int, epoch: int,
                    start_step: int, sharding):
  """One epoch of a streamed set from global step `start_step` on, as placed global batches:
  this process reads only its rows of each (`streaming.stream_batches`' shards)."""
  rows = local_rows(sharding, batch_size)
  local = rows.stop - rows.start
  if rows.start % local:
    raise ValueError(f"this process holds rows {rows} of each batch, not a whole shard")
  stream = streaming.stream_batches(
      dataset.source, batch_size, seed=seed, shard_index=rows.start // local,
      shard_count=batch_size // local, num_epochs=epoch + 1,
      state=streaming.state_at(start_step, seed=seed, batch_size=batch_size,
                               num_records=len(dataset)),
      image_key=dataset.image_key, label_key=dataset.label_key)
  with stream:
    for batch in stream:
      yield place(batch, sharding, batch_size)


def with_device_input(loss_fn: LossFn, dataset: ImageDataset, *, augment: bool) -> LossFn:
  """`loss_fn` on uint8 batches: it first augments (when `augment`) and normalises them with
  `dataset`'s statistics, inside the jitted step (`device_input.prepare_batch`).

  The augmentation key is `fold_in(rng, 1)` of the step's key `rng`, whose own use (dropout)
  is unchanged; both depend only on (seed, step), so a resumed run crops as an uninterrupted
  one, and so does a run on another number of processes.
  """
  def loss(params, batch_stats, batch, rng):
    batch = prepare_batch(batch, jax.random.fold_in(rng, 1), mean=dataset.mean, std=dataset.std,
                          augment=augment)
    return loss_fn(params, batch_stats, batch, rng)

  return loss


def _compute_model(model: nn.Module, compute_dtype: str) -> nn.Module:
  """The model the training step runs: `model` itself, or its clone computing in bfloat16."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
                     f"{compute_dtype!r}")
  if COMPUTE_DTYPES[compute_dtype] is None:
    return model
  if not any(f.name == "dtype" for f in dataclasses.fields(model)):
    raise ValueError(f"train.compute_dtype={compute_dtype!r} needs a model with a `dtype` "
                     f"attribute (every zoo model has one); {type(model).__name__} has none")
  return model.clone(dtype=COMPUTE_DTYPES[compute_dtype])


def train_classifier(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                     model: nn.Module, train_ds: ImageDataset | streaming.StreamedDataset,
                     eval_ds: ImageDataset | None = None, progress: bool | None = None,
                     restore_only: bool = False) -> tuple[TrainState, dict[str, Any]]:
  """Trains `model` on `train_ds` with softmax cross-entropy, resuming if it can.

  Running the same call again after an interruption resumes from the newest readable
  checkpoint in `workdir/checkpoints`; the data order depends only on (seed, epoch) and the
  step's dropout key only on (seed, step), so the resumed run ends with the same parameters
  as an uninterrupted one. If the run had already finished, the final state is restored and
  returned without training.

  Args:
    config: see the module docstring for the keys read.
    workdir: directory for checkpoints and metrics.jsonl (created if missing).
    model: a Linen classifier, `model.apply(variables, x, train=...) -> [B, K]` logits with
      K = train_ds.num_classes.
    train_ds: the training set; full batches only (the last partial batch of an epoch is
      dropped, reshuffled into the next epoch). A `streaming.StreamedDataset` (e.g.
      `streaming.stream_tfds("imagenet2012", data_dir=...)`) is read batch by batch instead of
      held in memory, in the same order; its iterator state is saved with each checkpoint.
    eval_ds: evaluated at every checkpoint and at the end; optional.
    progress: show a tqdm progress bar; None shows it when stderr is a terminal.
    restore_only: only restore a finished run (for `oodjax evaluate`); a workdir without one
      is a ValueError instead of the start of a training run.

  Returns:
    (state, summary) with state the final TrainState (replicated over the mesh, also after
    FSDP training) and summary {"step", "total_steps", "steps_per_epoch", "resumed_from"
    (step or None), "already_finished", "eval" (last eval dict or None), "best_step",
    "train_seconds", and "memory" when steps ran (`sharding.memory_report`)}.
  """
  mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
  _validate(config, model, train_ds, eval_ds, mesh)
  tc = config.train
  # Both raise on an unknown setting, before anything is computed.
  rule = shd.param_rule(config.mesh.get("param_sharding", "replicated"), mesh)
  train_model = _compute_model(model, tc.get("compute_dtype", "float32"))
  batch_size = int(tc.batch_size)
  streamed = isinstance(train_ds, streaming.StreamedDataset)
  steps_per_epoch = len(train_ds) // batch_size
  tx, schedule = make_optimizer(tc, int(tc.num_epochs) * steps_per_epoch)
  sample = jnp.zeros((1, *train_ds.image_shape), jnp.float32)

  # uint8 batches go to the devices; the step crops, flips and normalises them itself.
  def epoch_batches(epoch, start_batch, sharding):
    if streamed:
      return _streamed_epoch(train_ds, batch_size, int(config.seed), epoch,
                             epoch * steps_per_epoch + start_batch, sharding)
    return batches(train_ds, batch_size, seed=int(config.seed), epoch=epoch,
                   start_batch=start_batch, drop_remainder=True, sharding=sharding, uint8=True)

  data_state = None
  if streamed:  # its iterator state goes into every checkpoint, and is checked on resuming
    def data_state(step):
      return streaming.state_at(step, seed=int(config.seed), batch_size=batch_size,
                                num_records=len(train_ds))

  loss_fn = with_device_input(make_classification_loss(train_model.apply), train_ds,
                              augment=bool(tc.augment))
  evaluate = None
  if eval_ds is not None:
    padded_eval_ds = pad_eval_set(eval_ds, batch_size)
    plain_eval_step = make_eval_step(model.apply)
    eval_step = jax.jit(lambda state, batch: plain_eval_step(
        state, prepare_batch(batch, None, mean=eval_ds.mean, std=eval_ds.std, augment=False)))

    def evaluate(state):
      return _evaluate(eval_step, state, padded_eval_ds, batch_size,
                       shd.batch_sharding(mesh))

  job = Job(init_fn=lambda rng: create_train_state(model, tx, rng, sample),
            train_step=make_train_step(loss_fn, tx),
            epoch_batches=epoch_batches, steps_per_epoch=steps_per_epoch,
            num_epochs=int(tc.num_epochs), batch_size=batch_size, schedule=schedule,
            evaluate=evaluate,
            state_shardings=lambda abstract: shd.state_sharding(abstract, mesh, rule),
            data_state=data_state)
  state, summary = run_job(job, config, workdir, mesh=mesh, digest=config_hash(config),
                           seed=int(config.seed), progress=progress, restore_only=restore_only)
  if rule is not None:  # what evaluation and the detectors take: whole parameters per device
    state = jax.device_put(state, shd.state_sharding(state, mesh))
  return state, summary
