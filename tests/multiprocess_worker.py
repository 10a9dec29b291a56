"""One process of a (possibly multi-process) training run, for tests/test_multiprocess.py.

  python tests/multiprocess_worker.py WORKDIR OUT.npz [--vmdls] [--restore-only]
                                      [--stream TFDS_DIR] [--set k=v]...

Trains the classifier of `configs/fmnist_small_cnn.py:smoke` (every step logged) in WORKDIR,
with the VMDLS encoder after it in WORKDIR/vmdls when --vmdls is given, through
`oodjax.train.distributed.initialize`, so the OODJAX_* environment decides whether it is one
process of several. Process 0 then writes the final parameters and BatchNorm statistics to
OUT.npz and the run summaries to OUT.json. With --stream, the classifier reads its training set
batch by batch from the TFDS set `fmnist_smoke` in TFDS_DIR (`oodjax.data.streaming`), which
the test wrote with the smoke run's images.
"""
from __future__ import annotations

import json
import sys

import numpy as np

CONFIG = "configs/fmnist_small_cnn.py:smoke"


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main(argv: list[str]) -> None:
  workdir, out = argv[1], argv[2]
  overrides = ["train.log_every_steps=1"] + [argv[i + 1] for i, a in enumerate(argv)
                                             if a == "--set"]
  from oodjax.config import load_config
  from oodjax.train import distributed
  config = load_config(CONFIG, overrides)
  distributed.initialize(config)  # before anything touches a device

  import jax

  from oodjax import data, models
  from oodjax.train import train_classifier
  train_ds = data.load_config_dataset(config, "train").take(slice(0, config.train_size))
  test_ds = data.load_config_dataset(config, "test").take(slice(0, 1000))
  model = models.get_model(config.model, num_classes=train_ds.num_classes)
  restore_only = "--restore-only" in argv
  classifier_ds = train_ds
  if "--stream" in argv:
    from oodjax.data import streaming
    classifier_ds = streaming.stream_tfds("fmnist_smoke", data_dir=argv[argv.index("--stream") + 1],
                                          mean=train_ds.mean, std=train_ds.std)
  state, summary = train_classifier(config, workdir, model=model, train_ds=classifier_ds,
                                    eval_ds=test_ds, progress=False, restore_only=restore_only)
  arrays = {**_flat(state.params, "params"), **_flat(state.batch_stats, "batch_stats")}
  summaries = {"classifier": summary, "process_count": jax.process_count(),
               "device_count": jax.device_count()}
  if "--vmdls" in argv:
    from oodjax.vmdls.train import train_vmdls
    vmdls_ds = train_ds.take(slice(0, config.vmdls.train_size))
    _, vmdls_state, vmdls_summary = train_vmdls(
        config, f"{workdir}/vmdls", backbone=model, train_ds=vmdls_ds, eval_ds=test_ds,
        progress=False, restore_only=restore_only)
    arrays.update(_flat(vmdls_state.params, "vmdls_params"))
    summaries["vmdls"] = vmdls_summary
  if distributed.is_main_process():
    np.savez(out, **arrays)
    with open(out.removesuffix(".npz") + ".json", "w") as f:
      json.dump(summaries, f, default=str)


if __name__ == "__main__":
  main(sys.argv)
