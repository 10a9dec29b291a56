"""The training input path: host normalisation and augmentation against uint8 batches prepared
inside the jitted step, with the transfer prefetched in a thread.

    .venv/bin/python -m benchmarks.input_pipeline            # about 2 minutes on 2 CPU cores

The main job's classifier (`configs/fmnist_small_cnn.py`: the zoo's `small_cnn`, embedded
Fashion-MNIST training images, batch 128, Adam with the config's cosine schedule, one CPU device,
the state donated as the trainer does) trains for `--steps` steps per timing, each contender on
its own state. Timed side by side, each repeat running every contender once in a rotating
order; medians compared:

* `host`: the path the trainer took before, `oodjax.data.core.batches`: gather, (augment per
  image in Python,) normalise to float32 and `device_put` on the host, in the training loop's
  thread, then the jitted `make_train_step(make_classification_loss(model.apply), tx)`.
* `device`: the trainer's path now: `batches(..., uint8=True)` gathers uint8 rows and
  `device_put`s them in a background thread (`oodjax.data.device_input.prefetch`, 2 batches
  ahead, as `run_job` does), and the jitted step begins with `prepare_batch` (crop + flip from
  the step's key, then normalisation; `classifier.with_device_input`).
* `floor`: the `device` step on uint8 batches already on the device: zero input cost, the
  floor both paths are priced against.
* `step alone`: the plain train step on float32 batches already on the device, normalised
  beforehand: what `prepare_batch` itself costs inside the step, `floor` against this.

Each path's input work is also timed alone, per batch, with no training beside it: `batches`
(the host path), the uint8 gather + `device_put` (the device path's host side) and a jitted
`prepare_batch` (its device side, as a program of its own).

Each is run with augment=False (the main job's setting) and augment=True (the CIFAR recipe's
crop + flip, here on the 28x28 images). The goal (issue): the device input path costs < 5% of
step time, (device - floor) / floor < 0.05. The machine's CPU, threads and load average (1 min,
5 min, 15 min, before and after each setting) are recorded: the machine is shared. Writes
benchmarks/results/input_pipeline.json.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np

from benchmarks.machine import cpu_name
from oodjax import data
from oodjax.config import load_config
from oodjax.data.device_input import prefetch, prepare_batch
from oodjax.models import get_model
from oodjax.train.classifier import with_device_input
from oodjax.train.schedules import make_optimizer
from oodjax.train.state import create_train_state
from oodjax.train.step import make_classification_loss, make_train_step

GOAL = 0.05
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "fmnist_small_cnn.py"
CONTENDERS = ("host", "device", "floor", "step alone")


def uint8_batches(ds: data.ImageDataset, batch_size: int, *, seed: int, epoch: int):
  """The trainer's uint8 batches: `batches(..., uint8=True)`, full batches only."""
  return data.batches(ds, batch_size, seed=seed, epoch=epoch, drop_remainder=True, uint8=True)


def _train(step, state, batches, rng):
  """Runs `step` over `batches`; returns the state once the device has finished."""
  for batch in batches:
    state, _ = step(state, batch, rng)
  return jax.block_until_ready(state)


