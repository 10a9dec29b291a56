"""Preparing TFDS benchmarks as array_record files, for `oodjax data prepare` / `data list`.

Preparing a stock TFDS dataset (cifar10, mnist, ...) runs its builder, which needs TensorFlow
(the `prepare` extra). Reading the result does not: `oodjax.data.load("tfds/NAME")` reads the
array_record files with `tfds.data_source`.
"""
from __future__ import annotations

import json
import os

from oodjax.data.tfds_sources import KNOWN, default_data_dir, find_prepared

INSTALL_HINT = "pip install 'oodjax[prepare]'"


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Downloads (or takes from `manual_dir`) and prepares TFDS dataset `name` as array_record.

  Args:
    name: TFDS name, e.g. "cifar10", "svhn_cropped" (a ":coarse" label suffix is ignored: the
      labels live in the same files).
    data_dir: TFDS data directory; None for $TFDS_DATA_DIR or ~/tensorflow_datasets.
    manual_dir: a directory holding the dataset's original archives under the file names TFDS
      expects (e.g. cifar-10-binary.tar.gz); TFDS then takes them from there (checking their
      checksums) instead of downloading.

  Returns:
    The prepared version directory.

  Raises:
    ImportError: TensorFlow is not installed (the message says how to install it; the CLI
      prints it as one line).
  """
  name = name.partition(":")[0]
  data_dir = data_dir or default_data_dir()
  try:
    import tensorflow  # noqa: F401  (stock builders decode archives with tf.io)
  except ImportError:
    raise ImportError(f"Preparing TFDS dataset {name!r} runs its TFDS builder, which needs "
                       f"TensorFlow. Install it with: {INSTALL_HINT}") from None
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  config = None
  if manual_dir is not None:
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f"manual_dir {manual_dir!r} is not a directory")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  return str(builder.data_dir)


def list_prepared(data_dir: str | None = None) -> dict[str, str]:
  """Maps each dataset prepared as array_record under `data_dir` to its version directory."""
  root = data_dir or default_data_dir()
  found = {}
  if not os.path.isdir(root):
    return found
  for name in sorted(os.listdir(root)):
    candidates = [name] + [f"{name}/{c}" for c in _subdirs(os.path.join(root, name))]
    for candidate in candidates:  # plain datasets and "name/config" ones
      version_dir = find_prepared(candidate, root)
      if version_dir and _file_format(version_dir) == "array_record":
        found[candidate] = version_dir
  return found


def describe(data_dir: str | None = None) -> str:
  """A human-readable summary for `oodjax data list`: every loadable name and its state."""
  from oodjax.data.embedded_sets import GENERATED, VENDORED
  prepared = list_prepared(data_dir)
  lines = ["Embedded (always available):"]
  lines += [f"  embedded/{n}" for n in VENDORED]
  lines += [f"  embedded/{n}  (generated from seed)" for n in GENERATED]
  lines.append(f"TFDS (data dir {data_dir or default_data_dir()}):")
  for name in KNOWN:
    base = name.partition(":")[0]
    state = f"prepared: {prepared[base]}" if base in prepared else f"oodjax data prepare {base}"
    lines.append(f"  tfds/{name}  ({state})")
  lines += [f"  tfds/{n}  (prepared: {d})" for n, d in prepared.items()
            if n not in KNOWN]
  lines.append("Image folders: folder/<path>  (mode='resize' or 'crop', image_size=32)")
  return "\n".join(lines)


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))) \
      if os.path.isdir(path) else []


def _file_format(version_dir: str) -> str:
  with open(os.path.join(version_dir, "dataset_info.json")) as f:
    return json.load(f).get("fileFormat", "tfrecord")
