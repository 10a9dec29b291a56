"""ENVISE's exported binary student: XNOR-popcount on packed bits against float32 arithmetic.

    .venv/bin/python -m benchmarks.envise_xnor            # about 3 minutes on 2 CPU cores

GEMM (the issue's measurement): A [M, K] @ B [K, N] of +-1 matrices, M x K x N = 1024 x 4608 x
512, timed side by side, each repeat running every contender once in a rotating order; medians
compared. All four give the same integers (checked).

* `float32 matmul`: `A @ B` on the +-1 values as float32 (XLA's CPU GEMM, both cores).
* `xnor, packed`: `packed.xnor_popcount_matmul` with its default blocking: rows of A in blocks
  (`lax.map`), K walked a few words per step (`lax.scan`) into an int32 [rows, N] accumulator.
* `xnor, row blocks`: the blocking the issue describes: `lax.map` over blocks of 32 rows, each
  forming its whole [32, N, words] XOR tensor and summing its popcounts.
* `xnor, naive`: one `population_count(bitwise_xor(a[:, None], b[None]))` over the whole
  [M, N, words] tensor (302 MB here) and a sum.

Student (the issue's goal: the exported binary student's binary layers >= 2x faster than the
float student's): `students.get_student("binary_vgg16", 100)` at 32x32x3, random weights (speed
does not depend on them), a batch of `--batch-size` images. One float forward records every
binary layer's input; then, on those inputs,

* `float binary layers`: each `BinaryConv` run as the float student runs it (zero padding,
  sign, float conv with alpha * sign(W) from the latent kernel);
* `packed binary layers`: the same layers from the export (`packed.packed_conv` on the packed
  words and alpha);

* `float layers, im2col GEMM`: the float layers written as the packed path is (im2col by
  `lax.conv_general_dilated_patches`, one float32 GEMM, alpha): separates what the bits buy
  from what XLA's CPU convolution costs (it runs well below its GEMM's FLOP rate here);

and, for context, the whole network: `model.apply` against `packed.apply_packed` (the real stem,
BatchNorms, pools and head are the same float code in both). Per-layer times are reported too.
The machine's load average is recorded before and after (other jobs on a shared 2-core machine
move ratios by 10% or more).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from benchmarks.vmdls import _median_interleaved
from benchmarks.machine import cpu_name
from oodjax.envise import packed, students
from oodjax.envise.binary import BinaryConv, BinaryDense, same_pads, xnor_weights

GOAL = 2.0
GEMM_SHAPE = (1024, 4608, 512)
STUDENT = "binary_vgg16"
NUM_CLASSES = 100
SHAPE = (32, 32, 3)


def naive_xnor_matmul(a_words: jax.Array, b_words: jax.Array, k: int) -> jax.Array:
  """K - 2 popcount(a XOR b) with the whole [M, N, words] XOR tensor formed at once."""
  x = jnp.bitwise_xor(a_words[:, None, :], b_words[None, :, :])  # [M, N, words]
  return k - 2 * jnp.sum(lax.population_count(x).astype(jnp.int32), axis=-1)


def row_block_xnor_matmul(a_words: jax.Array, b_words: jax.Array, k: int,
                          rows: int = 32) -> jax.Array:
  """`lax.map` over blocks of `rows` rows of A, each forming its [rows, N, words] XOR tensor."""
  m, w = a_words.shape
  blocks = a_words.reshape(m // rows, rows, w)  # M divisible by rows here

  def block(a):  # [rows, words] -> [rows, N]
    x = jnp.bitwise_xor(a[:, None, :], b_words[None, :, :])  # [rows, N, words]
    return jnp.sum(lax.population_count(x).astype(jnp.int32), axis=-1)

  return k - 2 * lax.map(block, blocks).reshape(m, -1)


def bench_gemm(repeats: int) -> dict:
  m, k, n = GEMM_SHAPE
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.choice(np.float32([-1, 1]), size=(m, k)))
  b = jnp.asarray(rng.choice(np.float32([-1, 1]), size=(k, n)))
  a_words, _ = packed.pack_signs(a, axis=1)  # [M, words]
  b_words, _ = packed.pack_signs(b, axis=0)  # [N, words]
  matmul = jax.jit(jnp.matmul)
  chunked = jax.jit(packed.xnor_popcount_matmul, static_argnums=2)
  row_blocks = jax.jit(row_block_xnor_matmul, static_argnums=2)
  naive = jax.jit(naive_xnor_matmul, static_argnums=2)
  fns = {"float32 matmul": lambda: matmul(a, b),
         "xnor, packed": lambda: chunked(a_words, b_words, k),
         "xnor, row blocks": lambda: row_blocks(a_words, b_words, k),
         "xnor, naive": lambda: naive(a_words, b_words, k)}
  expected = np.asarray(fns["float32 matmul"]()).astype(np.int64)
  for name, fn in fns.items():
    if not np.array_equal(np.asarray(fn()), expected):
      raise AssertionError(f"{name} does not reproduce the +-1 matmul")
  load_before = os.getloadavg()
  med = _median_interleaved(fns, repeats)
  base = med["float32 matmul"]
  result = {"m": m, "k": k, "n": n, "repeats": repeats, "seconds": med,
            "packed_blocking": {"rows": max(1, packed.TARGET_BLOCK_SIZE // n),
                                "words_per_step": packed.DEFAULT_WORDS_PER_STEP},
            "speedup": {name: base / s for name, s in med.items()},
            "load_before": load_before, "load_after": os.getloadavg()}
  print(f"GEMM {m} x {k} x {n} of +-1 values, median of {repeats}")
  for name, s in med.items():
    print(f"  {name:18s} {s * 1e3:8.1f} ms   float32 / this {base / s:5.2f}x")
  return result


def random_variables(model: nn.Module, x: jax.Array, seed: int):
  """Variables of the model's shapes with random values (skips `init`, slow on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in traverse_util.flatten_dict(shapes).items():
    if key[-1] in ("mean", "bias"):
      value = rng.normal(scale=0.5, size=leaf.shape)
    elif key[-1] in ("var", "scale"):
      value = rng.uniform(0.5, 2.0, size=leaf.shape)
    else:
      value = rng.normal(scale=1 / np.sqrt(np.prod(leaf.shape[:-1])), size=leaf.shape)
    flat[key] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(flat)


