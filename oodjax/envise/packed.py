"""Export of a binary student to packed sign bits, and inference by XNOR and popcount.

    packed = export_student(model, variables, x[:1])      # kernels -> uint32 words + alpha
    logits = jax.jit(apply_packed, static_argnums=0)(model, packed, x)
    memory_report(variables, packed)["ratio"]["total"]    # float bits / exported bits

A binary layer (`BinaryConv`, `BinaryDense`) multiplies +-1 inputs by +-1 weights and scales
each output filter by alpha. With +-1 vectors stored one bit per entry (1 for +1, 0 for -1),
their dot product over K entries is

    a . b = (#equal) - (#different) = K - 2 * popcount(a XOR b),

so a 32-bit XOR and a popcount replace 32 multiply-accumulates (XNOR-Net, Rastegari et al.
2016, Sec. 3.2). The export keeps, per binary layer, the signs of its latent kernel packed into
uint32 words and its alpha [C_out] (float32); every other variable (the real first conv and last
Dense, BatchNorm parameters and statistics, biases) stays as it is. `apply_packed` runs the SAME
Linen model with each binary layer call replaced, through `nn.intercept_methods`, by the packed
computation, so no second model definition exists and nothing has to know about the export.

Bit layout (`pack_signs`): entry j of the packed axis is bit (j mod 32) of word j // 32, least
significant bit first; bit 1 means the entry was >= 0, i.e. sign +1 with sign(0) = +1 as in
`binary.sign_ste` (NaN packs as -1). When K is not a multiple of 32 the unused high bits of the
last word are 0. Two operands packed this way over the same K have equal padding bits, their
XOR there is 0, so the padding adds nothing to the popcount and K - 2 * popcount stays exact.

A convolution is an im2col of the packed input followed by the popcount GEMM. The input is
zero-padded before it is signed (as `BinaryConv` does), so padded positions are +1 bits and the
result equals the float layer's exactly up to the rounding of alpha * integer. Packing happens
once per input entry BEFORE the im2col, so the k*k shifted copies move 32x less data than a
float im2col would.

Choices where the issue and the paper say nothing:
* `export_student` takes an example input (any batch size; only its shape is used, under
  `jax.eval_shape`): the binary layers of a compact Linen model only exist while it runs, so
  one traced call is how they are found generically.
* A binary layer built with `binarize_input=False` (real inputs, binary weights) cannot use
  XNOR; its packed form is still exported (the same memory), and `apply_packed` unpacks the
  signs and runs a float conv/matmul with alpha * signs for it.
* Memory is counted as stored: every array at its dtype's width, the padding bits of the last
  word of each packed row included, and the BatchNorm running statistics included (inference
  needs them).

References:
  Rastegari, Ordonez, Redmon, Farhadi 2016, XNOR-Net, Sec. 3.2 (binary dot products by XNOR
    and bitcount).
  Sharma et al., ENVISE (ICLR 2021 submission), Sec. 3 (binary student) and Sec. 4, "Gain in
    Efficiency" (the BSN takes 0.57 ms per image against the RvSN's 3.04 ms and occupies ~30x
    less memory).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import unfreeze
from jax import lax

from oodjax.envise.binary import PADDINGS, BinaryConv, BinaryDense, same_pads, xnor_weights
from oodjax.models.insides import inference_apply

WORD_BITS = 32

# Default rows of A per block of `xnor_popcount_matmul`: about this many int32 accumulators
# (1 MiB) per block. Measured on 2 CPU cores over the GEMM shapes of binary VGG-16 at 32x32
# (M x K x N from 32768 x 576 x 64 to 1024 x 4608 x 512): 2^16-2^18 accumulators per block with
# 2-4 words per step ran 3-4x faster than a float32 matmul, blocks of 2^12 only ~2x
# (benchmarks/envise_xnor.py times the default).
TARGET_BLOCK_SIZE = 1 << 18
DEFAULT_WORDS_PER_STEP = 4

KIND_BINARY, KIND_REAL, KIND_BATCH_NORM = "binary", "real", "batch_norm"
KINDS = (KIND_BINARY, KIND_REAL, KIND_BATCH_NORM)


def num_words(k: int) -> int:
  """ceil(k / 32): the uint32 words holding k bits."""
  return -(-k // WORD_BITS)


def pack_signs(x: jax.Array, axis: int = -1) -> tuple[jax.Array, int]:
  """Packs the signs of `x` along `axis` into uint32 words, 32 entries per word.

  Args:
    x: [..., K, ...] real array; entry j of `axis` becomes bit (j mod 32) of word j // 32
      (least significant first): 1 where x >= 0 (sign +1, sign(0) = +1), 0 elsewhere.
    axis: the axis to pack.

  Returns:
    words: uint32 [..., ceil(K / 32)] with the packed axis moved LAST and the other axes in
      their order; the unused high bits of the last word are 0.
    k: K, the number of packed entries (a Python int, needed to unpack and for the dot
      product K - 2 * popcount).
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("pack_signs needs at least one axis to pack, got a scalar")
  x = jnp.moveaxis(x, axis, -1)
  k = x.shape[-1]
  if k == 0:
    raise ValueError(f"cannot pack an empty axis (shape {x.shape})")
  n = num_words(k)
  bits = (x >= 0).astype(jnp.uint32)
  bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, n * WORD_BITS - k)])
  bits = bits.reshape(x.shape[:-1] + (n, WORD_BITS))  # [..., n, 32]
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * x.ndim + (WORD_BITS,))
  # Distinct powers of two: their sum is their bitwise OR.
  return jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=jnp.uint32), k  # [..., n]


