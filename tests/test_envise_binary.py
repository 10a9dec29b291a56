"""ENVISE binary layers against float64 numpy references and hand-worked numbers.

References: explicit numpy loops (zero padding, sign with sign(0) = +1, VALID correlation with
strides), XLA's own "SAME" convolution for the padding convention, and gradients worked out by
hand for the chosen straight-through estimators (input: g * 1{|x| <= 1}; latent kernel: the
identity).

Tolerance: outputs are sums of at most a few dozen terms +-alpha of size O(0.1-1) in float32,
so rounding stays below 1e-6; rtol = atol = 1e-5 catches any wrong sign, padding or alpha.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.envise import binary
from oodjax.envise.binary import BinaryConv, BinaryDense, binarize_kernel, sign_ste, xnor_weights

TOL = {"rtol": 1e-5, "atol": 1e-5}


def np_sign(x):
  return np.where(x >= 0, 1.0, -1.0)


def np_same_pads(n, k, s):
  """SAME padding written from its definition: output ceil(n / s), extra pixel at the end."""
  out = int(np.ceil(n / s))
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def np_binary_conv(x, w, strides, padding, binarize_input=True):
  """float64 loop: zero-pad, sign, VALID correlation with alpha * sign(W) per output filter."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  k, _, _, c_out = w.shape
  if padding == "SAME":
    pads = [np_same_pads(x.shape[1], k, strides), np_same_pads(x.shape[2], k, strides)]
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  if binarize_input:
    x = np_sign(x)
  wb = np.zeros_like(w)
  for o in range(c_out):
    alpha = np.mean(np.abs(w[..., o]))
    wb[..., o] = alpha * np_sign(w[..., o])
  b, h, wd, _ = x.shape
  oh, ow = (h - k) // strides + 1, (wd - k) // strides + 1
  y = np.zeros((b, oh, ow, c_out))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * strides:i * strides + k, j * strides:j * strides + k, :]
      y[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, wb)
  return y, x, wb


def conv_apply(w, x, **kw):
  layer = BinaryConv(w.shape[-1], kernel_size=w.shape[0], **kw)
  return layer.apply({"params": {"kernel": jnp.asarray(w)}}, jnp.asarray(x))


# --- sign_ste --------------------------------------------------------------------------------

def test_sign_ste_forward_values_and_dtype():
  x = np.array([-3.0, -1.0, -0.5, -1e-7, -0.0, 0.0, 1e-7, 0.5, 1.0, 3.0], np.float32)
  expected = [-1, -1, -1, -1, 1, 1, 1, 1, 1, 1]  # sign(0) = sign(-0) = +1
  np.testing.assert_array_equal(sign_ste(jnp.asarray(x)), expected)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    out = sign_ste(jnp.asarray(x, dtype))
    assert out.dtype == dtype
    assert set(np.asarray(out, np.float32).tolist()) == {-1.0, 1.0}


def test_sign_ste_gradient_mask_includes_boundary():
  x = jnp.array([-2.0, -1.0, -0.999, -0.3, 0.0, 0.7, 1.0, 1.001, 5.0])
  g = jnp.arange(1.0, 10.0)  # distinct upstream gradients
  grad = jax.grad(lambda x: jnp.sum(sign_ste(x) * g))(x)
  # |x| <= 1 passes g, |x| > 1 blocks it; x = -1 and x = +1 pass.
  np.testing.assert_array_equal(grad, [0, 2, 3, 4, 5, 6, 7, 0, 0])


def test_sign_ste_second_order_by_hand():
  # inner(p) = d/dx sum_i sign_ste(p x_i) = p * 1{|p x_i| <= 1};  L(p) = sum_i inner_i^2 * x_i
  # = p^2 * sum_{|p x_i| <= 1} x_i, so dL/dp = 2 p * sum_{|p x_i| <= 1} x_i (mask locally fixed).
  x = jnp.array([0.2, -0.4, 0.9, 3.0])
  p = 2.0  # p x = 0.4, -0.8, 1.8, 6.0: the first two pass

  def loss(p):
    inner = jax.grad(lambda x: jnp.sum(sign_ste(p * x)))(x)
    return jnp.sum(inner ** 2 * x)

  assert float(loss(p)) == pytest.approx(4.0 * (0.2 - 0.4), rel=1e-6)
  assert float(jax.grad(loss)(p)) == pytest.approx(2 * 2.0 * (0.2 - 0.4), rel=1e-6)
  assert float(jax.jit(jax.grad(loss))(p)) == pytest.approx(-0.8, rel=1e-6)


