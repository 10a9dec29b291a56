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


def batches(dataset: ImageDataset, batch_size: int, *, seed: int | None = None,
            epoch: int = 0, start_batch: int = 0, drop_remainder: bool = False,
            augment: bool = False, sharding: jax.sharding.Sharding | None = None
            ) -> Iterator[dict[str, jax.Array]]:
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
    sharding: where to place each batch (e.g. a NamedSharding over the data axis of a mesh);
      None places on the default device.
  """
  n = len(dataset)
  order = (np.random.default_rng([seed, epoch]).permutation(n) if seed is not None
           else np.arange(n))
  num_batches = n // batch_size if drop_remainder else -(-n // batch_size)
  for b in range(start_batch, num_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    images = dataset.images[idx]
    if augment:
      images = _crop_and_flip(images, np.random.default_rng([seed or 0, epoch, b, 1]))
    batch = {"image": normalize(images, dataset.mean, dataset.std),
             "label": dataset.labels[idx].astype(np.int32)}
    yield jax.device_put(batch, sharding) if sharding is not None else jax.device_put(batch)


def _crop_and_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crop from a zero-padded image and random horizontal flip, per image."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  out = np.empty_like(images)
  for i in range(n):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out
