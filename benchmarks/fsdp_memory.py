"""Per-device memory of a training step: parameter sharding (FSDP) against data parallelism.

    .venv/bin/python -m benchmarks.fsdp_memory            # 3 networks x 3 meshes, ~5 min on 2 cores
    .venv/bin/python -m benchmarks.fsdp_memory --models resnet50 --devices 4

For ResNet-50, WRN-28-10 and DenseNet-BC-100 at CIFAR shape (32x32x3, K = 10, global batch
128, SGD with Nesterov momentum: the ODIN recipe), the classifier's train step
(`oodjax.train.step.make_train_step`) is compiled ahead of time, not run, on `--devices` fake
CPU devices under three meshes: pure data parallelism (all devices on "data", state
replicated), and FSDP (`mesh.param_sharding="fsdp"`) on a (data, fsdp) mesh with half and with
all of the devices on "fsdp". XLA's memory analysis of each compiled program gives, per device:
the state (parameters, momentum, BatchNorm statistics: `state_bytes`), the step's inputs
(state + the batch shard + key) and its scratch memory (activations, gradients, parameters
gathered for use). Compiling on fake CPU devices prices the same sharded program a TPU or GPU
slice would run; scratch sizes come from XLA:CPU's scheduler and differ on an accelerator.
Writes benchmarks/results/fsdp_memory.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MODELS = ("resnet50", "wrn28_10", "densenet_bc100")


def _measure(name: str, shape: tuple[int, ...], axes: tuple[str, ...], rule: str,
             batch_size: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from oodjax.models import get_model
  from oodjax.train import sharding as shd
  from oodjax.train.state import create_train_state
  from oodjax.train.step import make_classification_loss, make_train_step

  mesh = shd.make_mesh(shape, axes)
  model = get_model(name, 10)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  init = lambda rng: create_train_state(model, tx, rng, jnp.zeros((1, 32, 32, 3)))
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = shd.state_sharding(abstract, mesh, shd.param_rule(rule, mesh))
  step = shd.jit_train_step(make_train_step(make_classification_loss(model.apply), tx), mesh,
                            shardings)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32,
                                         sharding=shd.batch_sharding(mesh)),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                         sharding=shd.batch_sharding(mesh))}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
  start = time.perf_counter()
  compiled = step.lower(shd.with_shardings(abstract, shardings), batch, key).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  # The state's bytes on one device, from its shardings (what `memory_report` reads off the
  # live arrays during training).
  state_bytes = sum(
      math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  return {"model": name, "mesh": dict(zip(axes, mesh.devices.shape)), "param_sharding": rule,
          "state_bytes": int(state_bytes),
          "state_bytes_total": int(sum(l.size * l.dtype.itemsize
                                       for l in jax.tree.leaves(abstract))),
          "params": int(sum(l.size for l in jax.tree.leaves(abstract.params))),
          "argument_bytes": int(analysis.argument_size_in_bytes),
          "temp_bytes": int(analysis.temp_size_in_bytes),
          "compile_s": round(seconds, 1)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS))
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)
  if "jax" in sys.modules:
    raise SystemExit("run as a fresh process: the fake device count is set before jax starts")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  n = args.devices
  meshes = [((n,), ("data",), "replicated"), ((2, n // 2), ("data", "fsdp"), "fsdp"),
            ((1, n), ("data", "fsdp"), "fsdp")]
  rows = []
  for name in args.models:
    for shape, axes, rule in meshes:
      row = _measure(name, shape, axes, rule, args.batch_size)
      rows.append(row)
      mib = lambda b: b / 2**20  # noqa: E731
      print(f"{name:15s} {str(row['mesh']):28s} {rule:10s} state {mib(row['state_bytes']):8.1f}"
            f" MiB of {mib(row['state_bytes_total']):7.1f}, inputs "
            f"{mib(row['argument_bytes']):8.1f} MiB, scratch {mib(row['temp_bytes']):8.1f} MiB"
            f"  (compiled in {row['compile_s']} s)", flush=True)
  result = {"devices": n, "batch_size": args.batch_size, "backend": jax.default_backend(),
            "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
            "device_kind": jax.devices()[0].device_kind, "rows": rows}
  if not args.no_write:
    out = HERE / "results" / "fsdp_memory.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