def unpack_signs(words: jax.Array, k: int, axis: int = -1, dtype=jnp.float32) -> jax.Array:
  """Inverse of `pack_signs`: the +-1 entries, with the packed axis put back at `axis`.

  Args:
    words: uint32 [..., ceil(k / 32)] as `pack_signs` returns them.
    k: the number of entries packed.
    axis: where the unpacked axis goes in the result.
    dtype: dtype of the result.

  Returns:
    [..., k, ...] in {-1, +1} (`axis` of length k).
  """
  words = jnp.asarray(words)
  if words.dtype != jnp.uint32 or words.ndim == 0:
    raise ValueError(f"words must be a uint32 array with a word axis, got {words.dtype} "
                     f"of shape {words.shape}")
  if num_words(k) != words.shape[-1] or k <= 0:
    raise ValueError(f"{words.shape[-1]} words cannot hold k = {k} entries (needs "
                     f"{num_words(max(k, 1))})")
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * words.ndim + (WORD_BITS,))
  bits = jnp.bitwise_and(jnp.right_shift(words[..., None], shifts), jnp.uint32(1))
  bits = bits.reshape(words.shape[:-1] + (-1,))[..., :k]  # [..., k]
  signs = jnp.where(bits == 1, jnp.ones((), dtype), -jnp.ones((), dtype))
  return jnp.moveaxis(signs, -1, axis)


def _check_words(name: str, words: jax.Array) -> None:
  if words.dtype != jnp.uint32 or words.ndim != 2:
    raise ValueError(f"{name} must be uint32 [rows, words] as pack_signs returns it, got "
                     f"{words.dtype} of shape {words.shape}")