# --- XNOR weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (6, 3), (2, 1, 2, 1)])
def test_alpha_per_output_filter_against_numpy(shape):
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  w.reshape(-1)[::7] = 0.0  # zeros binarise to +1
  alpha, signs = xnor_weights(jnp.asarray(w))
  expected = [np.mean(np.abs(w[..., o].astype(np.float64))) for o in range(shape[-1])]
  assert alpha.shape == (shape[-1],)
  np.testing.assert_allclose(alpha, expected, **TOL)
  np.testing.assert_array_equal(signs, np.where(w >= 0, 1.0, -1.0))
  np.testing.assert_allclose(binarize_kernel(jnp.asarray(w)),
                             np.asarray(expected) * np.where(w >= 0, 1.0, -1.0), **TOL)


def test_alpha_is_the_least_squares_scale():
  # For fixed B = sign(W), ||W - a B||^2 is minimised at a = mean |W| (XNOR-Net Eq. 4).
  w = np.random.default_rng(1).normal(size=(3, 3, 2, 1))
  alpha = float(xnor_weights(jnp.asarray(w, jnp.float32))[0][0])
  err = lambda a: np.sum((w - a * np.sign(w)) ** 2)
  assert err(alpha) < min(err(alpha * 0.99), err(alpha * 1.01))


def test_xnor_weights_rejects_vectors():
  with pytest.raises(ValueError, match="at least 2 axes"):
    xnor_weights(jnp.ones(4))


# --- BinaryConv / BinaryDense forward --------------------------------------------------------

@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel_size", [3, 2])
def test_binary_conv_against_float64_reference(strides, padding, kernel_size):
  rng = np.random.default_rng(strides * 10 + kernel_size)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)  # odd and even spatial sizes
  x[0, 0, 0, 0] = 0.0
  w = rng.normal(size=(kernel_size, kernel_size, 3, 4)).astype(np.float32)
  y = conv_apply(w, x, strides=strides, padding=padding)
  expected, _, _ = np_binary_conv(x, w, strides, padding)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, **TOL)


@pytest.mark.parametrize("strides", [1, 2])
def test_binary_conv_same_padding_matches_xla(strides):
  # With real inputs the layer must pad exactly as XLA's own "SAME" conv does.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  y = conv_apply(w, x, strides=strides, binarize_input=False)
  ref = jax.lax.conv_general_dilated(jnp.asarray(x), binarize_kernel(jnp.asarray(w)),
                                     (strides, strides), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, ref, **TOL)
  expected, _, _ = np_binary_conv(x, w, strides, "SAME", binarize_input=False)
  np.testing.assert_allclose(y, expected, **TOL)


def test_binary_conv_padding_is_plus_one_by_hand():
  # Input all -1, kernel all +1 (alpha = 1): each output is (#padded taps) - (#real taps).
  x = -jnp.ones((1, 3, 3, 1))
  w = np.ones((3, 3, 1, 1), np.float32)
  y = conv_apply(w, x)[0, :, :, 0]
  np.testing.assert_array_equal(y, [[1, -3, 1], [-3, -9, -3], [1, -3, 1]])


def test_binary_conv_bias_and_bad_input():
  layer = BinaryConv(2, use_bias=True)
  v = layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
  assert v["params"]["kernel"].shape == (3, 3, 3, 2) and v["params"]["bias"].shape == (2,)
  with pytest.raises(ValueError, match="padding"):
    BinaryConv(2, padding="FULL").init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    layer.init(jax.random.key(0), jnp.ones((4, 4, 3)))


@pytest.mark.parametrize("use_bias", [False, True])
def test_binary_dense_against_float64_reference(use_bias):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  x[1, 2] = 0.0
  w = rng.normal(size=(6, 3)).astype(np.float32)
  bias = rng.normal(size=3).astype(np.float32)
  params = {"kernel": jnp.asarray(w)} | ({"bias": jnp.asarray(bias)} if use_bias else {})
  y = BinaryDense(3, use_bias=use_bias).apply({"params": params}, jnp.asarray(x))
  w64 = w.astype(np.float64)
  expected = np_sign(x) @ (np.mean(np.abs(w64), axis=0) * np_sign(w64))
  if use_bias:
    expected = expected + bias
  np.testing.assert_allclose(y, expected, **TOL)
  with pytest.raises(ValueError, match="flatten"):
    BinaryDense(3).init(jax.random.key(0), jnp.ones((2, 2, 3)))


# --- gradients -------------------------------------------------------------------------------

