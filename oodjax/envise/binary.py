"""Binary layers of the ENVISE student: the straight-through sign and XNOR-Net layers.

    y = BinaryConv(64)(x)   # x zero-padded, sign(x) in {-1, +1}, conv with alpha * sign(W)
    y = BinaryDense(10)(x)  # sign(x) @ (alpha * sign(W))

The optimiser updates real-valued latent weights W; the forward pass only sees their binary
approximation W~ = alpha * sign(W) (the paper's Figure 1b, Sec. 3 "Binarization algorithm").

Choices where the paper is silent (it only says it follows Rastegari et al. 2016 for weights):

* Inputs are binarised too (XNOR-Net rather than BWN): every binary layer then multiplies +-1
  activations by +-1 weights, which is what an XNOR-popcount kernel computes and what the
  binary FLOP convention counts. XNOR-Net's per-position input scale K is left out: every binary
  layer of our students is followed by a BatchNorm, which absorbs a positive per-channel scale,
  and without K the layer is an exact +-1 GEMM times a per-filter alpha.
* sign(0) = +1, so a binary value is always exactly +-1 (one bit).
* Zero padding happens BEFORE the input sign, so padded positions are +1 like any other input
  bit. An implementation on packed bits then needs no "third value" for the border, and the
  float layer here and an XNOR-popcount one agree exactly.
* The gradient of the input sign is the straight-through estimator of Courbariaux et al. 2016 /
  Rastegari et al. 2016, g * 1{|x| <= 1} (`sign_ste`).
* The gradient of W~ = alpha * sign(W) with respect to the latent W is the identity
  (`binarize_kernel`): the loss gradient at the binary weights updates the real ones, as in
  BinaryConnect (Courbariaux et al. 2015, Algorithm 1). We do not mask it by 1{|W| <= 1}: the
  forward pass only depends on the signs and on alpha, so a latent weight that drifted past 1
  would carry no meaning of its own, yet the mask would freeze it and it could never change
  sign again (BinaryConnect avoids that by clipping W after each update instead, which would
  need an optimiser-side transformation). With the He initialisation the latent weights start
  around 0.01-0.1, far inside [-1, 1], so at the start the two estimators coincide anyway. We
  also drop the term through alpha (d alpha / dW = sign(W) / n in XNOR-Net's Eq. 7): it is
  O(1/n) of the main term for the n = k*k*C_in weights of a filter.

Both estimators are differentiable twice in reverse mode (`jax.grad` of a function of
`jax.grad`), which the attention loss needs (Grad-CAM maps are gradients, and the loss on them
is differentiated in the parameters). `sign_ste` is a `jax.custom_vjp`, so forward-mode
differentiation through it (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) is not available.

References:
  Rastegari, Ordonez, Redmon, Farhadi 2016, XNOR-Net, Sec. 3.1-3.2 (alpha = ||W||_1 / n).
  Courbariaux, Hubara, Soudry, El-Yaniv, Bengio 2016, Binarized Neural Networks (STE, Eq. 4).
  Sharma et al., ENVISE (ICLR 2021 submission), Sec. 3 and Figure 1b.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.models.layers import conv_init

PADDINGS = ("SAME", "VALID")


def _sign(x: jax.Array) -> jax.Array:
  """sign with sign(0) = +1, values exactly +-1 in the dtype of x."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
  """sign(x) in the forward pass, the straight-through estimator in the backward pass.

  Forward: +1 where x >= 0 (so sign(0) = +1), -1 elsewhere, in the dtype of x.
  Backward: g * 1{|x| <= 1} (the boundary |x| = 1 passes the gradient).

  Args:
    x: any shape, floating.

  Returns:
    an array of x's shape and dtype holding exactly +-1.

  References:
    Courbariaux et al. 2016, Binarized Neural Networks, Eq. 4 ("hard tanh" STE).
  """
  return _sign(x)


def _sign_ste_fwd(x):
  return _sign(x), x


