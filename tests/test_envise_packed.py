"""Packed sign bits and XNOR-popcount inference against independent references.

References: a bit-by-bit Python loop for the word layout, numbers packed by hand, an int64 numpy
matmul of the +-1 matrices for the popcount GEMM, a float64 numpy loop convolution (zero
padding, sign, +-1 kernel, alpha) for the packed convolution, and the float `BinaryConv` /
`BinaryDense` layers and whole students of `oodjax.envise.binary` / `students`, which share no
code with the packed path beyond `xnor_weights` and `same_pads`.

Tolerances: the packed layers compute alpha * (exact integer); the float layers sum K terms
+-alpha in float32, which rounds to ~K * 6e-8 * alpha. rtol = 1e-5 of the output scale covers
that for the K <= a few hundred used here, while one wrong bit moves a value by 2 * alpha.

Ties: a +-1 dot product over an even K can be exactly 0. The packed path then gives exactly 0,
the float path a rounding residue of either sign, and a sign taken after an untrained
BatchNorm (mean 0, bias 0) flips on it. The student round trips therefore use random BatchNorm
statistics and offsets, as a trained student has, which puts every sign threshold away from 0.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from oodjax.envise import binary, packed, students

TOL = {"rtol": 1e-5, "atol": 1e-5}


def np_sign(x):
  return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int64)


def random_pm1(rng, shape):
  """Normal entries with a few exact zeros (sign(0) = +1 must be kept)."""
  x = rng.normal(size=shape).astype(np.float32)
  x[rng.random(shape) < 0.1] = 0.0
  return x


# ---------------------------------------------------------------------------------- packing


def test_pack_signs_hand_packed_word():
  # +1 -1 +1 +1 (0 counts as +1) -> bits 0, 2, 3 set -> 1 + 4 + 8 = 13; padding bits 0.
  words, k = packed.pack_signs(jnp.array([0.5, -2.0, 0.0, 3.0]))
  assert k == 4 and words.dtype == jnp.uint32
  np.testing.assert_array_equal(words, [13])
  # 33 entries: all +1 -> a full word and one bit of the second.
  words, k = packed.pack_signs(jnp.ones(33))
  np.testing.assert_array_equal(words, [0xFFFFFFFF, 1])
  # Entry 31 alone is the top bit.
  x = -np.ones(32, np.float32)
  x[31] = 1.0
  np.testing.assert_array_equal(packed.pack_signs(jnp.asarray(x))[0], [1 << 31])


@pytest.mark.parametrize("shape,axis", [((5, 1), -1), ((3, 31), 1), ((2, 32), -1),
                                        ((4, 33), -1), ((70, 3), 0), ((2, 100, 3), 1)])
def test_pack_signs_bits_and_round_trip(shape, axis):
  rng = np.random.default_rng(sum(shape))
  x = random_pm1(rng, shape)
  words, k = packed.pack_signs(jnp.asarray(x), axis=axis)
  moved = np.moveaxis(x, axis, -1)
  assert k == moved.shape[-1]
  assert words.shape == moved.shape[:-1] + (-(-k // 32),)
  # Bit by bit: bit b of word w is 1 iff entry 32 w + b is >= 0; bits past k are 0.
  w = np.asarray(words)
  for idx in np.ndindex(moved.shape[:-1]):
    for j in range(32 * w.shape[-1]):
      bit = (int(w[idx + (j // 32,)]) >> (j % 32)) & 1
      assert bit == (int(moved[idx + (j,)] >= 0) if j < k else 0)
  back = packed.unpack_signs(words, k, axis=axis)
  np.testing.assert_array_equal(back, np_sign(x))


def test_pack_signs_bad_input():
  with pytest.raises(ValueError, match="scalar"):
    packed.pack_signs(jnp.float32(1.0))
  with pytest.raises(ValueError, match="empty"):
    packed.pack_signs(jnp.zeros((3, 0)))
  with pytest.raises(ValueError, match="cannot hold"):
    packed.unpack_signs(jnp.zeros((2, 2), jnp.uint32), 65)
  with pytest.raises(ValueError, match="uint32"):
    packed.unpack_signs(jnp.zeros((2, 2), jnp.int32), 40)


# ------------------------------------------------------------------------------ popcount GEMM


@functools.partial(jax.jit, static_argnames=("k", "chunk", "words_per_step"))
def gemm(a, b, *, k, chunk, words_per_step):
  return packed.xnor_popcount_matmul(a, b, k, chunk=chunk, words_per_step=words_per_step)


@pytest.mark.parametrize("m,k,n,chunk,words_per_step", [
    (1, 1, 1, None, 4),      # one bit
    (5, 31, 3, 1, 1),        # one row per block
    (7, 32, 9, 5, 2),        # partial last block (7 = 5 + 2), one full word
    (13, 100, 6, 4, 3),      # partial block (13 = 3 * 4 + 1), 4 words in 3 + 1
    (16, 100, 6, 4, 2),      # blocks and steps that divide
    (33, 257, 17, None, 4),  # default blocking, 9 words in 4 + 4 + 1
    (33, 257, 17, 1000, 9),  # one block larger than M, one step over all words
    (40, 96, 50, 7, 5)])     # words_per_step larger than the 3 words
def test_xnor_popcount_matmul_matches_int64_matmul(m, k, n, chunk, words_per_step):
  rng = np.random.default_rng(m * 1000 + k)
  a = np_sign(rng.normal(size=(m, k)))
  b = np_sign(rng.normal(size=(k, n)))
  a_words, ka = packed.pack_signs(jnp.asarray(a, jnp.float32), axis=1)
  b_words, kb = packed.pack_signs(jnp.asarray(b, jnp.float32), axis=0)
  assert ka == kb == k and b_words.shape == (n, -(-k // 32))
  out = gemm(a_words, b_words, k=k, chunk=chunk, words_per_step=words_per_step)
  assert out.dtype == jnp.int32 and out.shape == (m, n)
  np.testing.assert_array_equal(out, a @ b)


def _intermediate_sizes(jaxpr) -> list[int]:
  """Sizes of every array an equation of `jaxpr` (and of its sub-jaxprs) produces."""
  sizes = []
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sizes += _intermediate_sizes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          sizes += _intermediate_sizes(sub)
  return sizes


def test_xnor_popcount_matmul_never_forms_the_whole_xor_tensor():
  m, k, n = 64, 320, 48  # 10 words
  a = jnp.zeros((m, 10), jnp.uint32)
  b = jnp.zeros((n, 10), jnp.uint32)
  jaxpr = jax.make_jaxpr(functools.partial(packed.xnor_popcount_matmul, k=k, chunk=8,
                                           words_per_step=2))(a, b)
  largest = max(_intermediate_sizes(jaxpr.jaxpr))
  # The output [M, N] is the largest array; the whole XOR tensor would be M * N * 10.
  assert largest == m * n
  assert largest < m * n * 10


def test_xnor_popcount_matmul_bad_input():
  a = jnp.zeros((3, 2), jnp.uint32)
  with pytest.raises(ValueError, match="same K"):
    packed.xnor_popcount_matmul(a, jnp.zeros((4, 3), jnp.uint32), 64)
  with pytest.raises(ValueError, match="does not fit"):
    packed.xnor_popcount_matmul(a, a, 65)
  with pytest.raises(ValueError, match="does not fit"):
    packed.xnor_popcount_matmul(a, a, 0)
  with pytest.raises(ValueError, match="uint32"):
    packed.xnor_popcount_matmul(a.astype(jnp.int32), a, 64)
  with pytest.raises(ValueError, match=">= 1"):
    packed.xnor_popcount_matmul(a, a, 64, chunk=0)


# ------------------------------------------------------------------------- packed conv/dense


def np_binary_conv(x, kernel, strides, padding):
  """float64 loops: zero-pad, sign(x), VALID conv with sign(W), times alpha per filter."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  k, c_out = kernel.shape[0], kernel.shape[-1]
  if padding == "SAME":
    pads = []
    for n in x.shape[1:3]:
      total = max((-(-n // strides) - 1) * strides + k - n, 0)
      pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  xs, ws = np_sign(x), np_sign(kernel)
  alpha = np.abs(kernel).mean(axis=(0, 1, 2))
  b, hp, wp, _ = x.shape
  ho, wo = (hp - k) // strides + 1, (wp - k) // strides + 1
  out = np.zeros((b, ho, wo, c_out))
  for i in range(ho):
    for j in range(wo):
      window = xs[:, i * strides:i * strides + k, j * strides:j * strides + k, :]
      out[:, i, j, :] = np.einsum("bhwc,hwco->bo", window, ws)
  return out * alpha


@pytest.mark.parametrize("hw,c_in,c_out,k,strides,padding", [
    (7, 3, 5, 3, 1, "SAME"), (8, 3, 5, 3, 2, "SAME"), (7, 40, 6, 3, 2, "SAME"),
    (7, 40, 6, 3, 1, "VALID"), (9, 33, 4, 3, 2, "VALID"), (6, 5, 7, 1, 2, "SAME"),
    (6, 64, 3, 2, 2, "SAME")])
def test_packed_conv_matches_float_binary_conv(hw, c_in, c_out, k, strides, padding):
  rng = np.random.default_rng(hw * 100 + c_in)
  x = jnp.asarray(random_pm1(rng, (2, hw, hw, c_in)))
  layer = binary.BinaryConv(c_out, k, strides, padding)
  kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.float32)
  variables = {"params": {"kernel": kernel}}
  words, alpha = packed.pack_kernel(kernel)
  assert words.shape == (c_out, k * k * -(-c_in // 32)) and alpha.shape == (c_out,)
  out = jax.jit(functools.partial(packed.packed_conv, kernel_size=k, strides=strides,
                                  padding=padding, chunk=7, words_per_step=2))(x, words, alpha)
  reference = np_binary_conv(x, kernel, strides, padding)
  scale = float(np.abs(reference).max())
  np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6 * scale)
  np.testing.assert_allclose(out, layer.apply(variables, x), rtol=TOL["rtol"],
                             atol=TOL["atol"] * scale)


@pytest.mark.parametrize("d_in,d_out", [(5, 3), (32, 4), (70, 9)])
def test_packed_dense_matches_float_binary_dense(d_in, d_out):
  rng = np.random.default_rng(d_in)
  x = jnp.asarray(random_pm1(rng, (6, d_in)))
  layer = binary.BinaryDense(d_out)
  variables = {"params": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)}}
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  words, alpha = packed.pack_kernel(variables["params"]["kernel"])
  out = packed.packed_dense(x, words, alpha, chunk=4, words_per_step=1)
  reference = (np_sign(x) @ np_sign(kernel)) * np.abs(kernel).mean(axis=0)
  np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, layer.apply(variables, x), **TOL)