def test_binary_dense_gradients_by_hand():
  # x = [0.5, -2, 1], W = [0.2, -0.4, 0]^T: alpha = 0.2, W~ = [0.2, -0.2, 0.2], sign(x) =
  # [1, -1, 1], y = 0.6. L = 3 y: dL/dW = 3 sign(x) (identity STE through W~ = alpha sign W);
  # dL/dx = 3 W~ * 1{|x| <= 1} = [0.6, 0 (|-2| > 1), 0.6 (|1| = 1 passes)].
  x = jnp.array([[0.5, -2.0, 1.0]])
  w = jnp.array([[0.2], [-0.4], [0.0]])
  layer = BinaryDense(1)
  loss = lambda w, x: 3.0 * jnp.sum(layer.apply({"params": {"kernel": w}}, x))
  assert float(loss(w, x)) == pytest.approx(3 * 0.6, rel=1e-6)
  dw, dx = jax.grad(loss, argnums=(0, 1))(w, x)
  np.testing.assert_allclose(dw, [[3.0], [-3.0], [3.0]], **TOL)
  np.testing.assert_allclose(dx, [[0.6, 0.0, 0.6]], **TOL)


def np_conv_kernel_grad(xs, c, k, strides):
  """dL/dW~[i, j, ci, co] = sum_{b, oh, ow} xs[b, oh s + i, ow s + j, ci] c[b, oh, ow, co]."""
  g = np.zeros((k, k, xs.shape[-1], c.shape[-1]))
  for oh in range(c.shape[1]):
    for ow in range(c.shape[2]):
      patch = xs[:, oh * strides:oh * strides + k, ow * strides:ow * strides + k, :]
      g += np.einsum("bhwc,bo->hwco", patch, c[:, oh, ow, :])
  return g


@pytest.mark.parametrize("strides", [1, 2])
def test_binary_conv_gradients_against_numpy(strides):
  rng = np.random.default_rng(5 + strides)
  x = rng.uniform(-1.5, 1.5, size=(2, 5, 5, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  _, xs, wb = np_binary_conv(x, w, strides, "SAME")
  c = rng.normal(size=(2, *_out_hw(5, strides), 3))
  loss = lambda w, x: jnp.sum(conv_apply(w, x, strides=strides) * c.astype(np.float32))
  dw, dx = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(x))
  # Latent kernel: identity STE, so dL/dW = dL/dW~.
  np.testing.assert_allclose(dw, np_conv_kernel_grad(xs, c, 3, strides), **TOL)
  # Input: scatter c back through W~ onto the padded input, crop, mask by |x| <= 1.
  gpad = np.zeros(xs.shape)
  for oh in range(c.shape[1]):
    for ow in range(c.shape[2]):
      gpad[:, oh * strides:oh * strides + 3, ow * strides:ow * strides + 3, :] += np.einsum(
          "bo,hwco->bhwc", c[:, oh, ow, :], wb)
  (top, _), (left, _) = np_same_pads(5, 3, strides), np_same_pads(5, 3, strides)
  expected_dx = gpad[:, top:top + 5, left:left + 5, :] * (np.abs(x) <= 1)
  np.testing.assert_allclose(dx, expected_dx, **TOL)


def _out_hw(n, strides):
  out = -(-n // strides)
  return out, out


def test_binary_conv_second_order_gradient_against_numpy():
  # inner = dL1/dx for L1 = sum(conv(x) * c): crop(G) * m, with G = c scattered through W~ and
  # m = 1{|x| <= 1}. L2 = sum(inner * d) is linear in W~, so (identity STE)
  # dL2/dW[i, j, ci, co] = sum_{b, oh, ow} c[b, oh, ow, co] e[b, oh + i, ow + j, ci] with
  # e = pad(m * d) (zeros on the border: padded inputs have no gradient).
  rng = np.random.default_rng(8)
  x = rng.uniform(-1.5, 1.5, size=(1, 4, 4, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 2)).astype(np.float32)
  c = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  d = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)

  def outer(w):
    inner = jax.grad(lambda x: jnp.sum(conv_apply(w, x) * c))(jnp.asarray(x))
    return jnp.sum(inner * d)

  e = np.pad((np.abs(x) <= 1) * d.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
  expected = np_conv_kernel_grad(e, c.astype(np.float64), 3, 1)
  np.testing.assert_allclose(jax.grad(outer)(jnp.asarray(w)), expected, **TOL)


def test_binarize_kernel_identity_derivative_in_both_modes():
  w = jnp.array([[0.3, -0.1], [-0.5, 0.0]])
  t = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  _, tangent = jax.jvp(binarize_kernel, (w,), (t,))
  np.testing.assert_array_equal(tangent, t)
  np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(binarize_kernel(w) * t))(w), t)


def test_same_pads_helper_matches_definition():
  for n in range(1, 9):
    for k in (1, 2, 3, 5):
      for s in (1, 2, 3):
        assert binary.same_pads((n,), k, s) == [np_same_pads(n, k, s)]
