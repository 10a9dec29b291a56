"""The one in-memory representation of image data, and the batch iterator over it.

Every source (embedded arrays, TFDS array_record, image folders, generated noise) returns an
`ImageDataset`: uint8 NHWC images, int32 labels, the per-channel normalisation statistics of the
dataset the model was trained on, and class names. Models take normalised float inputs; the
normalisation happens per batch, so a 60k-image set stays uint8 in memory.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An image classification dataset held in host memory.

  Attributes:
    images: [N, H, W, C] uint8.
    labels: [N] int32, in [0, len(class_names)); -1 for unlabelled sets (generated noise).
    mean: per-channel mean of the pixel values scaled to [0, 1], length C.
    std: per-channel standard deviation of the pixel values scaled to [0, 1], length C.
    class_names: names of the classes; empty for unlabelled sets.
    name: the name it was loaded under, e.g. "embedded/fashion_mnist".
  """
  images: np.ndarray
  labels: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  name: str = ""

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])  # (H, W, C)

  def take(self, index) -> "ImageDataset":
    """Returns the subset at `index` (a slice, or an integer array of positions)."""
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

  def with_stats(self, mean, std) -> "ImageDataset":
    """Returns the same images carrying other normalisation statistics (an OOD set is
    normalised with the in-distribution statistics the model was trained with)."""
    return dataclasses.replace(self, mean=tuple(float(m) for m in mean),
                               std=tuple(float(s) for s in std))


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Maps uint8 images [..., C] to float32 (images / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 images on the [0, 1] pixel scale.

  Args:
    images: [N, H, W, C] uint8.

  Returns:
    (mean, std), each a tuple of C floats, accumulated in float64.
  """
  # Per channel so a 50k x 32 x 32 x 3 set never needs a float64 copy of all channels at once.
  mean, std = [], []
  for c in range(images.shape[-1]):
    x = images[..., c].astype(np.float64) / 255.0
    mean.append(float(x.mean()))
    std.append(float(x.std()))
  return tuple(mean), tuple(std)


def validate(dataset: ImageDataset, *, require_labels: bool = False) -> ImageDataset:
  """Checks that `dataset` is well formed; returns it unchanged so calls can be chained.

  Args:
    dataset: the dataset to check.
    require_labels: also fail when the set is unlabelled (labels of -1), as training needs.

  Raises:
    ValueError: naming the first problem found: images not uint8 or not [N, H, W, C] with C in
      {1, 3}; no images; labels not [N] integers; labels outside [0, K) (or -1 everywhere for an
      unlabelled set); mean/std of the wrong length, not finite, or std <= 0.
  """
  images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
  where = f"dataset {dataset.name!r}" if dataset.name else "dataset"
  if images.dtype != np.uint8:
    raise ValueError(f"{where}: images must be uint8, got {images.dtype} "
                     "(use from_arrays to convert float images in [0, 1])")
  if images.ndim != 4:
    raise ValueError(f"{where}: images must be [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f"{where}: images must have 1 or 3 channels, got {c} (shape {images.shape})")
  if n == 0 or h == 0 or w == 0:
    raise ValueError(f"{where}: is empty (images shape {images.shape})")
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be [N] = [{n}] integers, got {labels.shape} "
                     f"{labels.dtype}")
  k = len(dataset.class_names)
  if k == 0:
    if require_labels:
      raise ValueError(f"{where}: has no labels (no class names) but labels are required")
    if np.any(labels != -1):
      raise ValueError(f"{where}: has no class names, so every label must be -1")
  else:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
      raise ValueError(f"{where}: labels must lie in [0, {k}) for {k} classes, "
                       f"found values in [{lo}, {hi}]")
  for stat in ("mean", "std"):
    value = np.asarray(getattr(dataset, stat), np.float64)
    if value.shape != (c,):
      raise ValueError(f"{where}: {stat} must have one value per channel ({c}), got {value.shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{where}: {stat} must be finite, got {tuple(value)}")
  if np.any(np.asarray(dataset.std) <= 0):
    raise ValueError(f"{where}: std must be > 0, got {tuple(dataset.std)}")
  return dataset


def check_compatible(id_ds: ImageDataset, ood_ds: ImageDataset) -> None:
  """Checks that an OOD set can be fed to a model trained on `id_ds`.

  Raises:
    ValueError: if image height, width or channel count differ. (The statistics are not
      compared: attach the ID ones to the OOD set with `ood_ds.with_stats(id_ds.mean, id_ds.std)`.)
  """
  if id_ds.image_shape != ood_ds.image_shape:
    raise ValueError(
        f"OOD set {ood_ds.name!r} has images of shape (H, W, C) = {ood_ds.image_shape} but the "
        f"in-distribution set {id_ds.name!r} has {id_ds.image_shape}; resize or convert the OOD "
        "images first (e.g. folder/... loaders take size=, the model sees one input shape)")


def from_arrays(images, labels=None, *, class_names=(), mean=None, std=None,
                name: str = "") -> ImageDataset:
  """Builds a validated `ImageDataset` from user arrays.

  Args:
    images: [N, H, W, C] (or [N, H, W], taken as C = 1) uint8 in [0, 255], or floating point
      in [0, 1], which is quantised with round(x * 255).
    labels: [N] integers in [0, len(class_names)); None for an unlabelled set (all -1).
    class_names: names of the K classes; empty for an unlabelled set.
    mean, std: per-channel statistics on the [0, 1] scale; None computes them from `images`.
    name: a name for messages.

  Raises:
    ValueError: for float images with NaN/Inf or values outside [0, 1], integer images that are
      not uint8, or anything `validate` rejects.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if np.issubdtype(images.dtype, np.floating):
    if not np.all(np.isfinite(images)):
      raise ValueError(f"{name or 'images'}: float images contain NaN or Inf")
    if images.size and (images.min() < 0 or images.max() > 1):
      raise ValueError(f"{name or 'images'}: float images must lie in [0, 1], found "
                       f"[{images.min()}, {images.max()}]")
    images = np.rint(images * 255.0).astype(np.uint8)
  elif images.dtype != np.uint8:
    raise ValueError(f"{name or 'images'}: images must be uint8 or float in [0, 1], got "
                     f"{images.dtype}")
  n = images.shape[0] if images.ndim else 0
  if labels is None:
    labels = np.full((n,), -1, np.int32)
  else:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name or 'labels'}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int32)
  if images.ndim == 4 and images.size and (mean is None or std is None):
    stats = channel_stats(images)
    mean = stats[0] if mean is None else mean
    std = stats[1] if std is None else std
  ds = ImageDataset(images=images, labels=labels,
                    mean=tuple(float(m) for m in np.atleast_1d(mean if mean is not None else ())),
                    std=tuple(float(s) for s in np.atleast_1d(std if std is not None else ())),
                    class_names=tuple(class_names), name=name)
  return validate(ds)


