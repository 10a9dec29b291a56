"""Image datasets for OOD detection: one representation, loaded by name.

Every loader returns an `ImageDataset` (uint8 [N, H, W, C] images, int32 labels, -1 when
unlabelled, per-channel mean/std on the [0, 1] scale, class names), and `batches` turns one into
normalised, device-placed batches.

Names accepted by `load(name, split="test", *, data_dir=None, seed=0, size=None, **options)`:

  embedded/fashion_mnist        in-distribution, splits "train" (20,000) and "test" (3,000)
  embedded/animal_mnist         near-OOD, 10,000 animal silhouettes, 10 classes
  embedded/digits               far-OOD, scikit-learn's 1,797 digits upsampled to 28x28
  embedded/textures             far-OOD, 2,028 crops of brick / grass / gravel
  embedded/gaussian_noise       generated from `seed`: N(0.5, 1) clipped to [0, 1]
  embedded/uniform_noise        generated from `seed`: U(0, 1)
  embedded/<noise>:HxWxC        gaussian_noise or uniform_noise at another size, e.g.
                                embedded/uniform_noise:32x32x3 (ODIN's CIFAR-size noise)
  embedded/fashion_mnist_noise  generated from `seed`: Fashion-MNIST test + U(0, 1), clipped
  tfds/<name>[:coarse]          prepared TFDS data (`oodjax data prepare NAME`): cifar10,
                                cifar100, cifar100:coarse, svhn_cropped, mnist, fashion_mnist,
                                omniglot, or any other TFDS image set
  folder/<path>                 unlabelled images from a folder; options mode="resize"|"crop",
                                crop="random"|"center", image_size=32, channels=3

The embedded sets are 28x28x1 and vendored in the package (see embedded/LICENSES.md); the
generated sets are drawn at load time. `EMBEDDED_OOD` lists the embedded OOD names from near to
far. An OOD set carries its own statistics until given the ID ones with `with_stats`.
"""
from __future__ import annotations

from oodjax.data.core import (ImageDataset, batches, channel_stats, check_compatible,
                              from_arrays, normalize, validate)
from oodjax.data.embedded_sets import EMBEDDED_OOD, GENERATED, VENDORED, load_embedded
from oodjax.data.folder import load_folder, resize_dataset
from oodjax.data.tfds_sources import KNOWN as _TFDS_KNOWN
from oodjax.data.tfds_sources import load_tfds

__all__ = ["ImageDataset", "batches", "channel_stats", "check_compatible", "from_arrays",
           "normalize", "validate", "EMBEDDED_OOD", "load", "load_config_dataset",
           "list_datasets", "resize_dataset"]


# Fashion-MNIST (labels 0-9) + Animal-MNIST (labels 10-19), splits "train" and "test".
FASHION_ANIMAL = "embedded/fashion_animal"


def list_datasets() -> tuple[str, ...]:
  """The names `load` knows (TFDS ones need preparing first; any prepared TFDS set works too)."""
  return (tuple(f"embedded/{n}" for n in VENDORED + GENERATED) + (FASHION_ANIMAL,)
          + tuple(f"tfds/{n}" for n in _TFDS_KNOWN) + ("folder/<path>",))


def load(name: str, split: str = "test", *, data_dir: str | None = None, seed: int = 0,
         size: int | None = None, **options) -> ImageDataset:
  """Loads a dataset by name (see the module docstring for the names).

  Args:
    name: "embedded/...", "tfds/..." or "folder/<path>".
    split: "train" or "test" (embedded/fashion_mnist, TFDS sets; TFDS slicing like
      "train[:5000]" works too); single-split sets take "test".
    data_dir: TFDS data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    seed: the draw of a generated set, or of random crops for folder sets.
    size: number of examples (generated sets: how many to draw; others: the first `size`).
    **options: folder-set options (`oodjax.data.folder.load_folder`).

  Returns:
    A validated ImageDataset.

  Raises:
    ValueError: for an unknown name (listing the known ones) or bad options.
    FileNotFoundError: for TFDS data that is not prepared (at once, with the command to run).
  """
  prefix, _, rest = name.partition("/")
  if options and prefix != "folder":
    raise ValueError(f"options {sorted(options)} apply only to folder/ sets, not {name!r}")
  if prefix == "embedded" and (rest in VENDORED or rest.partition(":")[0] in GENERATED):
    ds = load_embedded(rest, split, seed=seed, size=size)
  elif name == FASHION_ANIMAL:
    # The 20-class set of ENVISE's embedded scenarios (defined beside them; imported here
    # lazily, since oodjax.envise.scenarios itself loads its two parts through this function).
    from oodjax.envise.scenarios import fashion_animal_dataset  # pylint: disable=g-import-not-at-top
    ds = fashion_animal_dataset(split)
    if size is not None:
      ds = ds.take(slice(0, size))
  elif prefix == "tfds" and rest:
    ds = load_tfds(rest, split, data_dir=data_dir, size=size)
  elif prefix == "folder" and rest:
    ds = load_folder(rest, seed=seed, size=size, **options)
  else:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
  return validate(ds)


def load_config_dataset(config, split: str, *, data_dir: str | None = None) -> ImageDataset:
  """`config.dataset`'s `split`, carrying the normalisation statistics the config asks for.

  By default a dataset is normalised with the per-channel statistics of its own training
  images. A config may fix them instead with a `normalization` section {"mean": (...),
  "std": (...)} on the [0, 1] pixel scale: what an imported network was trained with (the ODIN
  authors normalise CIFAR-10 and CIFAR-100 alike with (125.3, 123.0, 113.9) / 255 and (63.0,
  62.1, 66.7) / 255, `configs/odin_cifar.py`). OOD sets then take these statistics too, as
  they take the ID set's.
  """
  ds = load(config.dataset, split, seed=config.seed, data_dir=data_dir)
  norm = config.get("normalization")
  if norm is not None and norm.get("mean") is not None:
    mean, std = tuple(norm["mean"]), tuple(norm.get("std") or ())
    if len(mean) != ds.image_shape[-1] or len(std) != ds.image_shape[-1]:
      raise ValueError(f"normalization.mean {mean} / std {std} need one value per channel of "
                       f"{config.dataset} ({ds.image_shape[-1]})")
    ds = validate(ds.with_stats(mean, std))
  return ds
