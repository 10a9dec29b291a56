"""VMDLS: scoring cost against a plain forward pass, and the vmapped loss ablation against
training its variants one after another.

    .venv/bin/python -m benchmarks.vmdls            # about 5 minutes on 2 CPU cores

Scoring (issue 9's goal: scoring 10,000 images, fit excluded, <= 1.5x a plain forward pass of the
same backbone). Small CNN backbone at 28x28x1, d = 16, 10 classes, random weights (speed does
not depend on them), class Gaussians fitted on random labels. Timed side by side, each repeat
running every contender once in a rotating order; medians compared:

* `forward, one pass`: the backbone's jitted `apply` over all N images in ONE call: the
  strictest floor.
* `forward, batches`: the same in batches of `--batch-size`, as evaluation feeds the network.
* `VMDLS_b`: `score_vmdls_b` jitted per batch: one forward with the ensemble's insides, and
  the log-likelihoods of every class Gaussian.
* `VMDLS`: `score_vmdls`: VMDLS_b plus the autoencoder and t¹ of the reconstruction (the
  backbone's first block on x̂, in the same forward pass: `ensemble_and_first_member`).

Ablation (the Table 4 variants as one program, `train_vmdls_variants`): one training step of
V variants as the vmapped step against V calls of the single-variant step (one compiled program
reused: the loss weights are arrays of the state), on the same batch of B_C x B_N images,
interleaved; plus each one's compile time. A third contender runs the variants one after
another INSIDE one program (`jax.lax.map` over the stacked state): one compile and one pass over
the data like the vmapped step, the variants' convolutions unbatched like the sequential loop.
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
import numpy as np

from benchmarks.machine import cpu_name
from oodjax.detectors.registry import VMDLS_AUTOENCODER
from oodjax.models import get_model
from oodjax.train.schedules import make_optimizer
from oodjax.train.classifier import default_train_config
from oodjax.vmdls import VMDLSEncoder, gaussians, scoring
from oodjax.vmdls.train import create_vmdls_state, loss_hparams, make_vmdls_train_step, vmdls_config

GOAL_SCORING = 1.5
SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _median_interleaved(fns: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each zero-argument function, run in a rotating order per repeat."""
  for fn in fns.values():  # warm-up: compile and touch the data once
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  order = list(fns)
  for r in range(repeats):
    for k in order[r % len(order):] + order[:r % len(order)]:
      start = time.perf_counter()
      jax.block_until_ready(fns[k]())
      times[k].append(time.perf_counter() - start)
  return {k: statistics.median(t) for k, t in times.items()}


def bench_scoring(n: int, batch_size: int, repeats: int) -> dict:
  backbone = get_model("small_cnn", num_classes=NUM_CLASSES)
  encoder = VMDLSEncoder(backbone=backbone, latent_dim=16)
  x = jax.random.normal(jax.random.key(1), (n,) + SHAPE)
  backbone_vars = jax.jit(backbone.init)(jax.random.key(0), x[:1])
  enc_vars = jax.jit(encoder.init)(jax.random.key(2), x[:1])
  ae_params = jax.jit(VMDLS_AUTOENCODER.init)(jax.random.key(3), x[:1])["params"]

  # Class Gaussians of the ensembles of 2,000 images with random labels: the scoring cost
  # depends only on their shapes.
  is_block = scoring.ensemble_blocks(encoder, enc_vars, x[:1])
  t, _ = jax.jit(functools.partial(scoring.feature_ensemble, encoder, is_block=is_block))(
      enc_vars, x[:2000])
  labels = np.arange(2000) % NUM_CLASSES
  fitted = gaussians.fit_class_gaussians(gaussians.accumulate(
      gaussians.empty_sums(NUM_CLASSES, t.shape[-1]), np.asarray(t), labels))
  state = {"means": fitted.means, "whitening": fitted.whitening, "log_det": fitted.log_det,
           "ridge": fitted.ridge, "autoencoder": ae_params, "log_lik_max": jnp.float32(1.0),
           "w_scale": jnp.float32(1.0)}

  forward = jax.jit(functools.partial(backbone.apply, train=False))
  vmdls_b = jax.jit(lambda v, s, x: scoring.score_vmdls_b(encoder, v, s, x)[0])
  vmdls = jax.jit(lambda v, s, x: scoring.score_vmdls(encoder, v, s, x,
                                                      autoencoder=VMDLS_AUTOENCODER)[0])
  batches = [x[i:i + batch_size] for i in range(0, n, batch_size)]
  fns = {
      "forward, one pass": lambda: forward(backbone_vars, x),
      "forward, batches": lambda: [forward(backbone_vars, b) for b in batches],
      "VMDLS_b": lambda: [vmdls_b(enc_vars, state, b) for b in batches],
      "VMDLS": lambda: [vmdls(enc_vars, state, b) for b in batches],
  }
  load_before = os.getloadavg()
  med = _median_interleaved(fns, repeats)
  floor = min(med["forward, one pass"], med["forward, batches"])
  result = {"images": n, "batch_size": batch_size, "repeats": repeats,
            "feature_dim": int(t.shape[-1]), "seconds": med, "goal": GOAL_SCORING,
            "floor": "forward, one pass" if floor == med["forward, one pass"]
                     else "forward, batches",
            "ratio_vmdls_b": med["VMDLS_b"] / floor, "ratio_vmdls": med["VMDLS"] / floor,
            "load_before": load_before, "load_after": os.getloadavg()}
  print(f"scoring {n} images {SHAPE}, batches of {batch_size}, F = {result['feature_dim']}, "
        f"median of {repeats}")
  for k, s in med.items():
    print(f"  {k:20s} {s:8.3f} s  ({n / s:8.0f} img/s)")
  print(f"  VMDLS_b / floor  {result['ratio_vmdls_b']:.2f}x  (goal <= {GOAL_SCORING}x)")
  print(f"  VMDLS   / floor  {result['ratio_vmdls']:.2f}x  (goal <= {GOAL_SCORING}x)")
  return result