def bench_setting(ds, model, tx, batch_size: int, augment: bool, steps: int, repeats: int,
                  seed: int) -> dict:
  """Median seconds of `steps` training steps for each contender (see the module docstring)."""
  loss = make_classification_loss(model.apply)
  train_step = make_train_step(loss, tx)
  # The trainer's own step on uint8 batches (`train_classifier`).
  step_on_uint8 = make_train_step(with_device_input(loss, ds, augment=augment), tx)
  host_step = jax.jit(train_step, donate_argnums=0)
  device_step = jax.jit(step_on_uint8, donate_argnums=0)
  init = jax.jit(functools.partial(create_train_state, model, tx,
                                   sample_input=np.zeros((1, *ds.image_shape), np.float32)))
  states = {name: init(jax.random.key(seed)) for name in CONTENDERS}
  rng = jax.random.key(seed + 1)
  resident_uint8 = list(itertools.islice(uint8_batches(ds, batch_size, seed=seed, epoch=0),
                                         steps))
  resident_float = [jax.device_put(b) for b in itertools.islice(
      data.batches(ds, batch_size, seed=seed, epoch=0, drop_remainder=True), steps)]

  def run(name, epoch, n):
    if name == "host":
      batches = itertools.islice(data.batches(ds, batch_size, seed=seed, epoch=epoch,
                                              drop_remainder=True, augment=augment), n)
      return _train(host_step, states[name], batches, rng)
    if name == "device":
      batches = prefetch(itertools.islice(uint8_batches(ds, batch_size, seed=seed, epoch=epoch),
                                          n), size=2)
      return _train(device_step, states[name], batches, rng)
    if name == "floor":
      return _train(device_step, states[name], resident_uint8[:n], rng)
    return _train(host_step, states[name], resident_float[:n], rng)

  for name in CONTENDERS:  # warm-up: compile, and grow the allocator's pools as a timing does
    states[name] = run(name, 0, steps)
  pieces = _time_pieces(ds, batch_size, augment, resident_uint8[0], seed, repeats)
  load_before = os.getloadavg()
  times = {name: [] for name in CONTENDERS}
  for r in range(repeats):
    order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
    for name in order:
      start = time.perf_counter()
      states[name] = run(name, r + 1, steps)
      times[name].append(time.perf_counter() - start)
  load_after = os.getloadavg()
  med = {name: statistics.median(t) for name, t in times.items()}
  floor = med["floor"]
  result = {
      "augment": augment, "seconds": med, "all_seconds": times,
      "images_per_s": {name: steps * batch_size / s for name, s in med.items()},
      "cost_device": (med["device"] - floor) / floor,
      "cost_host": (med["host"] - floor) / floor,
      "cost_prepare_batch": (floor - med["step alone"]) / med["step alone"],
      # The same, from each repeat's own ratio (contenders of one repeat run back to back, so
      # this cancels load that drifts between repeats).
      "cost_device_paired": _paired(times["device"], times["floor"]),
      "cost_host_paired": _paired(times["host"], times["floor"]),
      "ms_per_batch": {**pieces, "train step (floor)": 1e3 * floor / steps},
      "load_before": load_before, "load_after": load_after}
  print(f"augment={augment}: {steps} steps of {batch_size}, median of {repeats} "
        f"(load {load_before[0]:.2f} -> {load_after[0]:.2f})")
  for name in CONTENDERS:
    print(f"  {name:10s} {med[name]:7.3f} s  {result['images_per_s'][name]:7.0f} img/s")
  print(f"  input path, device: {100 * result['cost_device']:+.1f}% of the floor "
        f"(goal < {100 * GOAL:.0f}%); host: {100 * result['cost_host']:+.1f}%; "
        f"prepare_batch in the step: {100 * result['cost_prepare_batch']:+.1f}%")
  print(f"  paired per repeat: device {100 * result['cost_device_paired']:+.1f}%, "
        f"host {100 * result['cost_host_paired']:+.1f}%")
  print("  per batch, alone: " + ", ".join(f"{k} {v:.2f} ms"
                                           for k, v in result["ms_per_batch"].items()))
  return result


def _paired(times: list[float], floors: list[float]) -> float:
  """Median over repeats of (time - floor) / floor."""
  return statistics.median((t - f) / f for t, f in zip(times, floors))


def _time_pieces(ds, batch_size: int, augment: bool, uint8_batch, seed: int, repeats: int,
                 n: int = 20) -> dict[str, float]:
  """Milliseconds per batch of each path's input work alone, with no training beside it:
  medians of `repeats` interleaved runs over `n` batches."""
  prepare = jax.jit(functools.partial(prepare_batch, mean=ds.mean, std=ds.std,
                                      augment=augment))
  keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(n)]

  def host():  # today's: gather, (augment,) normalise, device_put
    return list(itertools.islice(data.batches(ds, batch_size, seed=seed, epoch=1,
                                              drop_remainder=True, augment=augment), n))

  def gather_put():  # the device path's host side (in the prefetch thread)
    return list(itertools.islice(uint8_batches(ds, batch_size, seed=seed, epoch=1), n))

  def in_step():  # the device path's device side, as its own program
    return [prepare(uint8_batch, k) for k in keys]

  fns = {"host batches": host, "uint8 gather + device_put": gather_put,
         "prepare_batch alone": in_step}
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(1e3 * (time.perf_counter() - start) / n)
  return {k: statistics.median(t) for k, t in times.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="training steps per timing")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--json", default="benchmarks/results/input_pipeline.json",
                      help="where to write the results ('' for nowhere)")
  args = parser.parse_args(argv)

  config = load_config(str(CONFIG))
  tc = config.train
  ds = data.load_config_dataset(config, "train")
  model = get_model(config.model, num_classes=ds.num_classes)
  batch_size = int(tc.batch_size)
  tx, _ = make_optimizer(tc, int(tc.num_epochs) * (len(ds) // batch_size))
  start = time.perf_counter()
  settings = [bench_setting(ds, model, tx, batch_size, augment, args.steps, args.repeats,
                            int(config.seed)) for augment in (False, True)]
  result = {
      "backend": jax.default_backend(), "cpu": cpu_name(), "cpu_threads": os.cpu_count(),
      "jax": jax.__version__, "config": "configs/fmnist_small_cnn.py", "model": config.model,
      "dataset": config.dataset, "image_shape": list(ds.image_shape), "batch_size": batch_size,
      "optimizer": tc.optimizer, "steps": args.steps, "repeats": args.repeats,
      "prefetch_size": 2, "goal": GOAL, "settings": settings,
      "seconds_total": time.perf_counter() - start}
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
