"""Real benchmarks read from TFDS data prepared as array_record files (no TensorFlow needed).

`tfds/<name>[:<labels>]`, e.g. `tfds/cifar10`, `tfds/cifar100` (fine labels),
`tfds/cifar100:coarse` (the 20 superclasses), `tfds/svhn_cropped`, `tfds/mnist`,
`tfds/fashion_mnist`, `tfds/omniglot`. Data must first be prepared into
`<data_dir>/<name>/<version>/` with `oodjax data prepare NAME` (see `oodjax.data.prepare`).

Before touching TFDS we look for the prepared files on disk: asked for data that is missing,
TFDS retries the download for minutes when offline, and with download=False it fails with a
message about TFRecord that does not say what to do.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from oodjax.data.core import ImageDataset, channel_stats

# Per-channel mean/std of the train splits on the [0, 1] scale, as commonly published.
PUBLISHED_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
# `tfds/<name>:<suffix>` picks this label feature instead of "label".
LABEL_KEYS = {"coarse": "coarse_label", "fine": "label"}
KNOWN = ("cifar10", "cifar100", "cifar100:coarse", "svhn_cropped", "mnist", "fashion_mnist",
         "omniglot")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def find_prepared(name: str, data_dir: str | None = None) -> str | None:
  """Returns the newest `<data_dir>/<name>/<version>` holding a finished preparation, or None.

  Args:
    name: TFDS name, optionally with a config ("name/config").
    data_dir: the TFDS data directory; None for `default_data_dir()`.
  """
  root = os.path.join(data_dir or default_data_dir(), name)
  if not os.path.isdir(root):
    return None
  # TFDS writes into "incomplete.*" directories and renames them when done, so a version
  # directory with dataset_info.json is a finished preparation.
  versions = [v for v in os.listdir(root)
              if _VERSION.match(v) and os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    return None
  newest = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
  return os.path.join(root, newest)


def not_prepared_message(name: str, data_dir: str | None) -> str:
  return (f"TFDS dataset {name!r} is not prepared in {data_dir or default_data_dir()}. "
          f"Prepare it once (needs TensorFlow: pip install 'oodjax[prepare]'):\n"
          f"  oodjax data prepare {name}" + (f" --data-dir {data_dir}" if data_dir else "") +
          "\nOffline, add --manual-dir DIR with the dataset's original archives in DIR.")


def load_tfds(spec: str, split: str = "test", *, data_dir: str | None = None,
              size: int | None = None, stats=None) -> ImageDataset:
  """Loads `tfds/<spec>` from prepared array_record files.

  Args:
    spec: the TFDS name, optionally "/config", optionally ":coarse"/":fine" for the label set.
    split: a TFDS split ("train", "test", "train[:1000]", ...).
    data_dir: TFDS data directory; None for `default_data_dir()`.
    size: read only the first `size` examples.
    stats: (mean, std) to attach; None: the published ones, else the train split's.

  Returns:
    images [N, H, W, C] uint8, labels [N] int32 (-1 where the set has no label feature).

  Raises:
    FileNotFoundError: at once (no network access) when the data is not prepared.
    ValueError: for an unknown label suffix, a missing split, or data in another file format.
  """
  name, _, suffix = spec.partition(":")
  if suffix and suffix not in LABEL_KEYS:
    raise ValueError(f"tfds/{spec}: unknown label set {suffix!r}; use one of {list(LABEL_KEYS)}")
  label_key = LABEL_KEYS.get(suffix, "label")
  version_dir = find_prepared(name, data_dir)
  if version_dir is None:
    raise FileNotFoundError(not_prepared_message(name, data_dir))
  with open(os.path.join(version_dir, "dataset_info.json")) as f:
    info = json.load(f)
  file_format = info.get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise ValueError(f"{version_dir} holds {file_format} files; oodjax reads array_record. "
                     f"Re-prepare it with: oodjax data prepare {name}")
  split_names = [s["name"] for s in info.get("splits", [])]
  if split.split("[")[0] not in split_names:
    raise ValueError(f"tfds/{spec} has splits {split_names}, not {split!r}")

  import tensorflow_datasets as tfds  # slow to import, so only here
  builder = tfds.builder_from_directory(version_dir)
  source = builder.as_data_source(split=split)
  n = len(source) if size is None else min(size, len(source))
  features = builder.info.features
  image_key = "image" if "image" in features else next(
      k for k, v in features.items() if isinstance(v, tfds.features.Image))
  has_labels = label_key in features
  images = np.empty((n,) + _image_shape(source, image_key), np.uint8)
  labels = np.full((n,), -1, np.int32)
  chunk = 1024
  for start in range(0, n, chunk):
    rows = source.__getitems__(list(range(start, min(start + chunk, n))))
    batch = np.stack([np.asarray(r[image_key]) for r in rows])
    images[start:start + len(rows)] = batch.reshape((len(rows),) + images.shape[1:])
    if has_labels:
      labels[start:start + len(rows)] = [r[label_key] for r in rows]
  class_names = tuple(features[label_key].names) if has_labels else ()
  mean, std = _stats(name, data_dir, images, split) if stats is None else stats
  return ImageDataset(images, labels, mean, std, class_names, f"tfds/{spec}")


def _image_shape(source, image_key: str) -> tuple[int, int, int]:
  first = np.asarray(source[0][image_key])
  return first.shape if first.ndim == 3 else first.shape + (1,)


def _stats(name: str, data_dir: str | None, images: np.ndarray, split: str):
  """Published statistics where we have them, else those of the train split."""
  if name in PUBLISHED_STATS:
    return PUBLISHED_STATS[name]
  if split == "train":
    return channel_stats(images)
  try:
    train = load_tfds(name, "train", data_dir=data_dir)
  except ValueError:  # no train split: the best we can do is this split's own statistics
    return channel_stats(images)
  return train.mean, train.std