def xnor_popcount_matmul(a_words: jax.Array, b_words: jax.Array, k: int, *,
                         chunk: int | None = None,
                         words_per_step: int = DEFAULT_WORDS_PER_STEP) -> jax.Array:
  """Exact A @ B of +-1 matrices from their packed signs: K - 2 * popcount(a XOR b).

  Both operands are packed along K (`pack_signs(A, axis=1)` and `pack_signs(B, axis=0)`, so
  B arrives transposed as [N, words]). The rows of A are processed in blocks of `chunk` with
  `lax.map`; inside a block a `lax.scan` walks the words `words_per_step` at a time and adds
  their popcounts to an int32 [chunk, N] accumulator. Nothing larger than a step's
  [words_per_step, chunk, N] XOR is ever formed (and XLA fuses that with its popcount and sum);
  the [M, N, words] XOR tensor of the obvious implementation never is (materialising it is
  ~3x slower than a float32 matmul of the same +-1 operands on 2 CPU cores, this is 3-4x
  faster; `benchmarks/envise_xnor.py`). Zero rows and words padded on to fill the last block
  or step XOR to 0 and are cut off.

  Args:
    a_words: uint32 [M, ceil(K / 32)] packed rows of A [M, K].
    b_words: uint32 [N, ceil(K / 32)] packed columns of B [K, N].
    k: K, the true length of the dot products (a Python int): the number of bit positions
      that hold entries. Every other bit must be 0 in both operands (as `pack_signs` leaves
      them), wherever it sits: `packed_conv` packs each tap's channels separately, so its
      rows carry padding bits inside, not only at the end.
    chunk: rows of A per block; None picks about 2^18 / N (at least 1, at most M).
    words_per_step: words of K reduced per scan step.

  Returns:
    int32 [M, N] the exact integer dot products (A @ B)[m, n].

  References:
    Rastegari et al. 2016, XNOR-Net, Sec. 3.2.
  """
  _check_words("a_words", a_words)
  _check_words("b_words", b_words)
  m, n_words = a_words.shape
  n = b_words.shape[0]
  if b_words.shape[1] != n_words:
    raise ValueError(f"a_words and b_words must hold the same K: {n_words} vs "
                     f"{b_words.shape[1]} words")
  if not isinstance(k, (int, np.integer)) or not 0 < k <= WORD_BITS * n_words:
    raise ValueError(f"k = {k!r} does not fit {n_words} words per row (need a Python int in "
                     f"[1, {WORD_BITS * n_words}])")
  if chunk is None:
    chunk = max(1, TARGET_BLOCK_SIZE // max(n, 1))
  if chunk < 1 or words_per_step < 1:
    raise ValueError(f"chunk and words_per_step must be >= 1, got {chunk}, {words_per_step}")
  if m == 0 or n == 0:
    return jnp.zeros((m, n), jnp.int32)
  rows = min(chunk, m)
  blocks = -(-m // rows)
  wps = min(words_per_step, n_words)
  steps = -(-n_words // wps)
  a = jnp.pad(a_words, ((0, blocks * rows - m), (0, steps * wps - n_words)))
  b = jnp.pad(b_words, ((0, 0), (0, steps * wps - n_words)))
  a = a.reshape(blocks, rows, steps, wps).transpose(0, 2, 3, 1)  # [blocks, steps, wps, rows]
  b = b.reshape(n, steps, wps).transpose(1, 2, 0)  # [steps, wps, N]

  def block(a_block):  # [steps, wps, rows] -> [rows, N]
    def step(acc, operands):
      a_step, b_step = operands  # [wps, rows], [wps, N]
      x = jnp.bitwise_xor(a_step[:, :, None], b_step[:, None, :])  # [wps, rows, N]
      return acc + jnp.sum(lax.population_count(x).astype(jnp.int32), axis=0), None

    acc, _ = lax.scan(step, jnp.zeros((rows, n), jnp.int32), (a_block, b))
    return acc

  mismatches = lax.map(block, a).reshape(blocks * rows, n)[:m]  # [M, N]
  return jnp.int32(k) - 2 * mismatches


def pack_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The XNOR-Net binary form of a latent kernel, packed: (words, alpha).

  Args:
    kernel: [..., C_in, C_out] (conv [k, k, C_in, C_out] or Dense [D_in, C_out]).

  Returns:
    words: uint32 [C_out, prod(...) * ceil(C_in / 32)]: per output filter, the signs of
      W[..., c] with C_in packed per spatial tap, taps in row-major order (the layout of
      `packed_conv`'s im2col).
    alpha: float32 [C_out] mean |W| per output filter (`binary.xnor_weights`).
  """
  if kernel.ndim < 2:
    raise ValueError(f"kernel must be [..., C_in, C_out], got shape {kernel.shape}")
  alpha, signs = xnor_weights(kernel)
  signs = jnp.moveaxis(signs, -1, 0)  # [C_out, ..., C_in]
  words, _ = pack_signs(signs, axis=-1)  # [C_out, ..., ceil(C_in / 32)]
  return words.reshape(words.shape[0], -1), alpha.astype(jnp.float32)


def _conv_pads(x: jax.Array, kernel_size: int, strides: int, padding: str):
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
  if padding == "VALID":
    return ((0, 0), (0, 0))
  return tuple(same_pads(x.shape[1:3], kernel_size, strides))


def _out_size(n: int, kernel_size: int, strides: int) -> int:
  if n < kernel_size:
    raise ValueError(f"a {kernel_size}x{kernel_size} kernel does not fit a padded input of "
                     f"side {n}")
  return (n - kernel_size) // strides + 1


def packed_conv(x: jax.Array, words: jax.Array, alpha: jax.Array, *, kernel_size: int,
                strides: int = 1, padding: str = "SAME", chunk: int | None = None,
                words_per_step: int = DEFAULT_WORDS_PER_STEP) -> jax.Array:
  """`BinaryConv` (binarised input) on packed weights, by im2col and the popcount GEMM.

  x is zero-padded (SAME as `lax.conv` pads for this stride, or not at all for VALID), its
  signs are packed along the channels, the k*k taps of every output position are gathered from
  the packed words, and `xnor_popcount_matmul` gives the integer +-1 dot products, scaled by
  alpha per output filter.

  Args:
    x: [B, H, W, C_in] the layer's real input (it is signed here, as in `BinaryConv`).
    words: uint32 [C_out, k * k * ceil(C_in / 32)] from `pack_kernel`.
    alpha: [C_out] per-filter scale.
    kernel_size: k.
    strides: step in both spatial directions.
    padding: "SAME" or "VALID".
    chunk, words_per_step: blocking of `xnor_popcount_matmul`.

  Returns:
    [B, H', W', C_out] in x's dtype: alpha * (sign(x_padded) conv sign(W)).
  """
  if x.ndim != 4:
    raise ValueError(f"packed_conv takes NHWC inputs [B, H, W, C], got shape {x.shape}")
  kk, c_in = kernel_size * kernel_size, x.shape[-1]
  if words.shape[-1] != kk * num_words(c_in):
    raise ValueError(f"packed kernel of {words.shape[-1]} words per filter does not match a "
                     f"{kernel_size}x{kernel_size} kernel over {c_in} input channels "
                     f"({kk * num_words(c_in)} words)")
  (top, bottom), (left, right) = _conv_pads(x, kernel_size, strides, padding)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, H_p, W_p, C_in]
  x_words, _ = pack_signs(x)  # [B, H_p, W_p, C_w]; padded zeros pack as +1
  b, h_p, w_p, c_w = x_words.shape
  h_out = _out_size(h_p, kernel_size, strides)
  w_out = _out_size(w_p, kernel_size, strides)
  taps = [
      lax.slice(x_words, (0, i, j, 0),
                (b, i + (h_out - 1) * strides + 1, j + (w_out - 1) * strides + 1, c_w),
                (1, strides, strides, 1))  # [B, H', W', C_w]
      for i in range(kernel_size) for j in range(kernel_size)]
  patches = jnp.stack(taps, axis=3).reshape(b * h_out * w_out, kk * c_w)  # [M, k*k*C_w]
  dots = xnor_popcount_matmul(patches, words, kk * c_in, chunk=chunk,
                              words_per_step=words_per_step)  # [M, C_out]
  y = dots.astype(jnp.float32) * alpha.reshape(1, -1).astype(jnp.float32)
  return y.reshape(b, h_out, w_out, -1).astype(x.dtype)


def packed_dense(x: jax.Array, words: jax.Array, alpha: jax.Array, *,
                 chunk: int | None = None,
                 words_per_step: int = DEFAULT_WORDS_PER_STEP) -> jax.Array:
  """`BinaryDense` (binarised input) on packed weights: alpha * (sign(x) @ sign(W)).

  Args:
    x: [B, D_in] the layer's real input.
    words: uint32 [D_out, ceil(D_in / 32)] from `pack_kernel`.
    alpha: [D_out] per-output scale.
    chunk, words_per_step: blocking of `xnor_popcount_matmul`.

  Returns:
    [B, D_out] in x's dtype.
  """
  if x.ndim != 2:
    raise ValueError(f"packed_dense takes [B, D] inputs, got shape {x.shape}")
  x_words, k = pack_signs(x)  # [B, ceil(D_in / 32)]
  if words.shape[-1] != x_words.shape[-1]:
    raise ValueError(f"packed kernel of {words.shape[-1]} words per output does not match "
                     f"D_in = {k} ({x_words.shape[-1]} words)")
  dots = xnor_popcount_matmul(x_words, words, k, chunk=chunk, words_per_step=words_per_step)
  y = dots.astype(jnp.float32) * alpha.reshape(1, -1).astype(jnp.float32)  # [B, D_out]
  return y.astype(x.dtype)


def _real_input_layer(module: nn.Module, x: jax.Array, words: jax.Array,
                      alpha: jax.Array) -> jax.Array:
  """A layer with `binarize_input=False`: float conv/matmul with alpha * unpacked signs."""
  c_in = x.shape[-1]
  if isinstance(module, BinaryConv):
    k = module.kernel_size
    signs = unpack_signs(words.reshape(-1, k, k, num_words(c_in)), c_in, dtype=x.dtype)
    kernel = jnp.moveaxis(signs, 0, -1) * alpha.reshape(1, 1, 1, -1).astype(x.dtype)
    (top, bottom), (left, right) = _conv_pads(x, k, module.strides, module.padding)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return lax.conv_general_dilated(x, kernel, (module.strides, module.strides), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  signs = unpack_signs(words, c_in, dtype=x.dtype)  # [D_out, D_in]
  return x @ (signs.T * alpha.reshape(1, -1).astype(x.dtype))


@struct.dataclass
class PackedStudent:
  """An exported binary student: a pytree, jit/save/load like any variables.

  Attributes:
    variables: the student's variables with the `kernel` of every binary layer removed
      (first conv, last Dense, BatchNorm parameters and statistics, biases are unchanged).
    binary: {layer name: {"words": uint32 [C_out, taps * ceil(C_in / 32)],
      "alpha": float32 [C_out]}} for every BinaryConv / BinaryDense, named by its module path
      joined with "/".
    kinds: static ((module name, kind), ...) for every module the model called, kind one of
      "binary", "batch_norm", "real"; `memory_report` attributes variables with it.
  """
  variables: Mapping[str, Any]
  binary: Mapping[str, Mapping[str, jax.Array]]
  kinds: tuple[tuple[str, str], ...] = struct.field(pytree_node=False, default=())


def _name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _module_kind(module: nn.Module) -> str:
  if isinstance(module, (BinaryConv, BinaryDense)):
    return KIND_BINARY
  if isinstance(module, nn.BatchNorm):
    return KIND_BATCH_NORM
  return KIND_REAL


def find_module_kinds(model: nn.Module, variables: Mapping[str, Any],
                      x: jax.Array) -> dict[str, str]:
  """{module name: kind} of every module an inference call of `model` on `x` calls.

  Runs `inference_apply(model)(variables, x)` under `jax.eval_shape` (nothing is computed)
  with an interceptor that notes each module's path and type: binary layers are the
  `BinaryConv` / `BinaryDense` instances wherever they sit in the module tree.

  Args:
    model: a Flax Linen student.
    variables: its variables.
    x: an example input (array or `jax.ShapeDtypeStruct`), e.g. [1, H, W, C].

  Returns:
    {"path/to/module": "binary" | "batch_norm" | "real"}; the model itself is "".
  """
  kinds: dict[str, str] = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      kinds.setdefault(_name(context.module.path), _module_kind(context.module))
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return inference_apply(model)(v, x)

  jax.eval_shape(run, variables, x)
  return kinds


def export_student(model: nn.Module, variables: Mapping[str, Any],
                   x: jax.Array) -> PackedStudent:
  """Replaces every binary layer's latent kernel by its packed signs and alpha.

  Args:
    model: a Flax Linen student whose binary layers are `BinaryConv` / `BinaryDense`.
    variables: its trained variables {"params": ..., "batch_stats": ...}.
    x: an example input, e.g. [1, H, W, C] (only its shape and dtype are used).

  Returns:
    a `PackedStudent` for `apply_packed` and `memory_report`.

  Raises:
    ValueError: if the model calls no binary layer, or a binary layer has no kernel.
  """
  kinds = find_module_kinds(model, variables, x)
  binary_names = [n for n, kind in kinds.items() if kind == KIND_BINARY]
  if not binary_names:
    raise ValueError(f"{type(model).__name__} calls no BinaryConv / BinaryDense layer: "
                     "nothing to export (is this the real-valued twin?)")
  flat = traverse_util.flatten_dict(unfreeze(variables))
  binary = {}
  for name in binary_names:
    key = ("params",) + tuple(name.split("/")) + ("kernel",)
    if key not in flat:
      raise ValueError(f"binary layer {name!r} has no params/{name}/kernel in the variables")
    words, alpha = pack_kernel(flat.pop(key))
    binary[name] = {"words": words, "alpha": alpha}
  return PackedStudent(variables=traverse_util.unflatten_dict(flat), binary=binary,
                       kinds=tuple(sorted(kinds.items())))


def apply_packed(model: nn.Module, packed: PackedStudent, x: jax.Array, *,
                 chunk: int | None = None,
                 words_per_step: int = DEFAULT_WORDS_PER_STEP) -> jax.Array:
  """Inference with the exported student: binary layers by XNOR and popcount.

  Calls `model` in inference mode (`train=False` where it takes it) on `packed.variables`,
  intercepting every `BinaryConv` / `BinaryDense` call and computing it with `packed_conv` /
  `packed_dense` from the packed words (plus the layer's bias if it has one). Jit it with the
  model static: `jax.jit(apply_packed, static_argnums=0)`.

  Args:
    model: the Linen student that was exported.
    packed: `export_student(model, variables, ...)`.
    x: [B, ...] inputs.
    chunk, words_per_step: blocking of `xnor_popcount_matmul`.

  Returns:
    the model's output (logits [B, K]) equal to `model.apply` of the float student up to float
    rounding of alpha * integer.

  Raises:
    ValueError: if the model calls a binary layer that `packed` does not hold.
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (BinaryConv, BinaryDense)):
      return next_fun(*args, **kwargs)
    name = _name(module.path)
    if name not in packed.binary:
      raise ValueError(f"binary layer {name!r} is not in the packed student (exported "
                       f"layers: {sorted(packed.binary)})")
    h = args[0] if args else kwargs["x"]
    words, alpha = packed.binary[name]["words"], packed.binary[name]["alpha"]
    if not module.binarize_input:
      y = _real_input_layer(module, h, words, alpha)
    elif isinstance(module, BinaryConv):
      y = packed_conv(h, words, alpha, kernel_size=module.kernel_size, strides=module.strides,
                      padding=module.padding, chunk=chunk, words_per_step=words_per_step)
    else:
      y = packed_dense(h, words, alpha, chunk=chunk, words_per_step=words_per_step)
    if module.use_bias:
      bias = module.get_variable("params", "bias")  # [C_out]
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
    return y

  with nn.intercept_methods(interceptor):
    return inference_apply(model)(packed.variables, x)


def _bits(leaf) -> int:
  """Storage bits of an array (or a scalar) at its dtype's width."""
  leaf = leaf if hasattr(leaf, "dtype") else np.asarray(leaf)
  return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize * 8


def _kind_of(key: tuple[str, ...], kinds: Mapping[str, str]) -> str:
  """Kind of a flattened variable (collection, *module path, name): its deepest module's."""
  path = key[1:-1]
  for end in range(len(path), 0, -1):
    kind = kinds.get(_name(path[:end]))
    if kind is not None and kind != KIND_REAL:
      return kind
  return KIND_REAL


def memory_report(variables: Mapping[str, Any], packed: PackedStudent) -> dict[str, Any]:
  """Bits of the float student against the exported one, per layer kind and in total.

  Every array counts at its dtype's width (float32: 32 bits per entry; packed words: 32 bits
  per word, padding bits included). Kinds: "binary" (the BinaryConv / BinaryDense layers: their
  latent kernels against packed words + alpha, and their biases if any), "batch_norm" (scale,
  bias, running mean and variance, the same in both), "real" (everything else: the real first
  conv and last Dense; the same in both).

  Args:
    variables: the float student's variables.
    packed: its `export_student` output.

  Returns:
    {"float_bits": {kind: int, "total": int}, "packed_bits": {kind: int, "total": int},
     "ratio": {"binary": float, "total": float} (float bits / packed bits),
     "binary_layers": int, "binary_weights": int (entries of the binary kernels)}.
  """
  kinds = dict(packed.kinds)
  float_bits = dict.fromkeys(KINDS, 0)
  packed_bits = dict.fromkeys(KINDS, 0)
  flat = traverse_util.flatten_dict(unfreeze(variables))
  for key, leaf in flat.items():
    float_bits[_kind_of(key, kinds)] += _bits(leaf)
  for key, leaf in traverse_util.flatten_dict(unfreeze(packed.variables)).items():
    packed_bits[_kind_of(key, kinds)] += _bits(leaf)
  weights = 0
  for name, layer in packed.binary.items():
    packed_bits[KIND_BINARY] += _bits(layer["words"]) + _bits(layer["alpha"])
    key = ("params",) + tuple(name.split("/")) + ("kernel",)
    if key not in flat:
      raise ValueError(f"variables hold no kernel for the exported layer {name!r}: pass the "
                       "float student's variables, the ones given to export_student")
    weights += int(np.prod(flat[key].shape))
  float_bits["total"] = sum(float_bits[k] for k in KINDS)
  packed_bits["total"] = sum(packed_bits[k] for k in KINDS)
  return {
      "float_bits": float_bits, "packed_bits": packed_bits,
      "ratio": {"binary": float_bits[KIND_BINARY] / packed_bits[KIND_BINARY],
                "total": float_bits["total"] / packed_bits["total"]},
      "binary_layers": len(packed.binary), "binary_weights": weights,
  }
