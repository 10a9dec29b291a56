"""Class-balanced batches: B_C classes per batch, B_N examples from each (VMDLS Sec. 3.1).

The triplet and distancing losses of VMDLS need every batch to hold several examples of several
classes, so batches are not slices of one shuffled epoch (as in `oodjax.data.batches`) but are
mined: "for each batch we choose B_C classes at random, where B_C in {2, ..., C} [...], and then,
from each such randomly-chosen class we choose B_N examples at random."

    check_class_balanced(train_ds, 5, 8, data_axis_size=mesh.shape["data"])  # before training
    for batch in class_balanced_batches(train_ds, 5, 8, seed=0, epoch=e, sharding=sharding):
      ...  # batch["image"]: [40, H, W, C], batch["label"]: [40], 8 rows of each of 5 classes

Where the paper is silent we chose:

- Classes are drawn uniformly without replacement among the classes that have examples, afresh
  for every batch; a class with no examples is never drawn. The classes of a batch appear in
  increasing label order, each as one contiguous group of B_N rows.
- Within a class, examples come from a per-(seed, epoch, class) shuffle of that class, B_N at a
  time, so a class is not drawn from again before all of it (up to fewer than B_N leftovers) has
  been seen in this epoch. When a shuffle cannot fill another group of B_N it is replaced by a
  fresh shuffle; the n_c mod B_N leftovers of that shuffle are skipped (different ones each time),
  which keeps the B_N rows of one group distinct.
- A class with fewer than B_N examples fills its group by repeating a shuffle of all of its
  examples (each appears floor(B_N / n_c) or ceil(B_N / n_c) times in the group).
- An epoch is `steps_per_epoch` batches, by default N // B, so that about N examples are drawn.
  Every class is equally likely, so on a balanced set each example is seen about once per epoch;
  on an unbalanced set small classes are seen more often than large ones.

Everything is a function of (seed, epoch, batch index): `class_balanced_indices` computes any one
batch directly, and a run resumed at `start_batch` sees exactly the batches an uninterrupted run
would.

References:
  Dinari & Freifeld, Variational- and metric-based deep latent space for out-of-distribution
  detection (VMDLS), UAI 2022, Sec. 3.1.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from oodjax.data.core import (ImageDataset, _check_divisible, _crop_and_flip, local_rows,
                              normalize, place)

# Last entry of the seed lists, so the random streams never coincide with each other or with
# `batches`' augmentation stream ([seed, epoch, batch, 1]).
_CLASS_STREAM = 2
_SHUFFLE_STREAM = 3


def _check(labels: np.ndarray, classes_per_batch: int, per_class: int, data_axis_size: int,
           where: str) -> np.ndarray:
  """Shared validation; returns the sorted classes that have examples, [K'] int."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be a 1-D integer array, got {labels.shape} "
                     f"{labels.dtype}")
  present = np.unique(labels[labels >= 0])  # -1 marks an unlabelled example
  if present.size == 0:
    raise ValueError(f"{where}: has no labels, so class-balanced batches cannot be drawn "
                     "(an unlabelled set, e.g. generated noise, cannot be a training set)")
  if classes_per_batch < 2:
    raise ValueError(f"classes_per_batch must be at least 2 (the triplet loss needs a negative "
                     f"class in every batch), got {classes_per_batch}")
  if per_class < 1:
    raise ValueError(f"per_class must be at least 1, got {per_class}")
  if classes_per_batch > present.size:
    raise ValueError(f"classes_per_batch = {classes_per_batch} but {where} has only "
                     f"{present.size} classes with examples; use at most {present.size}")
  if data_axis_size < 1:
    raise ValueError(f"data_axis_size must be at least 1, got {data_axis_size}")
  batch_size = classes_per_batch * per_class
  if batch_size % data_axis_size:
    raise ValueError(f"batch size classes_per_batch * per_class = {classes_per_batch} * "
                     f"{per_class} = {batch_size} is not divisible by the {data_axis_size} "
                     f"devices of the data axis; choose them so that their product is a "
                     f"multiple of {data_axis_size}")
  return present


