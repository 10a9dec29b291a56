"""Datasets that ship inside the package, and the noise sets generated from a seed.

Vendored (oodjax/data/embedded/*.npz, built by scripts/make_embedded_data.py; licences in
oodjax/data/embedded/LICENSES.md):
  fashion_mnist   in-distribution; train 20,000 (2,000 per class), test 3,000 (300 per class),
                  28x28x1, 10 classes.
  animal_mnist    near-OOD; 10,000 animal silhouettes, 28x28x1, 10 classes.
  digits          far-OOD; scikit-learn's 1,797 8x8 digits, bilinearly upsampled to 28x28x1.
  textures        far-OOD; 2,028 28x28x1 crops of the brick, grass and gravel textures.

Generated at load time (28x28x1, labels -1, `size` defaults to the Fashion-MNIST test size):
  gaussian_noise       each pixel N(0.5, 1) clipped to [0, 1] (ODIN, Liang et al. 2018, Sec. 4.2).
  uniform_noise        each pixel U(0, 1) (ODIN, Sec. 4.2).
  fashion_mnist_noise  Fashion-MNIST test image + U(0, 1) noise per pixel, clipped to [0, 1].
      VMDLS (Sec. 4, "Benchmarks": "MNIST-noise, a version of MNIST with random uniform noise
      added to it") gives no range or clipping. Our reading: test images scaled to [0, 1], plus
      independent U(0, 1) noise per pixel (the range of its NOISE set and of ODIN's uniform
      noise), clipped back to [0, 1] so the result is still a valid image; Fashion-MNIST takes
      the place of MNIST because it is our in-distribution set.
  Noise is drawn in float64 and quantised to uint8 with round(255 x), so a set is exactly
  reproducible from (name, seed, size) and stored like every other set.

Every set carries its own normalisation statistics; the Fashion-MNIST splits carry those of the
embedded train split. Give an OOD set the ID statistics with `ds.with_stats(id.mean, id.std)`.
"""
from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from oodjax.data.core import ImageDataset, channel_stats

VENDORED = ("fashion_mnist", "animal_mnist", "digits", "textures")
GENERATED = ("gaussian_noise", "uniform_noise", "fashion_mnist_noise")
# Nearest to farthest from Fashion-MNIST: other silhouettes, clothing with noise, strokes,
# natural textures, pure noise.
EMBEDDED_OOD = ("embedded/animal_mnist", "embedded/fashion_mnist_noise", "embedded/digits",
                "embedded/textures", "embedded/uniform_noise", "embedded/gaussian_noise")
# Separate random streams per generated set, so equal seeds do not give correlated sets.
_STREAM = {"gaussian_noise": 1, "uniform_noise": 2, "fashion_mnist_noise": 3}


@functools.lru_cache(maxsize=None)
def _read_npz(name: str) -> dict[str, np.ndarray]:
  """Reads oodjax/data/embedded/<name>.npz once per process (arrays are treated read-only)."""
  path = importlib.resources.files("oodjax.data.embedded") / f"{name}.npz"
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  for a in arrays.values():
    a.flags.writeable = False  # the cache is shared: a caller's in-place edit must fail loudly
  return arrays


def load_embedded(name: str, split: str = "test", *, seed: int = 0,
                  size: int | None = None) -> ImageDataset:
  """Loads `embedded/<name>` (see the module docstring for the sets).

  Args:
    name: one of VENDORED or GENERATED, without the "embedded/" prefix.
    split: "train" or "test" for fashion_mnist; the other sets have one split, "test"
      (also accepted: "all").
    seed: selects the draw of a generated set; ignored by vendored sets.
    size: number of images of a generated set (default: the Fashion-MNIST test size); for a
      vendored set, keep the first `size` images.

  Returns:
    The dataset; images [N, 28, 28, 1] uint8.
  """
  full = f"embedded/{name}"
  if name == "fashion_mnist":
    if split not in ("train", "test"):
      raise ValueError(f"{full} has splits 'train' and 'test', not {split!r}")
    d = _read_npz(name)
    ds = ImageDataset(d[f"{split}_images"], d[f"{split}_labels"], tuple(d["mean"].tolist()),
                      tuple(d["std"].tolist()), tuple(d["class_names"].tolist()), full)
  elif name in VENDORED:
    _check_single_split(full, split)
    d = _read_npz(name)
    mean, std = channel_stats(d["images"])
    ds = ImageDataset(d["images"], d["labels"], mean, std, tuple(d["class_names"].tolist()), full)
  elif name.partition(":")[0] in GENERATED:
    _check_single_split(full, split)
    name, _, shape_spec = name.partition(":")
    image_shape = _parse_shape(shape_spec, full) if shape_spec else (28, 28, 1)
    if name == "fashion_mnist_noise" and image_shape != (28, 28, 1):
      raise ValueError(f"{full}: Fashion-MNIST noise exists only at 28x28x1")
    n = len(_read_npz("fashion_mnist")["test_labels"]) if size is None else size
    images = _generate(name, seed, n, image_shape)
    mean, std = channel_stats(images)
    return ImageDataset(images, np.full((n,), -1, np.int32), mean, std, (), full)
  else:
    raise ValueError(f"unknown embedded set {full!r}; known: "
                     + ", ".join(f"embedded/{n}" for n in VENDORED + GENERATED))
  return ds if size is None else ds.take(slice(0, size))


def _check_single_split(full: str, split: str) -> None:
  if split not in ("test", "all"):
    raise ValueError(f"{full} has a single split, 'test', not {split!r}")


def _parse_shape(spec: str, full: str) -> tuple[int, int, int]:
  """"32x32x3" -> (32, 32, 3): the noise sets at another size (ODIN's CIFAR-size noise)."""
  try:
    h, w, c = (int(v) for v in spec.lower().split("x"))
  except ValueError:
    raise ValueError(f"{full}: the size after ':' must read HxWxC, e.g. 32x32x3") from None
  if min(h, w) < 1 or c not in (1, 3):
    raise ValueError(f"{full}: need H, W >= 1 and C in (1, 3)")
  return h, w, c


def _generate(name: str, seed: int, n: int,
              image_shape: tuple[int, int, int] = (28, 28, 1)) -> np.ndarray:
  """Draws the generated set `name`: [n, *image_shape] uint8."""
  if n <= 0:
    raise ValueError(f"size must be positive, got {n}")
  rng = np.random.default_rng([seed, _STREAM[name]])
  shape = (n, *image_shape)
  if name == "gaussian_noise":
    x = np.clip(rng.normal(0.5, 1.0, shape), 0.0, 1.0)
  elif name == "uniform_noise":
    x = rng.uniform(0.0, 1.0, shape)
  else:  # fashion_mnist_noise; beyond the test set size the test images are reused in order
    base = _read_npz("fashion_mnist")["test_images"]
    clean = base[np.arange(n) % len(base)].astype(np.float64) / 255.0
    x = np.clip(clean + rng.uniform(0.0, 1.0, shape), 0.0, 1.0)
  return np.rint(x * 255.0).astype(np.uint8)