def test_packed_layers_bad_input():
  words, alpha = packed.pack_kernel(jnp.ones((3, 3, 8, 4)))
  with pytest.raises(ValueError, match="does not match"):
    packed.packed_conv(jnp.ones((1, 5, 5, 40)), words, alpha, kernel_size=3)
  with pytest.raises(ValueError, match="padding"):
    packed.packed_conv(jnp.ones((1, 5, 5, 8)), words, alpha, kernel_size=3, padding="FULL")
  with pytest.raises(ValueError, match="NHWC"):
    packed.packed_conv(jnp.ones((5, 5, 8)), words, alpha, kernel_size=3)
  with pytest.raises(ValueError, match="does not fit"):
    packed.packed_conv(jnp.ones((1, 2, 2, 8)), words, alpha, kernel_size=3, padding="VALID")
  with pytest.raises(ValueError, match="D_in"):
    packed.packed_dense(jnp.ones((2, 40)), *packed.pack_kernel(jnp.ones((8, 4))))


# ------------------------------------------------------------------------- export round trip


def random_variables(model, x, seed):
  """Variables of `model`'s shapes filled with random values, as a trained student has them.

  Kernels are normal with variance 1 / fan-in; BatchNorm running means and offsets (and the
  biases) are random, so no sign threshold sits at exactly 0 (see the module docstring);
  variances and scales are in [0.5, 2]. Built from `jax.eval_shape` of `init`, which is also
  much faster than running `init` on CPU.
  """
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


