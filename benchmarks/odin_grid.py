"""ODIN's full 10 x 21 (T, ε) grid: oodjax `odin_grid` vs the released per-configuration
procedure in PyTorch vs the compute floor, on the same weights, images and CPU threads.

  .venv/bin/python -m benchmarks.odin_grid [--images 1000] [--repeats 3] [--skip-released]
      [--workdir runs/fmnist_small_cnn]

(1) oodjax `odin_grid`: T backward passes, then T·E forwards, one compiled program per chunk.
(2) the released procedure (forward, backward, forward for every (T, ε)), batched, in PyTorch on
    a twin of the network with the Flax weights copied in (`benchmarks/torch_twin.py`). Timed
    once (it takes ~75 s); `--skip-released` leaves it out of exploratory runs, which then
    write no JSON unless `--json` names a file.
(3) the compute floor, T x (forward + backward) + T·E x forward, priced two ways:
    (3a) strict: ONE jitted max-softmax forward over all N images in one call, and ONE jitted
         forward + backward (`odin_perturbation`) over all N images in one call;
    (3b) chunked: the same jitted pieces run over `--chunk-size` chunks, summed per pass.
    Also printed: "240 forwards", (3·T + T·E) x the strict forward, i.e. the floor if a
    backward pass cost two forwards (on XLA:CPU it costs far more, see benchmarks/README.md).

Every repeat times (1) once and each floor piece several times, one after the other, so load
from other processes hits them alike; the reported numbers are medians over all repeats. The
1-minute load average (which counts this benchmark's own threads) is recorded at the start and
the end. Prints the times, the speed-up of (1) over (2), the ratios of (1) to (3a), (3b) and the
240 forwards, and the largest score difference between (1) and (2). Needs the `bench` extra
(torch 2.13.0 CPU) unless `--skip-released`.
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

# Goals of the issue: the grid within 1.25x of the strict floor, and 8x over the released code.
GOAL_RATIO_TO_STRICT_FLOOR = 1.25
GOAL_SPEEDUP_OVER_RELEASED = 8.0
# Floor pieces are short (a forward over 1,000 images is ~35 ms): time each this many times
# per repeat.
PIECE_CALLS_PER_REPEAT = 5


def _time(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


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
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved repeats; medians over them are reported")
  parser.add_argument("--workdir", default=None,
                      help="a finished run of configs/fmnist_small_cnn.py to take weights from "
                      "(default: freshly initialised weights; the timings do not depend on them)")
  parser.add_argument("--chunk-size", type=int, default=250,
                      help="images per compiled call of odin_grid, of the chunked floor and of "
                      "the PyTorch batches")
  parser.add_argument("--forward-batch", type=int, default=None,
                      help="configs per lax.map step (default: odin_grid's own choice)")
  parser.add_argument("--skip-released", action="store_true",
                      help="leave out the slow PyTorch run of the released procedure")
  parser.add_argument("--json", default=None,
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); default benchmarks/results/odin_grid.json, or nowhere with "
                      "--skip-released; '' for nowhere")
  args = parser.parse_args()
  json_path = args.json
  if json_path is None:
    json_path = "" if args.skip_released else "benchmarks/results/odin_grid.json"

  from oodjax import data, models
  from oodjax.detectors.odin import (PAPER_EPSILONS, PAPER_TEMPERATURES, odin_grid,
                                     odin_perturbation)

  threads = os.cpu_count()
  load_start = os.getloadavg()
  ds = data.load("embedded/fashion_mnist", "test").take(slice(0, args.images))
  x = data.normalize(ds.images, ds.mean, ds.std)  # [N, 28, 28, 1]
  model = models.get_model("small_cnn", num_classes=10)
  variables = _load_variables(model, args.workdir, jnp.zeros((1, *ds.image_shape)))
  apply_fn = models.inference_apply(model)
  temps, eps = np.asarray(PAPER_TEMPERATURES, np.float32), np.asarray(PAPER_EPSILONS, np.float32)
  n_t, n_e = len(temps), len(eps)
  grid_kwargs = {"std": ds.std, "chunk_size": args.chunk_size}
  if args.forward_batch is not None:
    grid_kwargs["forward_batch"] = args.forward_batch

  # The floor's pieces: the same jitted forward and forward + backward odin_grid is made of.
  perturb = jax.jit(lambda v, xb, t: odin_perturbation(apply_fn, v, xb, temperature=t,
                                                       std=ds.std))
  forward = jax.jit(lambda v, xb: jnp.max(jax.nn.softmax(apply_fn(v, xb)), -1))
  one_temperature = jnp.float32(1.0)
  x_all = jnp.asarray(x)  # [N, ...], (3a) sees all N images in one call
  chunks = [jnp.asarray(x[s:s + args.chunk_size]) for s in range(0, len(x), args.chunk_size)]
  run = {
      "grid": lambda: odin_grid(apply_fn, variables, x, temps, eps, **grid_kwargs),
      "fwd": lambda: forward(variables, x_all),
      "fwd_bwd": lambda: perturb(variables, x_all, one_temperature),
      "fwd_chunked": lambda: [forward(variables, c) for c in chunks],
      "fwd_bwd_chunked": lambda: [perturb(variables, c, one_temperature) for c in chunks],
  }
  ours = np.asarray(run["grid"]())  # compiles
  for name in ("fwd", "fwd_bwd", "fwd_chunked", "fwd_bwd_chunked"):
    jax.block_until_ready(run[name]())  # compiles (every chunk shape)

  times = {name: [] for name in run}
  for _ in range(args.repeats):
    for name, fn in run.items():
      calls = 1 if name == "grid" else PIECE_CALLS_PER_REPEAT
      times[name] += [_time(fn) for _ in range(calls)]
  med = {name: float(np.median(ts)) for name, ts in times.items()}
  t_ours = med["grid"]
  strict_floor = n_t * med["fwd_bwd"] + n_t * n_e * med["fwd"]
  chunked_floor = n_t * med["fwd_bwd_chunked"] + n_t * n_e * med["fwd_chunked"]
  forwards_240 = (3 * n_t + n_t * n_e) * med["fwd"]

  t_theirs = max_diff = None
  if not args.skip_released:
    import torch

    from benchmarks import torch_twin
    torch.set_num_threads(threads)
    net = torch_twin.small_cnn_twin(variables, (32, 64), 128, 10, 1, 28)
    torch_twin.released_odin_grid(net, x[:8], temps[:1], eps[:1], ds.std)  # eager: tiny warm-up
    start = time.perf_counter()
    theirs = torch_twin.released_odin_grid(net, x, temps, eps, ds.std,
                                           batch_size=args.chunk_size)
    t_theirs = time.perf_counter() - start
    max_diff = float(np.max(np.abs(ours - theirs)))
  load_end = os.getloadavg()

  result = {
      "images": len(x), "grid": [n_t, n_e], "cpu_threads": threads,
      "backend": jax.default_backend(), "repeats": args.repeats, "chunk_size": args.chunk_size,
      "oodjax_s": t_ours, "oodjax_s_per_repeat": times["grid"],
      "released_torch_s": t_theirs,
      "strict_floor_s": strict_floor, "chunked_floor_s": chunked_floor,
      "forwards_240_s": forwards_240,
      "forward_s": med["fwd"], "forward_backward_s": med["fwd_bwd"],
      "forward_chunked_s": med["fwd_chunked"],
      "forward_backward_chunked_s": med["fwd_bwd_chunked"],
      "ratio_to_strict_floor": t_ours / strict_floor,
      "ratio_to_chunked_floor": t_ours / chunked_floor,
      "ratio_to_forwards_240": t_ours / forwards_240,
      "speedup_over_released": None if t_theirs is None else t_theirs / t_ours,
      "goal_ratio_to_strict_floor": GOAL_RATIO_TO_STRICT_FLOOR,
      "goal_speedup_over_released": GOAL_SPEEDUP_OVER_RELEASED,
      "max_abs_score_diff": max_diff,
      "loadavg_start": list(load_start), "loadavg_end": list(load_end),
  }
  def row(label: str, value: str) -> str:
    return f"  {label:<44}{value}"

  print(f"ODIN grid {n_t} x {n_e} on {len(x)} images, {threads} CPU threads "
        f"({jax.default_backend()}), medians of {args.repeats} interleaved repeats, "
        f"chunks of {args.chunk_size}:")
  print(row(f"forward, all {len(x)} images in one call", f"{med['fwd'] * 1e3:8.1f} ms"))
  print(row(f"forward + backward, all {len(x)} in one call",
            f"{med['fwd_bwd'] * 1e3:8.1f} ms   = {med['fwd_bwd'] / med['fwd']:.1f} forwards"))
  print(row("(1) oodjax odin_grid", f"{t_ours:8.2f} s    repeats: "
            + ", ".join(f"{t:.2f}" for t in times["grid"])))
  if t_theirs is None:
    print(row("(2) released, PyTorch twin", "  skipped (--skip-released)"))
  else:
    print(row("(2) released, PyTorch twin",
              f"{t_theirs:8.2f} s    speed-up (2)/(1) = {result['speedup_over_released']:.2f}x "
              f"(goal >= {GOAL_SPEEDUP_OVER_RELEASED}x)"))
  print(row("(3a) strict floor, one call per pass",
            f"{strict_floor:8.2f} s    ratio (1)/(3a) = {result['ratio_to_strict_floor']:.2f}x "
            f"(goal <= {GOAL_RATIO_TO_STRICT_FLOOR}x)"))
  print(row(f"(3b) chunked floor, chunks of {args.chunk_size}",
            f"{chunked_floor:8.2f} s    ratio (1)/(3b) = {result['ratio_to_chunked_floor']:.2f}x"))
  print(row("240 forwards, (3T + T·E) x forward",
            f"{forwards_240:8.2f} s    ratio (1)/240 = {result['ratio_to_forwards_240']:.2f}x"))
  if max_diff is not None:
    print(f"  max |score (1) - score (2)| = {max_diff:.2e}")
  print("  load average (1, 5, 15 min; counts this run's own threads): start "
        + ", ".join(f"{a:.2f}" for a in load_start) + "; end "
        + ", ".join(f"{a:.2f}" for a in load_end))
  if json_path:
    pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