def binary_layer_calls(model: nn.Module, variables, x: jax.Array) -> list:
  """(name, unbound layer, input) of every binary layer call in one float forward."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (BinaryConv, BinaryDense)):
      calls.append(("/".join(module.path), module.clone(parent=None, name=None),
                    args[0] if args else kwargs["x"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.block_until_ready(model.apply(variables, x))
  return calls


def _run_packed(layer, words, alpha, h):
  if isinstance(layer, BinaryConv):
    return packed.packed_conv(h, words, alpha, kernel_size=layer.kernel_size,
                              strides=layer.strides, padding=layer.padding)
  return packed.packed_dense(h, words, alpha)


def _float_im2col(layer, kernel, h):
  """The float layer as im2col + one float32 GEMM (a second float baseline)."""
  if isinstance(layer, BinaryDense):
    return layer.apply({"params": {"kernel": kernel}}, h)
  alpha, signs = xnor_weights(kernel)  # [C_out], [k, k, C_in, C_out]
  k, s = layer.kernel_size, layer.strides
  if layer.padding == "SAME":
    (top, bottom), (left, right) = same_pads(h.shape[1:3], k, s)
    h = jnp.pad(h, ((0, 0), (top, bottom), (left, right), (0, 0)))
  patches = lax.conv_general_dilated_patches(
      jnp.where(h >= 0, 1.0, -1.0).astype(h.dtype), (k, k), (s, s), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H', W', C_in * k * k], C_in major
  w = jnp.transpose(signs, (2, 0, 1, 3)).reshape(-1, signs.shape[-1])  # [C_in * k * k, C_out]
  return (patches @ w) * alpha.reshape(1, 1, 1, -1)


def bench_student(batch_size: int, repeats: int, layer_repeats: int) -> dict:
  model = students.get_student(STUDENT, NUM_CLASSES)
  x = jax.random.normal(jax.random.key(1), (batch_size,) + SHAPE)
  variables = random_variables(model, x[:1], 0)
  exported = packed.export_student(model, variables, x[:1])
  report = packed.memory_report(variables, exported)
  calls = binary_layer_calls(model, variables, x)
  if any(not layer.binarize_input for _, layer, _ in calls):
    raise ValueError("a binary layer with real inputs has no XNOR path to time")
  params = traverse_util.flatten_dict(variables["params"])
  names = [name for name, _, _ in calls]
  layers = [layer for _, layer, _ in calls]
  inputs = [h for _, _, h in calls]
  kernels = [params[tuple(name.split("/")) + ("kernel",)] for name in names]
  packs = [exported.binary[name] for name in names]

  def float_layers(kernels, inputs):
    return [layer.apply({"params": {"kernel": k}}, h)
            for layer, k, h in zip(layers, kernels, inputs)]

  def packed_layers(packs, inputs):
    return [_run_packed(layer, p["words"], p["alpha"], h)
            for layer, p, h in zip(layers, packs, inputs)]

  def im2col_layers(kernels, inputs):
    return [_float_im2col(layer, k, h) for layer, k, h in zip(layers, kernels, inputs)]

  float_layers, packed_layers = jax.jit(float_layers), jax.jit(packed_layers)
  im2col_layers = jax.jit(im2col_layers)
  # Same outputs (up to the rounding of the float layer's sum of +-alpha terms).
  reference = float_layers(kernels, inputs)
  worst = max(float(jnp.max(jnp.abs(f - p)) / jnp.max(jnp.abs(f)))
              for other in (packed_layers(packs, inputs), im2col_layers(kernels, inputs))
              for f, p in zip(reference, other))
  if worst > 1e-4:
    raise AssertionError(f"packed and float binary layers differ by {worst:.1e} (relative)")
  float_model = jax.jit(model.apply)
  packed_model = jax.jit(packed.apply_packed, static_argnums=0)

  load_before = os.getloadavg()
  med = _median_interleaved({
      "float binary layers": lambda: float_layers(kernels, inputs),
      "packed binary layers": lambda: packed_layers(packs, inputs),
      "float layers, im2col GEMM": lambda: im2col_layers(kernels, inputs),
      "float student": lambda: float_model(variables, x),
      "packed student": lambda: packed_model(model, exported, x)}, repeats)
  per_layer = []
  for name, layer, k, p, h in zip(names, layers, kernels, packs, inputs):
    f_one = jax.jit(lambda k, h, layer=layer: layer.apply({"params": {"kernel": k}}, h))
    p_one = jax.jit(lambda p, h, layer=layer: _run_packed(layer, p["words"], p["alpha"], h))
    one = _median_interleaved({"float": functools.partial(f_one, k, h),
                               "packed": functools.partial(p_one, p, h)}, layer_repeats)
    per_layer.append({"name": name, "input": list(h.shape), "features": layer.features,
                      "float_s": one["float"], "packed_s": one["packed"],
                      "speedup": one["float"] / one["packed"]})
  speedup = med["float binary layers"] / med["packed binary layers"]
  speedup_im2col = med["float layers, im2col GEMM"] / med["packed binary layers"]
  result = {
      "student": STUDENT, "num_classes": NUM_CLASSES, "input": list(SHAPE),
      "batch_size": batch_size, "repeats": repeats, "binary_layers": len(calls),
      "seconds": med,
      "ms_per_image": {k: 1e3 * s / batch_size for k, s in med.items()},
      "speedup_binary_layers": speedup, "speedup_vs_float_im2col": speedup_im2col,
      "speedup_student": med["float student"] / med["packed student"],
      "goal": GOAL, "max_relative_difference": worst, "per_layer": per_layer,
      "memory": report, "load_before": load_before, "load_after": os.getloadavg()}
  print(f"{STUDENT} at {SHAPE}, batch {batch_size}, {len(calls)} binary layers, "
        f"median of {repeats}")
  for k, s in med.items():
    print(f"  {k:26s} {s * 1e3:8.1f} ms  ({1e3 * s / batch_size:6.2f} ms / image)")
  print(f"  binary layers: float / packed {speedup:.2f}x  (goal >= {GOAL}x)")
  print(f"  binary layers: float im2col GEMM / packed {speedup_im2col:.2f}x")
  print(f"  whole student: float / packed {result['speedup_student']:.2f}x")
  print(f"  per layer (median of {layer_repeats}):")
  for row in per_layer:
    print(f"    {row['name']:42s} {tuple(row['input'])!s:18s} -> {row['features']:4d}  "
          f"{row['float_s'] * 1e3:7.1f} / {row['packed_s'] * 1e3:6.1f} ms  "
          f"{row['speedup']:5.2f}x")
  fb, pb = report["float_bits"], report["packed_bits"]
  print(f"  memory: float {fb['total'] / 8e6:.2f} MB -> exported {pb['total'] / 8e6:.2f} MB "
        f"({report['ratio']['total']:.1f}x); binary layers {fb['binary'] / 8e6:.2f} MB -> "
        f"{pb['binary'] / 8e6:.3f} MB ({report['ratio']['binary']:.1f}x)")
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--student-repeats", type=int, default=5)
  parser.add_argument("--layer-repeats", type=int, default=3)
  parser.add_argument("--json", default="benchmarks/results/envise_xnor.json",
                      help="where to write the numbers; '' for nowhere")
  args = parser.parse_args()
  gemm = bench_gemm(args.repeats)
  student = bench_student(args.batch_size, args.student_repeats, args.layer_repeats)
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "backend": jax.default_backend(), "cpu": cpu_name(), "cpu_threads": os.cpu_count(),
        "jax": jax.__version__, "gemm": gemm, "student": student}, indent=2) + "\n")


if __name__ == "__main__":
  main()