def _sign_ste_bwd(x, g):
  # Written with jnp ops of x, so the backward pass is itself differentiable (grad of grad).
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def xnor_weights(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """XNOR-Net's binary approximation W ~ alpha * B of a kernel, one alpha per output filter.

  alpha minimises ||W - alpha B||^2 over alpha >= 0 and B in {-1, +1}^n per filter: B = sign(W),
  alpha = ||W||_1 / n (Rastegari et al. 2016, Eqs. 2-4; ENVISE Sec. 3).

  Args:
    kernel: [..., C_out] e.g. a conv kernel [kh, kw, C_in, C_out] or a Dense one [D_in, C_out].

  Returns:
    alpha: [C_out] mean |W| over every axis but the last.
    signs: [..., C_out] in {-1, +1} (sign(0) = +1), the dtype of `kernel`.
  """
  if kernel.ndim < 2:
    raise ValueError(f"kernel must be [..., C_in, C_out] with at least 2 axes, got shape "
                     f"{kernel.shape}")
  axes = tuple(range(kernel.ndim - 1))
  alpha = jnp.mean(jnp.abs(kernel), axis=axes)  # [C_out]
  return alpha, _sign(kernel)


@jax.custom_jvp
def binarize_kernel(kernel: jax.Array) -> jax.Array:
  """alpha * sign(W) per output filter, with the identity as its derivative in W.

  The forward value is computed as the product alpha * sign(W) itself (not as W + (W~ - W),
  which rounds), so it is bit-for-bit what an export of (alpha, signs) reproduces. The
  identity derivative is the straight-through estimator chosen in the module docstring; as a
  `custom_jvp` it works in forward and reverse mode and to any order.

  Args:
    kernel: [..., C_out] latent real-valued weights.

  Returns:
    [..., C_out] the binary approximation W~ = alpha * sign(W).
  """
  alpha, signs = xnor_weights(kernel)
  return signs * alpha.reshape((1,) * (kernel.ndim - 1) + (-1,))  # [..., C_out]


@binarize_kernel.defjvp
def _binarize_kernel_jvp(primals, tangents):
  (kernel,), (kernel_dot,) = primals, tangents
  return binarize_kernel(kernel), kernel_dot


def same_pads(spatial: tuple[int, ...], kernel_size: int, strides: int
              ) -> list[tuple[int, int]]:
  """(low, high) zero padding per spatial axis for "SAME" as in `lax.conv` with these strides.

  Output size ceil(n / s); the total padding max((ceil(n / s) - 1) s + k - n, 0) is split with
  the extra pixel at the high end (TensorFlow / XLA convention).
  """
  pads = []
  for n in spatial:
    out = -(-n // strides)
    total = max((out - 1) * strides + kernel_size - n, 0)
    pads.append((total // 2, total - total // 2))
  return pads


class BinaryConv(nn.Module):
  """XNOR-Net convolution: zero-pad, sign the input, VALID conv with alpha * sign(W).

  Attributes:
    features: output channels C_out.
    kernel_size: square kernel side k.
    strides: step in both spatial directions.
    padding: "SAME" (output ceil(H / strides), padded as `lax.conv` pads) or "VALID".
    binarize_input: sign the (padded) input with `sign_ste`; False gives a BWN-style layer with
      real inputs and binary weights (zero padding then stays 0).
    use_bias: add a real-valued bias [C_out] (off by default: a BatchNorm follows).

  Params:
    kernel: [k, k, C_in, C_out] the real-valued latent weights the optimiser updates.
    bias: [C_out] (only with use_bias).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: str = "SAME"
  binarize_input: bool = True
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H', W', features]."""
    if self.padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
    if x.ndim != 4:
      raise ValueError(f"BinaryConv takes NHWC inputs [B, H, W, C], got shape {x.shape}")
    k = self.kernel_size
    kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
    if self.padding == "SAME":
      (top, bottom), (left, right) = same_pads(x.shape[1:3], k, self.strides)
      x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, H_p, W_p, C_in]
    if self.binarize_input:
      x = sign_ste(x)  # padded positions are sign(0) = +1
    y = jax.lax.conv_general_dilated(
        x, binarize_kernel(kernel).astype(x.dtype), (self.strides, self.strides), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H', W', C_out]
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.reshape(1, 1, 1, -1)
    return y


class BinaryDense(nn.Module):
  """XNOR-Net fully connected layer: y = sign(x) @ (alpha * sign(W)).

  Attributes:
    features: output width D_out.
    binarize_input: sign the input with `sign_ste` (False: real inputs, binary weights).
    use_bias: add a real-valued bias [D_out].

  Params:
    kernel: [D_in, D_out] the real-valued latent weights (Flax's Dense initialiser).
    bias: [D_out] (only with use_bias).
  """
  features: int
  binarize_input: bool = True
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, D_in] -> [B, features]."""
    if x.ndim != 2:
      raise ValueError(f"BinaryDense takes [B, D] inputs, got shape {x.shape}; flatten first")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    if self.binarize_input:
      x = sign_ste(x)
    y = x @ binarize_kernel(kernel).astype(x.dtype)  # [B, D_out]
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.reshape(1, -1)
    return y