class Inner(nn.Module):
  """A nested, explicitly named part with a biased binary conv and a BWN-style one."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = binary.BinaryConv(40, use_bias=True, name="xnor")(x)  # [B, H, W, 40]
    x = nn.BatchNorm(use_running_average=not train, name="bn2")(x)
    return binary.BinaryConv(8, strides=2, padding="VALID", binarize_input=False,
                             use_bias=True, name="bwn")(x)


class Custom(nn.Module):
  """Not a student of `students`: real stem, nested binary convs, biased binary Dense, head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)
    x = Inner(name="body")(x, train)
    x = jnp.mean(x, axis=(1, 2))  # [B, 8]
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = binary.BinaryDense(6, use_bias=True, name="fc")(x)
    return nn.Dense(3, name="head")(x)


def _round_trip(model, shape, seed):
  x = jax.random.normal(jax.random.key(seed), (3,) + shape)
  variables = random_variables(model, x[:1], seed)  # nonzero biases: a lost one would show
  exported = packed.export_student(model, variables, x[:1])
  logits = jax.jit(packed.apply_packed, static_argnums=0)(model, exported, x)
  reference = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(logits, reference, **TOL)
  np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.argmax(reference, -1))
  return variables, exported


@pytest.mark.parametrize("name", ["binary_tiny", "binary_alexnet_tiny", "binary_resnet_tiny"])
def test_export_round_trip_students(name):
  model = students.get_student(name, 5)
  variables, exported = _round_trip(model, (16, 16, 3), seed=3)
  flat = traverse_util.flatten_dict(variables["params"])
  binary_names = {"/".join(k[:-1]) for k in flat if k[-1] == "kernel" and k[-2] in ("conv",
                                                                                     "dense")}
  assert set(exported.binary) == binary_names and binary_names
  # The latent kernels are gone from the export; the stem and the head are kept.
  kept = traverse_util.flatten_dict(exported.variables["params"])
  assert not any("/".join(k[:-1]) in binary_names for k in kept)
  assert ("stem", "kernel") in kept and ("head", "kernel") in kept
  assert all(layer["words"].dtype == jnp.uint32 for layer in exported.binary.values())