def batches(dataset: ImageDataset, batch_size: int, *, seed: int | None = None,
            epoch: int = 0, start_batch: int = 0, drop_remainder: bool = False,
            augment: bool = False, sharding: jax.sharding.Sharding | None = None,
            uint8: bool = False) -> Iterator[dict[str, jax.Array]]:
  """Yields normalised batches {"image": [B, H, W, C] float32, "label": [B] int32}.

  Args:
    dataset: the images to iterate over.
    batch_size: B.
    seed: None iterates in order; an integer shuffles with a permutation that depends only on
      (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
    epoch: which epoch's permutation (and augmentation draws) to use.
    start_batch: skip this many batches of the epoch (for resuming mid-epoch).
    drop_remainder: drop a final batch smaller than B (training wants fixed shapes).
    augment: random crop (4-pixel zero padding) + horizontal flip, drawn from (seed, epoch,
      batch index). Meant for CIFAR-size natural images, not for digits or silhouettes.
    sharding: where to place each batch, e.g. `NamedSharding(mesh, P("data"))` to split the
      batch dimension over the mesh's data axis; None places on the default device. The batch
      size (and the final partial batch, unless dropped) must divide evenly over the devices
      along the batch dimension. In a multi-process run each process builds and transfers
      only its own rows of every batch (`local_rows`); the batches are the same.
    uint8: yield the images as stored, [B, H, W, C] uint8, a quarter of the bytes; the jitted
      step normalises (and augments) them on the device (`oodjax.data.device_input`).

  Raises:
    ValueError: if a batch cannot be split evenly under `sharding`, or for `uint8` with
      `augment` (uint8 batches are augmented on the device).
  """
  n = len(dataset)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if uint8 and augment:
    raise ValueError("uint8 batches are augmented on the device (device_input.prepare_batch), "
                     "not here: pass augment=False with uint8=True")
  if sharding is not None:
    _check_divisible(sharding, batch_size, n, drop_remainder)
  order = (np.random.default_rng([seed, epoch]).permutation(n) if seed is not None
           else np.arange(n))
  num_batches = n // batch_size if drop_remainder else -(-n // batch_size)
  for b in range(start_batch, num_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]  # the global batch
    rows = local_rows(sharding, idx.size)  # this process's part of it (all of it, usually)
    images = dataset.images[idx[rows]]
    if augment:  # drawn for the whole batch, so a row's crop does not depend on the processes
      images = _crop_and_flip(images, np.random.default_rng([seed or 0, epoch, b, 1]),
                              n=idx.size, rows=rows)
    batch = {"image": images if uint8 else normalize(images, dataset.mean, dataset.std),
             "label": dataset.labels[idx[rows]].astype(np.int32)}
    yield place(batch, sharding, idx.size)


