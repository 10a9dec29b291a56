"""Tiny model, data and config shared by the training tests and their subprocesses.

Run as a script it trains with `train_classifier` (used by the SIGKILL test):
  python tests/train_helpers.py WORKDIR [--slow SECONDS]
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from oodjax.data.core import ImageDataset


class TinyNet(nn.Module):
  """conv 4 -> BatchNorm -> relu -> mean pool -> dropout -> Dense K."""
  num_classes: int = 3
  step_sleep: float = 0.0  # seconds slept per training forward pass, to make a run killable

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.step_sleep and train:
      jax.debug.callback(lambda: time.sleep(self.step_sleep))
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = x.mean(axis=(1, 2))  # [B, 4]
    x = nn.Dropout(0.25, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def run_with_fake_devices(code: str, devices: int, *args: str, timeout: int = 120
                          ) -> subprocess.CompletedProcess:
  """Runs `python -c code *args` with `devices` fake CPU devices and returns the finished process.

  Fake devices must be configured before JAX starts, hence a fresh interpreter. A non-zero exit
  fails the calling test with the end of the child's stderr.
  """
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def tiny_dataset(n: int = 48, *, seed: int = 0, num_classes: int = 3, name: str = "tiny"
                 ) -> ImageDataset:
  """Random 8x8x1 images whose mean brightness depends on the class (so it is learnable)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  base = rng.integers(0, 120, (n, 8, 8, 1))
  images = np.clip(base + 60 * labels[:, None, None, None], 0, 255).astype(np.uint8)
  return ImageDataset(images, labels, (0.5,), (0.25,),
                      tuple(f"c{k}" for k in range(num_classes)), name)


def write_fmnist_tfds(data_dir, *, n_train: int, n_test: int = 0,
                      name: str = "fmnist_smoke") -> None:
  """The first embedded Fashion-MNIST images as a TFDS array_record set `name` in `data_dir`
  (splits "train" and, with n_test > 0, "test"), written by TFDS itself through a
  GeneratorBasedBuilder (no TensorFlow), records in the written order."""
  import tensorflow_datasets as tfds

  from oodjax import data
  splits = {"train": data.load("embedded/fashion_mnist", "train").take(slice(0, n_train))}
  if n_test:
    splits["test"] = data.load("embedded/fashion_mnist", "test").take(slice(0, n_test))
  shape, names = splits["train"].image_shape, list(splits["train"].class_names)
  builder_name = name

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=names)}),
          disable_shuffling=True)  # records in the written order, as in memory

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(ds) for split, ds in splits.items()}

    def _generate_examples(self, ds):
      for i in range(len(ds)):
        yield i, {"image": ds.images[i], "label": int(ds.labels[i])}

  Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def tiny_config(**train_overrides):
  from oodjax.train import default_train_config
  config = default_train_config()
  config.seed = 3
  config.train.update(dict(num_epochs=3, batch_size=8, learning_rate=0.05, weight_decay=1e-4,
                           log_every_steps=2))
  config.train.update(train_overrides)
  config.checkpoint.update(dict(every_steps=4, keep=2, async_save=True))
  config.lock()
  return config


def main(argv):
  from oodjax.train import train_classifier
  workdir = argv[1]
  sleep = float(argv[argv.index("--slow") + 1]) if "--slow" in argv else 0.0
  config = tiny_config()
  state, summary = train_classifier(config, workdir, model=TinyNet(step_sleep=sleep),
                                    train_ds=tiny_dataset(), eval_ds=tiny_dataset(20, seed=1),
                                    progress=False)
  print("DONE", summary["step"], flush=True)


if __name__ == "__main__":
  main(sys.argv)