def test_export_round_trip_custom_model():
  _, exported = _round_trip(Custom(), (6, 6, 1), seed=5)
  assert sorted(exported.binary) == ["body/bwn", "body/xnor", "fc"]
  # A PackedStudent is a pytree: it goes through jax.tree functions and jit as an argument.
  leaves = jax.tree.leaves(exported)
  assert sum(leaf.dtype == jnp.uint32 for leaf in leaves) == 3


def test_export_bad_input():
  model = students.get_student("binary_tiny", 3, binary=False)  # the real twin
  x = jnp.zeros((1, 8, 8, 3))
  variables = random_variables(model, x, 0)
  with pytest.raises(ValueError, match="no BinaryConv"):
    packed.export_student(model, variables, x)
  bsn = students.get_student("binary_tiny", 3)
  exported = packed.export_student(bsn, variables, x)
  missing = exported.replace(binary={k: v for k, v in list(exported.binary.items())[1:]})
  with pytest.raises(ValueError, match="not in the packed student"):
    jax.eval_shape(functools.partial(packed.apply_packed, bsn), missing, x)


# ----------------------------------------------------------------------------- memory report


def test_memory_report_hand_counted():
  model = Custom()
  x = jnp.zeros((1, 6, 6, 1))
  variables = random_variables(model, x, 0)
  report = packed.memory_report(variables, packed.export_student(model, variables, x))
  # Float (float32, 32 bits per entry):
  #   binary: body/xnor kernel 3*3*4*40 = 1440 + bias 40; body/bwn kernel 3*3*40*8 = 2880
  #           + bias 8; fc kernel 8*6 = 48 + bias 6                       -> 4422 entries
  #   real: stem 3*3*1*4 = 36; head 6*3 + 3 = 21                          ->   57 entries
  #   batch_norm: 4 arrays of 4 (body/bn), of 40 (body/bn2), of 8 (bn)    ->  208 entries
  # Packed (uint32 words, float32 alpha, biases kept):
  #   body/xnor: 40 filters * 9 taps * 1 word = 360 words + 40 alpha + 40 bias
  #   body/bwn:  8 filters * 9 taps * 2 words = 144 words +  8 alpha +  8 bias
  #   fc:        6 outputs * 1 word          =   6 words +  6 alpha +  6 bias -> 618 entries
  assert report["float_bits"] == {"binary": 4422 * 32, "real": 57 * 32, "batch_norm": 208 * 32,
                                  "total": (4422 + 57 + 208) * 32}
  assert report["packed_bits"] == {"binary": 618 * 32, "real": 57 * 32, "batch_norm": 208 * 32,
                                   "total": (618 + 57 + 208) * 32}
  assert report["ratio"]["binary"] == pytest.approx(4422 / 618)
  assert report["ratio"]["total"] == pytest.approx((4422 + 57 + 208) / (618 + 57 + 208))
  assert report["binary_layers"] == 3
  assert report["binary_weights"] == 1440 + 2880 + 48
