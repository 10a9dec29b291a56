"""ODIN's full 10 x 21 (T, ε) grid: oodjax `odin_grid` vs the released per-configuration
procedure in PyTorch vs the compute floor, on the same weights, images and CPU threads.

  .venv/bin/python -m benchmarks.odin_grid [--images 1000] [--workdir runs/fmnist_small_cnn]

(1) oodjax `odin_grid`: T backward passes, then T·E forwards, one compiled program.
(2) the released procedure (forward, backward, forward for every (T, ε)), batched, in PyTorch on
    a twin of the network with the Flax weights copied in (`benchmarks/torch_twin.py`).
(3) the compute floor: T x (forward + backward) + T·E x forward, timed with oodjax's own jitted
    pieces on the same images and chunks.
Prints the three times, the speed-up of (1) over (2), the ratio of (1) to (3), and the largest
score difference between (1) and (2). Needs the `bench` extra (torch 2.13.0 CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_twin


def _best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def _load_variables(model, workdir, sample):
  if workdir is None:
    return model.init(jax.random.key(0), sample)
  from oodjax import data
  from oodjax.config import load_config
  from oodjax.train.classifier import train_classifier
  config = load_config("configs/fmnist_small_cnn.py")
  state, _ = train_classifier(config, workdir, model=model,
                              train_ds=data.load(config.dataset, "train"), restore_only=True)
  return {"params": state.params, "batch_stats": state.batch_stats}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=1, help="best of this many timed runs")
  parser.add_argument("--workdir", default=None,
                      help="a finished run of configs/fmnist_small_cnn.py to take weights from "
                      "(default: freshly initialised weights; the timings do not depend on them)")
  parser.add_argument("--chunk-size", type=int, default=250, help="images per compiled call")
  parser.add_argument("--forward-batch", type=int, default=None,
                      help="configs per lax.map step (default: odin_grid's own choice)")
  parser.add_argument("--json", default="benchmarks/results/odin_grid.json",
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); '' for nowhere")
  args = parser.parse_args()

  import torch
  from oodjax import data, models
  from oodjax.detectors.odin import PAPER_EPSILONS, PAPER_TEMPERATURES, odin_grid
  from oodjax.detectors.odin import odin_perturbation

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  ds = data.load("embedded/fashion_mnist", "test").take(slice(0, args.images))
  x = data.normalize(ds.images, ds.mean, ds.std)  # [B, 28, 28, 1]
  model = models.get_model("small_cnn", num_classes=10)
  variables = _load_variables(model, args.workdir, jnp.zeros((1, *ds.image_shape)))
  apply_fn = models.inference_apply(model)
  temps, eps = np.asarray(PAPER_TEMPERATURES, np.float32), np.asarray(PAPER_EPSILONS, np.float32)
  n_t, n_e = len(temps), len(eps)
  grid_kwargs = dict(std=ds.std, chunk_size=args.chunk_size)
  if args.forward_batch is not None:
    grid_kwargs["forward_batch"] = args.forward_batch

  # (1) oodjax, after one warm-up call that compiles.
  ours = odin_grid(apply_fn, variables, x, temps, eps, **grid_kwargs)
  t_ours = _best_of(lambda: odin_grid(apply_fn, variables, x, temps, eps, **grid_kwargs),
                    args.repeats)

  # (2) the released procedure in PyTorch (eager: nothing to warm up beyond one small call).
  net = torch_twin.small_cnn_twin(variables, (32, 64), 128, 10, 1, 28)
  torch_twin.released_odin_grid(net, x[:8], temps[:1], eps[:1], ds.std)
  start = time.perf_counter()
  theirs = torch_twin.released_odin_grid(net, x, temps, eps, ds.std, batch_size=args.chunk_size)
  t_theirs = time.perf_counter() - start

  # (3) the floor: the same jitted pieces odin_grid is made of, run once per pass.
  perturb = jax.jit(lambda v, xb, t: odin_perturbation(apply_fn, v, xb, temperature=t,
                                                       std=ds.std))
  forward = jax.jit(lambda v, xb: jnp.max(jax.nn.softmax(apply_fn(v, xb)), -1))
  chunks = [jnp.asarray(x[s:s + args.chunk_size]) for s in range(0, len(x), args.chunk_size)]
  jax.block_until_ready([perturb(variables, c, jnp.float32(1.0)) for c in chunks[:1]])
  jax.block_until_ready([forward(variables, c) for c in chunks[:1]])
  t_fwd_bwd = _best_of(lambda: [perturb(variables, c, jnp.float32(1.0)) for c in chunks],
                       args.repeats)
  t_fwd = _best_of(lambda: [forward(variables, c) for c in chunks], args.repeats)
  t_floor = n_t * t_fwd_bwd + n_t * n_e * t_fwd

  result = {
      "images": len(x), "grid": [n_t, n_e], "cpu_threads": threads,
      "backend": jax.default_backend(), "oodjax_s": t_ours, "released_torch_s": t_theirs,
      "floor_s": t_floor, "speedup_over_released": t_theirs / t_ours,
      "ratio_to_floor": t_ours / t_floor,
      "max_abs_score_diff": float(np.max(np.abs(ours - theirs))),
  }
  print(f"ODIN grid {n_t} x {n_e} on {len(x)} images, {threads} CPU threads "
        f"({jax.default_backend()}):")
  print(f"  (1) oodjax odin_grid          {t_ours:8.2f} s")
  print(f"  (2) released, PyTorch twin    {t_theirs:8.2f} s   speed-up (2)/(1) = "
        f"{result['speedup_over_released']:.2f}x  (goal >= 3.5x)")
  print(f"  (3) compute floor             {t_floor:8.2f} s   ratio (1)/(3) = "
        f"{result['ratio_to_floor']:.2f}x  (goal <= 1.2x)")
  print(f"  max |score (1) - score (2)| = {result['max_abs_score_diff']:.2e}")
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
