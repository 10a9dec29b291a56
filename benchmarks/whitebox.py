"""Cost of all sample-free white-box indicators (but ODIN) relative to a plain forward pass.

    .venv/bin/python -m benchmarks.whitebox            # small_cnn, 10,000 28x28x1 images
    .venv/bin/python -m benchmarks.whitebox --model small_cnn_tiny --n 2000   # quick look

Both functions are jitted, warmed up, then timed side by side: each repeat runs the plain
forward and the indicator pass over the same N images (batches of `--batch-size`) back to
back, alternating which goes first, and the medians of the repeats are compared. The
indicator pass is `oodjax.detectors.sample_free.whitebox.indicators`, every indicator it computes
(MP, H, T1000, the 8 latent ones, DMS/DMS-AOS/DSS/DSS-EXT and the 4 IN- ones) from one
forward pass; the paper's goal is "little additional cost" (we aim for <= 1.3x).
Runtime: about a minute on 2 CPU cores (untrained weights: speed does not depend on them).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from oodjax.detectors.sample_free.whitebox import indicators
from oodjax.models import get_model


def _time_pass(fn, variables, batches) -> float:
  start = time.perf_counter()
  outs = [fn(variables, batch) for batch in batches]
  jax.block_until_ready(outs)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small_cnn")
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="benchmarks/results/whitebox.json",
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); '' for nowhere")
  args = parser.parse_args()

  model = get_model(args.model, num_classes=10)
  shape = (28, 28, 1)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape))
  num_batches = args.n // args.batch_size
  images = jax.random.normal(jax.random.key(1), (num_batches, args.batch_size) + shape)
  batches = [images[i] for i in range(num_batches)]

  forward = jax.jit(functools.partial(model.apply, train=False))
  all_indicators = jax.jit(functools.partial(indicators, model))
  names = sorted(all_indicators(variables, batches[0]))  # also the warm-up compile
  for fn in (forward, all_indicators):  # warm-up: compile and touch every batch once
    _time_pass(fn, variables, batches)

  times = {"forward": [], "indicators": []}
  for r in range(args.repeats):
    order = [("forward", forward), ("indicators", all_indicators)]
    for name, fn in order if r % 2 == 0 else order[::-1]:
      times[name].append(_time_pass(fn, variables, batches))

  plain, full = statistics.median(times["forward"]), statistics.median(times["indicators"])
  n = num_batches * args.batch_size
  print(f"model {args.model}, {n} images {shape}, batches of {args.batch_size}, "
        f"{args.repeats} repeats, backend {jax.default_backend()} ({jax.device_count()} device)")
  print(f"{len(names)} indicators: {', '.join(names)}")
  print(f"plain forward      : {plain:7.3f} s  ({n / plain:8.0f} img/s)")
  print(f"forward+indicators : {full:7.3f} s  ({n / full:8.0f} img/s)")
  print(f"ratio              : {full / plain:7.3f}x  (goal <= 1.3x)")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": args.model, "images": n, "batch_size": args.batch_size,
        "repeats": args.repeats, "backend": jax.default_backend(), "indicators": names,
        "forward_s": plain, "indicators_s": full, "ratio": full / plain}, indent=2) + "\n")


if __name__ == "__main__":
  main()
