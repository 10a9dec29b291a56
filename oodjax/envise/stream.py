"""The image-stream simulator: a deployed camera whose class mix changes from scenario to scenario.

    stream = make_stream(train, [EMBEDDED_SCENARIOS["zoo"], EMBEDDED_SCENARIOS["shop"]],
                         images_per_scenario=4000, batch_size=10, seed=0)
    for batch in iterate(stream):            # stream.num_steps batches
      batch["image"]     # [B, H, W, C] float32, augmented, normalised with the dataset's mean/std
      batch["label"]     # [B] int32 true class (for evaluation only: the student never sees it)
      batch["inlier"]    # [B] bool, the class is an inlier of the current scenario
      batch["scenario"]  # [B] int32 index into the scenario sequence

Each image is drawn i.i.d.: a class from the current scenario's probabilities
(`scenarios.class_probabilities`), then an image of that class uniformly from the dataset (with
replacement), then a random centre crop and a rotation (Sec. 4 of the paper: "we random center
crop and randomly rotate the image stream between [-15, 15] degrees"). Scenario s lasts
images_per_scenario[s] / B steps, after which the next one starts. The paper's Figure 3 keeps a
scenario for 40 epochs; pass `epochs_per_scenario=40, epoch_size=...` for that. Its adaptive phase
sees inlier images only: give the phases as scenarios, e.g.
[inliers_only(C1), C1, inliers_only(C2), C2] with 10 and 30 epochs (`batch["scenario"]` then
counts phases).

Reproducible and resumable: the batch at global step t is a pure function of (dataset,
scenarios, sizes, seed, t); its randomness comes from `fold_in(key(seed), t)` and nothing is
carried from one batch to the next. To resume after step t, rebuild the stream with the same
arguments and call `iterate(stream, start_step=t + 1)`: the batches are bit-identical to those of
an uninterrupted run. Only the step index needs checkpointing.

The augmentation (`rotate_crop`, `augment_batch`) is one affine resampling per image, vmapped over
the batch and jitted with the sampling: bilinear interpolation via
`jax.scipy.ndimage.map_coordinates`. Conventions:
  * Coordinates are pixel centres; the image centre is ((H - 1) / 2, (W - 1) / 2).
  * Crop fraction s in (0, 1]: the central (s H) x (s W) window, resized back to H x W (output
    pixel centres spread evenly over the window, as a half-pixel-centre resize does).
  * Angle a in degrees: a > 0 turns the content COUNTER-CLOCKWISE as displayed with row 0 at the
    top, so a = 90 on a square image gives `np.rot90(image)` (up to float rounding).
  * Points that fall outside the image read `fill` (0: black, before normalisation). With
    s <= 1 / (cos 15 + sin 15) ~ 0.816 no rotation of at most 15 degrees reaches outside.
  * The paper gives no crop range: we draw s ~ U[0.8, 1.0] (our choice) and a ~ U[-15, 15].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from oodjax.data.core import ImageDataset, validate as validate_dataset
from oodjax.envise import scenarios as scenarios_lib
from oodjax.envise.scenarios import Scenario

DEFAULT_CROP_RANGE = (0.8, 1.0)
DEFAULT_MAX_ANGLE = 15.0  # degrees (paper, Sec. 4)


@dataclasses.dataclass(frozen=True)
class ImageStream:
  """Everything that determines the stream (build it with `make_stream`).

  Attributes:
    images: [N, H, W, C] uint8, on the default device.
    labels: [N] int32 on the host.
    members: [K, M] int32; members[k, :counts[k]] are the positions of class k's images
      (M = the largest class; the rest is padding).
    counts: [K] int32 images per class.
    probabilities: [S, K] float32 class probabilities of each scenario.
    inlier_table: [S, K] bool, class k is an inlier of scenario s.
    steps_per_scenario: S step counts (batches).
    batch_size: B.
    seed: the stream's seed.
    mean, std: the dataset's per-channel statistics (normalisation of the output images).
    crop_range: (lo, hi), crop fractions drawn from U[lo, hi].
    max_angle: angles drawn from U[-max_angle, max_angle] degrees.
    augment: False turns cropping and rotation off (angle 0, crop 1).
    scenarios: the S scenarios.
    class_names: the dataset's K class names.
  """
  images: jax.Array
  labels: np.ndarray
  members: jax.Array
  counts: jax.Array
  probabilities: jax.Array
  inlier_table: jax.Array
  steps_per_scenario: tuple[int, ...]
  batch_size: int
  seed: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_range: tuple[float, float]
  max_angle: float
  augment: bool
  scenarios: tuple[Scenario, ...]
  class_names: tuple[str, ...]

  @property
  def num_steps(self) -> int:
    """Total number of batches over all scenarios."""
    return int(sum(self.steps_per_scenario))

  def first_step(self, scenario_index: int) -> int:
    """The global step at which scenario `scenario_index` starts."""
    return int(sum(self.steps_per_scenario[:scenario_index]))

  def scenario_at(self, step: int) -> int:
    """Index of the scenario that step `step` belongs to."""
    if not 0 <= step < self.num_steps:
      raise ValueError(f"step {step} is outside the stream's {self.num_steps} steps")
    ends = np.cumsum(self.steps_per_scenario)
    return int(np.searchsorted(ends, step, side="right"))


def make_stream(dataset: ImageDataset, scenarios: Sequence[Scenario], *,
                images_per_scenario: int | Sequence[int] | None = None,
                epochs_per_scenario: int | Sequence[int] | None = None,
                epoch_size: int | Sequence[int] | None = None,
                batch_size: int = 10, seed: int = 0,
                crop_range: tuple[float, float] = DEFAULT_CROP_RANGE,
                max_angle: float = DEFAULT_MAX_ANGLE, augment: bool = True) -> ImageStream:
  """Builds a stream over `dataset` that plays `scenarios` one after the other.

  Give the length of each scenario either as `images_per_scenario`, or as
  `epochs_per_scenario` x `epoch_size` images (e.g. the paper's 40 epochs of Table 1's
  "# IL train" images). Each may be one number for all scenarios or one per scenario; every
  scenario's image count must be a positive multiple of `batch_size`, so batches never straddle
  a scenario change and all have B images.

  Args:
    dataset: a labelled ImageDataset (training or test split of the teacher's classes).
    scenarios: S >= 1 scenarios, validated against `dataset.class_names`.
    images_per_scenario: images of each scenario.
    epochs_per_scenario: epochs of each scenario (with `epoch_size`).
    epoch_size: images per epoch (with `epochs_per_scenario`).
    batch_size: B (the paper: 10).
    seed: the seed of every draw.
    crop_range: (lo, hi) with 0 < lo <= hi <= 1.
    max_angle: in degrees, in [0, 180].
    augment: False: no crop, no rotation.

  Returns:
    The ImageStream; `dataset.images` is copied to the default device once.

  Raises:
    ValueError: for an unlabelled dataset, no scenarios, an invalid scenario (see
      `scenarios.validate`), a class with positive probability but no images, a bad length
      specification, batch size, crop range or angle.
  """
  validate_dataset(dataset, require_labels=True)
  scenarios = tuple(scenarios)
  if not scenarios:
    raise ValueError("need at least one scenario")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  lo, hi = (float(v) for v in crop_range)
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"crop_range must satisfy 0 < lo <= hi <= 1, got {crop_range}")
  if not 0.0 <= float(max_angle) <= 180.0:
    raise ValueError(f"max_angle must be in [0, 180] degrees, got {max_angle}")
  sizes = _scenario_sizes(len(scenarios), images_per_scenario, epochs_per_scenario, epoch_size)
  for s, n in zip(scenarios, sizes):
    if n <= 0 or n % batch_size:
      raise ValueError(f"scenario {s.name!r}: {n} images is not a positive multiple of "
                       f"batch_size {batch_size}; change the length or the batch size")

  names = tuple(dataset.class_names)
  labels = np.asarray(dataset.labels, np.int32)
  counts = np.bincount(labels, minlength=len(names)).astype(np.int32)  # [K]
  probabilities = np.stack([scenarios_lib.class_probabilities(s, names) for s in scenarios])
  for s, p in zip(scenarios, probabilities):
    empty = [names[k] for k in np.flatnonzero((p > 0) & (counts == 0))]
    if empty:
      raise ValueError(f"scenario {s.name!r}: classes {empty} have positive probability but no "
                       f"images in dataset {dataset.name!r}")
  members = np.zeros((len(names), max(int(counts.max()), 1)), np.int32)  # [K, M]
  for k in range(len(names)):
    where = np.flatnonzero(labels == k)
    members[k, :len(where)] = where
  inlier_table = np.stack([scenarios_lib.inlier_mask(s, names) for s in scenarios])  # [S, K]
  return ImageStream(
      images=jax.device_put(np.asarray(dataset.images)), labels=labels,
      members=jnp.asarray(members), counts=jnp.asarray(counts),
      probabilities=jnp.asarray(probabilities, jnp.float32),
      inlier_table=jnp.asarray(inlier_table),
      steps_per_scenario=tuple(n // batch_size for n in sizes),
      batch_size=int(batch_size), seed=int(seed), mean=tuple(dataset.mean),
      std=tuple(dataset.std), crop_range=(lo, hi), max_angle=float(max_angle),
      augment=bool(augment), scenarios=scenarios, class_names=names)


def _scenario_sizes(num: int, images, epochs, epoch_size) -> tuple[int, ...]:
  """Images per scenario from either specification."""
  def per_scenario(value, what):
    values = [value] * num if np.ndim(value) == 0 else list(value)
    if len(values) != num or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                     for v in values):
      raise ValueError(f"{what} must be an integer or {num} integers (one per scenario), "
                       f"got {value!r}")
    return [int(v) for v in values]

  if images is not None and (epochs is not None or epoch_size is not None):
    raise ValueError("give images_per_scenario, or epochs_per_scenario with epoch_size, "
                     "not both")
  if images is not None:
    return tuple(per_scenario(images, "images_per_scenario"))
  if epochs is None or epoch_size is None:
    raise ValueError("give images_per_scenario, or both epochs_per_scenario and epoch_size")
  return tuple(e * n for e, n in zip(per_scenario(epochs, "epochs_per_scenario"),
                                     per_scenario(epoch_size, "epoch_size")))


def batch_at(stream: ImageStream, step: int) -> dict[str, jax.Array]:
  """The batch at global step `step` (a pure function of the stream and `step`).

  Returns:
    {"image": [B, H, W, C] float32 (cropped, rotated, then normalised),
     "label": [B] int32 true class, "inlier": [B] bool, "scenario": [B] int32,
     "index": [B] int32 position of the source image in the dataset,
     "angle": [B] float32 degrees, "crop": [B] float32 crop fraction,
     "step": [] int32}.
  """
  scenario = stream.scenario_at(step)
  key = jax.random.fold_in(jax.random.key(stream.seed), step)
  batch = _draw(stream.images, stream.members, stream.counts, stream.probabilities,
                stream.inlier_table, jnp.asarray(stream.mean, jnp.float32),
                jnp.asarray(stream.std, jnp.float32), key, jnp.int32(scenario),
                jnp.float32(stream.crop_range[0]), jnp.float32(stream.crop_range[1]),
                jnp.float32(stream.max_angle), batch_size=stream.batch_size,
                augment=stream.augment)
  return {**batch, "step": jnp.int32(step)}


def iterate(stream: ImageStream, start_step: int = 0,
            stop_step: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Yields `batch_at(stream, t)` for t in [start_step, stop_step) (default: to the end).

  Resuming: `iterate(stream, start_step=t)` yields exactly the batches t, t + 1, ... of
  `iterate(stream)`.
  """
  stop_step = stream.num_steps if stop_step is None else stop_step
  if not 0 <= start_step <= stop_step <= stream.num_steps:
    raise ValueError(f"need 0 <= start_step <= stop_step <= {stream.num_steps}, got "
                     f"start_step={start_step}, stop_step={stop_step}")
  for step in range(start_step, stop_step):
    yield batch_at(stream, step)


@functools.partial(jax.jit, static_argnames=("batch_size", "augment"))
def _draw(images, members, counts, probabilities, inlier_table, mean, std, key, scenario,
          crop_lo, crop_hi, max_angle, *, batch_size: int, augment: bool):
  """One batch: classes, images, augmentation, normalisation (one compiled program for every
  scenario and step of a stream)."""
  k_class, k_image, k_crop, k_angle = jax.random.split(key, 4)
  # log 0 = -inf: classes outside the scenario are never drawn.
  logits = jnp.log(probabilities[scenario])  # [K]
  label = jax.random.categorical(k_class, logits, shape=(batch_size,)).astype(jnp.int32)  # [B]
  n = counts[label]  # [B]
  u = jax.random.uniform(k_image, (batch_size,))
  pos = jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)  # uniform in [0, n)
  index = members[label, pos]  # [B]
  x = images[index].astype(jnp.float32) / 255.0  # [B, H, W, C] in [0, 1]
  if augment:
    crop = jax.random.uniform(k_crop, (batch_size,), minval=crop_lo, maxval=crop_hi)
    angle = jax.random.uniform(k_angle, (batch_size,), minval=-max_angle, maxval=max_angle)
    x = augment_batch(x, angle, crop)
  else:
    crop = jnp.ones((batch_size,), jnp.float32)
    angle = jnp.zeros((batch_size,), jnp.float32)
  c = x.shape[-1]
  x = (x - mean.reshape(1, 1, 1, c)) / std.reshape(1, 1, 1, c)
  return {"image": x, "label": label, "inlier": inlier_table[scenario, label],
          "scenario": jnp.full((batch_size,), scenario, jnp.int32), "index": index,
          "angle": angle, "crop": crop}