def bench_ablation(num_variants: int, repeats: int, steps: int) -> dict:
  vc = vmdls_config(latent_dim=2)
  b = int(vc.classes_per_batch) * int(vc.per_class)
  encoder = VMDLSEncoder(backbone=get_model("small_cnn", num_classes=NUM_CLASSES), latent_dim=2)
  tc = default_train_config().train
  tc.update(dict(optimizer="adam", learning_rate=1e-3, schedule="constant"))
  tx, _ = make_optimizer(tc, 1000)
  sample = jnp.zeros((1,) + SHAPE)
  state = create_vmdls_state(encoder, tx, jax.random.key(0), sample, NUM_CLASSES,
                             loss_hparams(vc))
  # Class means ready, so every term of Eq. 7 is computed (as from epoch 1 on).
  state = state.replace(means_ready=jnp.ones((), bool),
                        class_means=jax.random.normal(jax.random.key(4), (NUM_CLASSES, 2)))
  batch = {"image": jax.random.normal(jax.random.key(1), (b,) + SHAPE),
           "label": jnp.repeat(jnp.arange(NUM_CLASSES), b // NUM_CLASSES)}
  step = make_vmdls_train_step(encoder, tx, steps_per_epoch=10_000)
  single = jax.jit(step)
  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_variants,) + a.shape), state)
  vmapped = jax.jit(jax.vmap(step, in_axes=(0, None, None)))
  mapped = jax.jit(lambda st, batch, rng: jax.lax.map(lambda s: step(s, batch, rng), st))
  rng = jax.random.key(5)
  singles = [jax.tree.map(lambda a, v=v: a[v], stacked) for v in range(num_variants)]

  compile_s = {}
  for name, fn, arg in (("sequential", single, singles[0]), ("vmapped", vmapped, stacked),
                        ("lax.map", mapped, stacked)):
    start = time.perf_counter()
    jax.block_until_ready(fn(arg, batch, rng))
    compile_s[name] = time.perf_counter() - start

  def run_sequential():
    out = None
    for s in singles:
      st = s
      for _ in range(steps):
        st, out = single(st, batch, rng)
    return out

  def run_stacked(fn):
    st, out = stacked, None
    for _ in range(steps):
      st, out = fn(st, batch, rng)
    return out

  load_before = os.getloadavg()
  med = _median_interleaved({"sequential": run_sequential,
                             "vmapped": lambda: run_stacked(vmapped),
                             "lax.map": lambda: run_stacked(mapped)}, repeats)
  result = {"variants": num_variants, "batch": b, "steps": steps, "repeats": repeats,
            "seconds": med, "compile_seconds": compile_s,
            "speedup": med["sequential"] / med["vmapped"],
            "speedup_lax_map": med["sequential"] / med["lax.map"],
            "load_before": load_before, "load_after": os.getloadavg()}
  print(f"ablation: {num_variants} variants x {steps} steps of {b} images, median of {repeats}")
  for k in med:
    print(f"  {k:10s} {med[k]:8.3f} s  (first call, compile included: {compile_s[k]:.1f} s)")
  print(f"  sequential / vmapped  {result['speedup']:.2f}x")
  print(f"  sequential / lax.map  {result['speedup_lax_map']:.2f}x")
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", type=int, default=6)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--ablation-repeats", type=int, default=3)
  parser.add_argument("--json", default="benchmarks/results/vmdls.json",
                      help="where to write the numbers (benchmarks/README.md is generated from "
                      "it); '' for nowhere")
  args = parser.parse_args()
  scoring_result = bench_scoring(args.n, args.batch_size, args.repeats)
  ablation_result = bench_ablation(args.variants, args.ablation_repeats, args.steps)
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "backend": jax.default_backend(), "cpu": cpu_name(), "cpu_threads": os.cpu_count(),
        "jax": jax.__version__, "scoring": scoring_result, "ablation": ablation_result},
        indent=2) + "\n")


if __name__ == "__main__":
  main()