def local_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> slice:
  """The rows of a global batch of `batch_size` that this process's devices hold.

  With one process that is every row. In a multi-process run (`oodjax.train.distributed`) a
  batch split over the mesh's data axis lives partly on each process; each process gathers,
  augments and transfers only its own rows, which `place` assembles into the global array.

  Raises:
    ValueError: if this process's rows are not one contiguous block (a mesh whose data axis
      interleaves the processes' devices).
  """
  if sharding is None or jax.process_count() == 1:
    return slice(0, batch_size)
  spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((batch_size,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(spans)} of each batch, "
                     "not one block; order the mesh's devices by process (jax.make_mesh does)")
  return slice(lo, hi)


def place(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding | None,
          batch_size: int) -> dict[str, jax.Array]:
  """Puts a host batch on the devices: `batch` holds the `local_rows(sharding, batch_size)`
  of a global batch of `batch_size` rows (all of them with one process).

  Args:
    batch: {name: [b, ...] numpy array}, b the number of local rows.
    sharding: the batch sharding; None places on the default device.
    batch_size: rows of the global batch.

  Returns:
    {name: [batch_size, ...] jax.Array} under `sharding`.
  """
  if sharding is None:
    return jax.device_put(batch)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in batch.items()}


def _check_divisible(sharding: jax.sharding.Sharding, batch_size: int, n: int,
                     drop_remainder: bool) -> None:
  """Raises a readable error where device_put would fail on an uneven batch split."""
  # How many pieces the batch dimension is cut into: probe with a length that every
  # partition count divides (the number of devices).
  num_devices = len(sharding.device_set)
  parts = num_devices // sharding.shard_shape((num_devices,))[0]
  if batch_size % parts:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {parts} devices the batch "
                     f"dimension is sharded over; use a multiple of {parts}")
  last = n % batch_size
  if not drop_remainder and last % parts:
    raise ValueError(f"the last batch has {last} examples ({n} % {batch_size}), which cannot be "
                     f"split over {parts} devices; pass drop_remainder=True or change batch_size")


def _crop_and_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, *,
                   n: int | None = None, rows: slice | None = None) -> np.ndarray:
  """Random crop from a zero-padded image and random horizontal flip, per image.

  The draws are made for a batch of `n` images (default: all of `images`), of which `images`
  are the `rows`: the same image gets the same crop whichever process augments it.
  """
  _, h, w, _ = images.shape
  n = images.shape[0] if n is None else n
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  if rows is not None:
    dy, dx, flip = dy[rows], dx[rows], flip[rows]
  out = np.empty_like(images)
  for i in range(images.shape[0]):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out