def rotate_crop(image: jax.Array, angle: jax.Array, crop: jax.Array, *,
                fill: float = 0.0) -> jax.Array:
  """Centre-crops one image by `crop`, resizes it back and rotates it by `angle`.

  Output pixel (i, j), at offset (y, x) = (i - cy, j - cx) from the centre (cy, cx) =
  ((H - 1) / 2, (W - 1) / 2), reads the input by bilinear interpolation at

      (cy + s (cos a * y + sin a * x),  cx + s (-sin a * y + cos a * x)),

  s = `crop`, a = `angle` (see the module docstring for the conventions).

  Args:
    image: [H, W, C] float.
    angle: [] rotation in degrees (> 0: counter-clockwise as displayed).
    crop: [] crop fraction in (0, 1] (1: no crop).
    fill: value read outside the image.

  Returns:
    [H, W, C], the dtype of `image`.
  """
  h, w = image.shape[0], image.shape[1]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  theta = jnp.deg2rad(angle)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  y = jnp.arange(h, dtype=image.dtype).reshape(h, 1) - cy  # [H, 1]
  x = jnp.arange(w, dtype=image.dtype).reshape(1, w) - cx  # [1, W]
  src_y = cy + crop * (cos * y + sin * x)  # [H, W]
  src_x = cx + crop * (cos * x - sin * y)  # [H, W]

  def one_channel(channel):  # [H, W] -> [H, W]
    return ndimage.map_coordinates(channel, [src_y, src_x], order=1, mode="constant",
                                   cval=fill)

  return jax.vmap(one_channel, in_axes=2, out_axes=2)(image).astype(image.dtype)


def augment_batch(images: jax.Array, angles: jax.Array, crops: jax.Array, *,
                  fill: float = 0.0) -> jax.Array:
  """`rotate_crop` vmapped over a batch.

  Args:
    images: [B, H, W, C] float.
    angles: [B] degrees.
    crops: [B] crop fractions in (0, 1].
    fill: value read outside the image.

  Returns:
    [B, H, W, C].
  """
  return jax.vmap(functools.partial(rotate_crop, fill=fill))(images, angles, crops)
