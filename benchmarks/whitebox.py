"""Cost of all sample-free white-box indicators (but ODIN) relative to a plain forward pass.

    .venv/bin/python -m benchmarks.whitebox                       # every architecture, ~10 min on 2 cores
    .venv/bin/python -m benchmarks.whitebox --models small_cnn    # one, about a minute

For each architecture, four jitted functions are warmed up, then timed side by side: each
repeat runs all of them over the same N images (batches of `--batch-size`) back to back, in an
order that rotates from repeat to repeat, and the medians of the repeats are compared.

* `forward`: the plain jitted forward, `model.apply(variables, x, train=False)` on the batch.
  This is the floor the goal is stated against.
* `forward, chunked`: the same forward run as a `lax.map` over chunks of the size the
  indicator pass uses. On CPU it can be faster than the plain forward (smaller working set),
  so the indicators are also priced against it: the stricter of the two floors.
* `indicators`: `oodjax.detectors.sample_free.whitebox.indicators` with its defaults: every
  indicator it computes (MP, H, T1000, the 8 latent ones, DMS/DMS-AOS/DSS/DSS-EXT and the 4
  IN- ones) from one forward pass.
* `indicators, unchunked`: the same with `chunk_size=None`, to show what the chunking buys.

The machine's load average is recorded before and after: on a shared 2-core machine it moves
the ratios by ~10%. Untrained weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.machine import cpu_name
from oodjax.detectors.sample_free import whitebox
from oodjax.models import get_model

# Architecture -> (input shape, images, goal for indicators / forward). Goals from issue 8:
# the small CNN's plain forward is one fused kernel that never writes its feature maps, so
# taking any statistic out of it has a measured floor of ~1.35x; the others already write them.
ARCHITECTURES = {
    "small_cnn": ((28, 28, 1), 10_000, 1.55),
    "resnet_tiny": ((28, 28, 1), 5_000, 1.1),
    "densenet_tiny": ((28, 28, 1), 5_000, 1.1),
    # Two and four chunks of 64: enough to price the chunking, small enough to time VGG-16's
    # ~0.15 s per image on 2 cores five times over.
    "resnet18": ((32, 32, 3), 256, 1.1),
    "vgg16": ((32, 32, 3), 128, 1.1),
}


def _time_pass(fn, variables, batches) -> float:
  start = time.perf_counter()
  outs = [fn(variables, batch) for batch in batches]
  jax.block_until_ready(outs)
  return time.perf_counter() - start


def _chunked(fn, chunk: int):
  """fn over the batch in `chunk`-sized steps, as `indicators` runs its pass."""
  return lambda variables, x: whitebox._in_chunks(  # pylint: disable=protected-access
      lambda c: fn(variables, c), x, chunk)


def bench_one(name: str, shape, n: int, goal: float, batch_size: int, repeats: int) -> dict:
  load_before = os.getloadavg()
  model = get_model(name, num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape))
  batch_size = min(batch_size, n)
  num_batches = n // batch_size
  images = jax.random.normal(jax.random.key(1), (num_batches, batch_size) + shape)
  batches = [images[i] for i in range(num_batches)]
  chunk = whitebox._resolve_chunk_size("auto")  # pylint: disable=protected-access
  forward = functools.partial(model.apply, train=False)
  fns = {
      "forward": jax.jit(forward),
      "forward, chunked": jax.jit(_chunked(forward, chunk) if chunk else forward),
      "indicators": jax.jit(functools.partial(whitebox.indicators, model)),
      "indicators, unchunked": jax.jit(functools.partial(whitebox.indicators, model,
                                                         chunk_size=None)),
  }
  names = list(fns["indicators"](variables, batches[0]))
  for fn in fns.values():  # warm-up: compile and touch every batch once
    _time_pass(fn, variables, batches)
  times = {key: [] for key in fns}
  order = list(fns)
  for r in range(repeats):
    for key in order[r % len(order):] + order[:r % len(order)]:
      times[key].append(_time_pass(fns[key], variables, batches))
  med = {key: statistics.median(t) for key, t in times.items()}
  images_total = num_batches * batch_size
  result = {
      "model": name, "input_shape": list(shape), "images": images_total,
      "batch_size": batch_size, "chunk_size": chunk, "repeats": repeats,
      "indicators": names, "seconds": med, "goal": goal,
      "ratio": med["indicators"] / med["forward"],
      "ratio_to_chunked_forward": med["indicators"] / med["forward, chunked"],
      "ratio_unchunked": med["indicators, unchunked"] / med["forward"],
      "load_before": load_before, "load_after": os.getloadavg(),
  }
  print(f"{name}: {images_total} images {shape}, batches of {batch_size}, chunks of {chunk}, "
        f"median of {repeats}, {len(names)} indicators")
  for key, t in med.items():
    print(f"  {key:22s} {t:8.3f} s  ({images_total / t:8.0f} img/s)")
  print(f"  indicators / forward          {result['ratio']:.2f}x  (goal <= {goal}x)")
  print(f"  indicators / chunked forward  {result['ratio_to_chunked_forward']:.2f}x")
  print(f"  unchunked indicators / forward {result['ratio_unchunked']:.2f}x")
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(ARCHITECTURES),
                      help=f"comma-separated, from {list(ARCHITECTURES)}")
  parser.add_argument("--n", type=int, default=None,
                      help="images per architecture (default: its own, see ARCHITECTURES)")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="benchmarks/results/whitebox.json",
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); '' for nowhere")
  args = parser.parse_args()
  models = [m for m in args.models.split(",") if m]
  unknown = [m for m in models if m not in ARCHITECTURES]
  if unknown:
    parser.error(f"unknown models {unknown}; known: {list(ARCHITECTURES)}")

  load_before = os.getloadavg()
  results = []
  for name in models:
    shape, n, goal = ARCHITECTURES[name]
    results.append(bench_one(name, shape, args.n or n, goal, args.batch_size, args.repeats))
  load_after = os.getloadavg()
  print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}; "
        f"backend {jax.default_backend()}, {os.cpu_count()} CPU threads")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "backend": jax.default_backend(), "cpu": cpu_name(), "cpu_threads": os.cpu_count(),
        "jax": jax.__version__, "load_before": load_before, "load_after": load_after,
        "models": results}, indent=2) + "\n")


if __name__ == "__main__":
  main()