def check_class_balanced(dataset: ImageDataset, classes_per_batch: int, per_class: int,
                         data_axis_size: int = 1) -> None:
  """Checks, before any training, that class-balanced batches can be drawn from `dataset`.

  Args:
    dataset: the training set.
    classes_per_batch: B_C, classes per batch.
    per_class: B_N, examples per class in a batch.
    data_axis_size: how many devices the batch dimension is split over (the mesh's data axis).

  Raises:
    ValueError: naming the problem: the set has no labels; B_C < 2; B_N < 1; B_C larger than
      the number of classes with examples (which is given); B = B_C * B_N not divisible by
      `data_axis_size`.
  """
  where = f"dataset {dataset.name!r}" if dataset.name else "dataset"
  _check(dataset.labels, classes_per_batch, per_class, data_axis_size, where)


def _members(labels: np.ndarray, present: np.ndarray) -> dict[int, np.ndarray]:
  """{class: [n_c] positions of its examples, increasing}."""
  order = np.argsort(labels, kind="stable")
  sorted_labels = labels[order]
  starts = np.searchsorted(sorted_labels, present, side="left")
  ends = np.searchsorted(sorted_labels, present, side="right")
  return {int(c): order[s:e] for c, s, e in zip(present, starts, ends)}


def _classes_for_batch(present: np.ndarray, classes_per_batch: int, seed: int, epoch: int,
                       batch_index: int) -> np.ndarray:
  """The B_C classes of one batch, [B_C] int, increasing."""
  rng = np.random.default_rng([seed, epoch, batch_index, _CLASS_STREAM])
  return np.sort(rng.choice(present, classes_per_batch, replace=False))


