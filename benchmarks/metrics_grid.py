"""`metrics.metrics_grid` on ODIN's 10 x 21 grid against a plain loop calling scikit-learn, and
the sorts underneath.

  .venv/bin/python -m benchmarks.metrics_grid [--n 10000] [--repeats 5]

Random float32 ID and OOD scores, [10, 21, N] each, rounded to 3 decimals so that ties occur.
(a) `metrics_grid`, all five metrics of the 210 configurations in one compiled call (warmed up);
(b) the loop it replaces: per configuration `roc_auc_score`, `roc_curve(drop_intermediate=False)`
    (FPR at 95% TPR and the detection error) and two `average_precision_score`;
(c) (a)'s computation with XLA's sort and scans forced (what GPU/TPU run) instead of the numpy
    callback that the CPU backend uses.
Each repeat runs (a), (b) and (c) back to back, rotating which goes first; medians are compared.
Then the raw sorts of the [210, 2N] concatenated scores: `jnp.sort` and `jnp.argsort` under jit
(XLA's CPU sort), `np.sort` and `np.argsort(kind="stable")`. Prints the speed-up (b)/(a) (goal
>= 10x) and the largest difference between (a) and (b). Runtime: under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as skm

from oodjax import metrics

KEYS = ("fpr95", "detection_error", "auroc", "aupr_in", "aupr_out")
GOAL_SPEEDUP = 10.0  # issue: metrics_grid >= 10x the scikit-learn loop on CPU


def sklearn_loop(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, np.ndarray]:
  """The five metrics per grid point, one scikit-learn call set per configuration."""
  grid = scores_in.shape[:-1]
  table = {key: np.zeros(grid) for key in KEYS}
  is_in = np.r_[np.ones(scores_in.shape[-1]), np.zeros(scores_out.shape[-1])]
  for index in np.ndindex(*grid):
    scores = np.r_[scores_in[index], scores_out[index]]
    # ID positive, ranked by -score: "predicted positive" is "score <= threshold".
    fpr, tpr, _ = skm.roc_curve(is_in, -scores, drop_intermediate=False)
    table["fpr95"][index] = fpr[tpr >= 0.95].min()
    table["detection_error"][index] = (0.5 * (1 - tpr) + 0.5 * fpr).min()
    table["auroc"][index] = skm.roc_auc_score(is_in, -scores)
    table["aupr_in"][index] = skm.average_precision_score(is_in, -scores)
    table["aupr_out"][index] = skm.average_precision_score(1 - is_in, scores)
  return table


def _seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compiles)
  return statistics.median(_seconds(fn) for _ in range(repeats))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", type=int, nargs=2, default=(10, 21), help="T E")
  parser.add_argument("--n", type=int, default=10_000, help="scores per set and configuration")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="benchmarks/results/metrics_grid.json",
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); '' for nowhere")
  args = parser.parse_args()

  load_start = os.getloadavg()
  rng = np.random.default_rng(0)
  shape = (*args.grid, args.n)
  shift = rng.uniform(0.0, 2.0, (*args.grid, 1))  # each configuration its own separation
  scores_in = np.round(rng.normal(size=shape), 3).astype(np.float32)
  scores_out = np.round(rng.normal(size=shape) + shift, 3).astype(np.float32)
  device_in, device_out = jnp.asarray(scores_in), jnp.asarray(scores_out)

  xla_sort = jax.jit(lambda a, b: metrics._metrics_from_groups(metrics._tie_groups(a, b, "xla")))
  ours = metrics.metrics_grid(device_in, device_out)  # also the warm-up compiles
  jax.block_until_ready(xla_sort(device_in, device_out))
  contenders = {"metrics_grid": lambda: metrics.metrics_grid(device_in, device_out),
                "sklearn_loop": lambda: sklearn_loop(scores_in, scores_out),
                "xla_sort": lambda: xla_sort(device_in, device_out)}
  times = {name: [] for name in contenders}
  for r in range(args.repeats):
    order = list(contenders.items())
    for name, fn in order[r % 3:] + order[:r % 3]:
      times[name].append(_seconds(fn))
  t_ours, t_loop, t_xla = (statistics.median(times[name]) for name in contenders)
  theirs = sklearn_loop(scores_in, scores_out)
  diffs = {key: float(np.max(np.abs(np.asarray(ours[key], np.float64) - theirs[key])))
           for key in KEYS}

  # The sorts underneath, on the [configurations, N + M] concatenated scores.
  flat = np.concatenate([scores_in, scores_out], -1).reshape(-1, 2 * args.n)
  device_flat = jnp.asarray(flat)
  sorts = {
      "jnp_sort": jax.jit(lambda x: jnp.sort(x, axis=-1)),
      "jnp_argsort": jax.jit(lambda x: jnp.argsort(x, axis=-1)),
  }
  sort_s = {name: _median_seconds(lambda f=f: f(device_flat), args.repeats)
            for name, f in sorts.items()}
  sort_s["np_sort"] = _median_seconds(lambda: np.sort(flat, axis=-1), args.repeats)
  sort_s["np_argsort_stable"] = _median_seconds(
      lambda: np.argsort(flat, axis=-1, kind="stable"), args.repeats)

  load_end = os.getloadavg()
  configs = int(np.prod(args.grid))
  threads = len(os.sched_getaffinity(0))
  print(f"{args.grid[0]} x {args.grid[1]} grid, {args.n} ID + {args.n} OOD float32 scores per "
        f"configuration, median of {args.repeats} repeats, {threads} CPU threads, backend "
        f"{jax.default_backend()}; load average (1 min) {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end:")
  print(f"  (a) metrics_grid                 {t_ours:8.3f} s")
  print(f"  (b) sklearn loop ({configs} configs)   {t_loop:8.3f} s   speed-up (b)/(a) = "
        f"{t_loop / t_ours:.1f}x  (goal >= {GOAL_SPEEDUP:g}x)")
  print(f"  (c) (a) with XLA's sort           {t_xla:8.3f} s   (c)/(a) = {t_xla / t_ours:.1f}x")
  print("  max |(a) - (b)|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
  print(f"  sorts of [{flat.shape[0]}, {flat.shape[1]}] float32:")
  for name, seconds in sort_s.items():
    print(f"    {name:20s} {seconds:8.3f} s")
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "grid": list(args.grid), "n_in": args.n, "n_out": args.n, "repeats": args.repeats,
        "backend": jax.default_backend(), "jax": jax.__version__, "cpu_threads": threads,
        "loadavg_start": load_start, "loadavg_end": load_end,
        "metrics_grid_s": t_ours, "sklearn_loop_s": t_loop, "speedup": t_loop / t_ours,
        "goal_speedup": GOAL_SPEEDUP, "xla_sort_s": t_xla, "max_abs_diff": diffs,
        "sort_shape": list(flat.shape), "sort_s": sort_s}, indent=2) + "\n")


if __name__ == "__main__":
  main()