def _group(members: np.ndarray, per_class: int, seed: int, epoch: int, label: int,
           use: int) -> np.ndarray:
  """Positions of the B_N examples class `label` contributes the `use`-th time it is drawn.

  The class's examples are read B_N at a time from shuffle 0, then shuffle 1, ...; each shuffle
  serves n_c // B_N groups. With n_c < B_N each use gets its own shuffle, repeated to length B_N.
  """
  n = members.size
  groups_per_shuffle = max(n // per_class, 1)
  shuffle, slot = divmod(use, groups_per_shuffle)
  perm = np.random.default_rng([seed, epoch, label, shuffle, _SHUFFLE_STREAM]).permutation(n)
  if n < per_class:
    return members[np.resize(perm, per_class)]  # [B_N], cycles through the shuffle
  return members[perm[slot * per_class:(slot + 1) * per_class]]  # [B_N]


def _batch_positions(members: dict[int, np.ndarray], classes: np.ndarray, uses: np.ndarray,
                     per_class: int, seed: int, epoch: int) -> np.ndarray:
  """[B] positions for `classes`, each read at its use count in `uses` ([K] by label)."""
  return np.concatenate([_group(members[int(c)], per_class, seed, epoch, int(c), int(uses[c]))
                         for c in classes])


def class_balanced_indices(labels, classes_per_batch: int, per_class: int, *, seed: int,
                           epoch: int, batch_index: int) -> np.ndarray:
  """The positions of the examples in one class-balanced batch (VMDLS Sec. 3.1).

  This is the pure core of `class_balanced_batches`: batch `batch_index` of epoch `epoch` is a
  function of (labels, B_C, B_N, seed, epoch, batch_index) only. It replays the class draws of
  the batches before it (cheap: one B_C-of-K' draw each) to know how far into each class's
  shuffle this batch reads. See the module docstring for the sampling rules.

  Args:
    labels: [N] integer labels; negative ones (unlabelled examples) are never drawn.
    classes_per_batch: B_C >= 2.
    per_class: B_N >= 1.
    seed: the run's seed (a non-negative integer).
    epoch: the epoch.
    batch_index: the batch within the epoch, >= 0.

  Returns:
    [B] int64 positions into `labels`, B = B_C * B_N: B_N positions of each of the B_C drawn
    classes, classes in increasing order.

  Raises:
    ValueError: as `check_class_balanced`, or for a negative `batch_index`.
  """
  labels = np.asarray(labels)
  present = _check(labels, classes_per_batch, per_class, 1, "labels")
  if batch_index < 0:
    raise ValueError(f"batch_index must be >= 0, got {batch_index}")
  uses = np.zeros(int(present.max()) + 1, np.int64)  # [K] draws of each class so far
  for b in range(batch_index):
    uses[_classes_for_batch(present, classes_per_batch, seed, epoch, b)] += 1
  classes = _classes_for_batch(present, classes_per_batch, seed, epoch, batch_index)
  return _batch_positions(_members(labels, present), classes, uses, per_class, seed, epoch)


def class_balanced_batches(dataset: ImageDataset, classes_per_batch: int, per_class: int, *,
                           seed: int, epoch: int = 0, start_batch: int = 0,
                           steps_per_epoch: int | None = None, augment: bool = False,
                           sharding: jax.sharding.Sharding | None = None
                           ) -> Iterator[dict[str, jax.Array]]:
  """One epoch of class-balanced batches {"image": [B, H, W, C] float32, "label": [B] int32}.

  Each batch holds B_N = `per_class` examples of each of B_C = `classes_per_batch` classes drawn
  at random (VMDLS Sec. 3.1), rows grouped by class; B = B_C * B_N. Batch b equals the examples
  at `class_balanced_indices(dataset.labels, B_C, B_N, seed=seed, epoch=epoch, batch_index=b)`,
  normalised with the dataset's statistics.

  Args:
    dataset: a labelled training set.
    classes_per_batch: B_C, at least 2 and at most the number of classes with examples.
    per_class: B_N, at least 1.
    seed: the run's seed; with `epoch` and the batch index it fixes every draw.
    epoch: which epoch's draws to use.
    start_batch: skip this many batches of the epoch (for resuming mid-epoch); the batches that
      follow are exactly those of an uninterrupted epoch.
    steps_per_epoch: batches per epoch; None gives max(len(dataset) // B, 1).
    augment: random crop (4-pixel zero padding) + horizontal flip as in `batches`, drawn from
      (seed, epoch, batch index).
    sharding: where to place each batch (as in `batches`), e.g. `NamedSharding(mesh,
      P("data"))`; None places on the default device. B must divide evenly over the devices
      along the batch dimension.

  Returns:
    An iterator over the batches b = start_batch, ..., steps_per_epoch - 1.

  Raises:
    ValueError: at the call, not at the first batch: as `check_class_balanced`, for a
      `steps_per_epoch` < 1 or a negative `start_batch`, or if B cannot be split under
      `sharding`.
  """
  # Not itself a generator, so bad arguments fail here rather than at the first next().
  check_class_balanced(dataset, classes_per_batch, per_class)
  batch_size = classes_per_batch * per_class
  if steps_per_epoch is None:
    steps_per_epoch = max(len(dataset) // batch_size, 1)
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  if sharding is not None:
    _check_divisible(sharding, batch_size, len(dataset), drop_remainder=True)
  return _generate(dataset, classes_per_batch, per_class, seed, epoch, start_batch,
                   steps_per_epoch, augment, sharding)


def _generate(dataset: ImageDataset, classes_per_batch: int, per_class: int, seed: int,
              epoch: int, start_batch: int, steps_per_epoch: int, augment: bool,
              sharding: jax.sharding.Sharding | None) -> Iterator[dict[str, jax.Array]]:
  """The loop of `class_balanced_batches`, on checked arguments."""
  labels = np.asarray(dataset.labels)
  present = np.unique(labels[labels >= 0])
  members = _members(labels, present)
  # Replay the skipped batches' class draws, then keep the use counts as we go: the same
  # numbers `class_balanced_indices` recomputes from scratch for each batch.
  uses = np.zeros(int(present.max()) + 1, np.int64)  # [K]
  for b in range(min(start_batch, steps_per_epoch)):
    uses[_classes_for_batch(present, classes_per_batch, seed, epoch, b)] += 1
  for b in range(start_batch, steps_per_epoch):
    classes = _classes_for_batch(present, classes_per_batch, seed, epoch, b)
    idx = _batch_positions(members, classes, uses, per_class, seed, epoch)  # [B]
    uses[classes] += 1
    rows = local_rows(sharding, idx.size)  # this process's rows of the global batch
    images = dataset.images[idx[rows]]
    if augment:
      images = _crop_and_flip(images, np.random.default_rng([seed, epoch, b, 1]), n=idx.size,
                              rows=rows)
    batch = {"image": normalize(images, dataset.mean, dataset.std),
             "label": labels[idx[rows]].astype(np.int32)}
    yield place(batch, sharding, idx.size)
