"""Grad-CAM (oodjax.envise.gradcam) against references that do not use forward_with_insides.

References: a two-conv network whose forward pass and logit gradient are written out by hand in
float64 numpy (the gradient of a linear head over ReLU features has a closed form), a numpy
bilinear resize with half-pixel centres, and finite differences (`check_grads`, float64) for the
parameter gradient, which differentiates through Grad-CAM's inner backward pass.

Tolerances: float32 maps against float64 references use rtol 1e-5 and atol 1e-6 times the map's
scale; a wrong channel weight, sign or averaging factor moves the map by far more.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from oodjax.envise import gradcam
from oodjax.models import feature_map_gradient, get_model, inference_apply

B, H, W, C, K = 3, 7, 6, 2, 4  # batch, image, channels, classes


class TinyNet(nn.Module):
  """conv(3x3, VALID) - ReLU - conv(2x2, VALID) [the feature map] - ReLU - head.

  `head="mean"`: global average pooling then Dense; `head="flatten"`: Dense on the flattened map.
  """
  head: str = "mean"

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3), padding="VALID", name="conv1")(x))  # [B, 5, 4, 3]
    z = nn.Conv(5, (2, 2), padding="VALID", name="conv2")(h)  # [B, 4, 3, 5]
    r = nn.relu(z)
    r = jnp.mean(r, axis=(1, 2)) if self.head == "mean" else r.reshape(r.shape[0], -1)
    return nn.Dense(K, name="dense")(r)


def np_conv_valid(x, kernel, bias):
  """Cross-correlation, VALID padding, float64 loops: x [B, H, W, Ci], kernel [kh, kw, Ci, Co]."""
  b, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  out = np.zeros((b, h - kh + 1, w - kw + 1, co))
  for i in range(h - kh + 1):
    for j in range(w - kw + 1):
      patch = x[:, i:i + kh, j:j + kw, :]  # [B, kh, kw, Ci]
      out[:, i, j, :] = np.einsum("bijc,ijco->bo", patch, kernel) + bias
  return out


def np_grad_cam(params, x, classes, head, *, kinks=False, centred=False):
  """Step-by-step Grad-CAM of TinyNet in float64: feature map, d logit / d map, weights, ReLU.

  With `kinks=True` also returns the smallest |pre-activation| of any ReLU on the way (the
  network's two and the map's), the distance to the nearest point where the map is not smooth.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  pre1 = np_conv_valid(x, p["conv1"]["kernel"], p["conv1"]["bias"])
  h = np.maximum(pre1, 0)
  z = np_conv_valid(h, p["conv2"]["kernel"], p["conv2"]["bias"])  # A: [B, h, w, c]
  _, fh, fw, fc = z.shape
  w_head = p["dense"]["kernel"]  # [D, K]
  if centred:  # d (y^c - mean_k y^k) / d features = W[:, c] - mean_k W[:, k]
    w_head = w_head - w_head.mean(axis=1, keepdims=True)
  grads = np.zeros_like(z)
  for b in range(len(x)):
    c = classes[b]
    if head == "mean":  # logit_c = sum_k W[k, c] mean_ij relu(z_ijk) + bias
      grads[b] = (z[b] > 0) * w_head[:, c][None, None, :] / (fh * fw)
    else:  # logit_c = sum_ijk W[(i, j, k), c] relu(z_ijk) + bias, row-major flattening
      grads[b] = (z[b] > 0) * w_head[:, c].reshape(fh, fw, fc)
  pre_cams = np.zeros((len(x), fh, fw))
  for b in range(len(x)):
    alpha = grads[b].mean(axis=(0, 1))  # [c]
    pre_cams[b] = np.einsum("ijk,k->ij", z[b], alpha)
  cams = np.maximum(pre_cams, 0)
  if kinks:
    return cams, min(np.abs(a).min() for a in (pre1, z, pre_cams))
  return cams


def random_variables(model, x, seed):
  """Random variables of `model` from numpy, shaped by an abstract `init` (nothing compiled).

  Kernels ~ N(0, 1 / fan_in), biases and BatchNorm shifts ~ N(0, 0.1^2), BatchNorm scales and
  running variances in [0.5, 1.5] and running means ~ N(0, 0.1^2), all float32. Eager `init` of
  the zoo models costs seconds on a busy 2-core machine; this costs milliseconds.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    if "scale" in name or "var" in name:
      return rng.uniform(0.5, 1.5, size=leaf.shape)
    return 0.1 * rng.normal(size=leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), jnp.float32), shapes)


def tiny(head="mean", seed=0):
  model = TinyNet(head=head)
  x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(B, H, W, C)), jnp.float32)
  return model, random_variables(model, x, seed), x


@functools.partial(jax.jit, static_argnums=0, static_argnames=("size", "normalize"))
def jit_grad_cam(model, variables, x, classes, size=None, normalize=True):
  return gradcam.grad_cam(model, variables, x, classes, size=size, normalize=normalize)


@pytest.mark.parametrize("head", ["mean", "flatten"])
def test_grad_cam_matches_step_by_step_reference(head):
  model, variables, x = tiny(head)
  classes = np.array([0, 3, 1], np.int32)
  ref = np_grad_cam(variables["params"], x, classes, head)  # [B, 4, 3]
  assert (ref.max(axis=(1, 2)) > 0).all()  # a non-trivial case: every map has positive pixels
  assert (ref == 0).any()  # ... and the ReLU clips somewhere
  raw = jit_grad_cam(model, variables, x, classes, normalize=False)
  np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  maps = jit_grad_cam(model, variables, x, classes)
  unit = np.sqrt(2.0) * ref / np.linalg.norm(ref, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(maps, unit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["mean", "flatten"])
def test_centred_target_matches_its_reference(head):
  model, variables, x = tiny(head, seed=2)
  classes = np.array([2, 0, 3], np.int32)
  ref = np_grad_cam(variables["params"], x, classes, head, centred=True)
  raw = jax.jit(lambda v, x: gradcam.grad_cam(model, v, x, classes, normalize=False,
                                              target="centred"))(variables, x)
  np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-30))


def test_centred_target_ignores_a_shift_common_to_all_classes():
  """Shifting every class's head weights by -10 changes no softmax, changes the Grad-CAM maps of
  the logit (on a non-negative feature map, as a zoo model's after its ReLU, it would make
  alpha < 0 and every map zero), and leaves the centred maps unchanged."""
  model, variables, x = tiny("mean", seed=3)
  shifted = jax.tree.map(lambda a: a, variables)
  shifted["params"]["dense"]["kernel"] = variables["params"]["dense"]["kernel"] - 10.0
  classes = np.array([1, 2, 3], np.int32)

  def cams(v, target):
    return np.asarray(gradcam.grad_cam(model, v, x, classes, normalize=False, target=target))

  probs = [jax.nn.softmax(model.apply(v, x)) for v in (variables, shifted)]
  np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)  # the shift is invisible to L_d
  assert not np.allclose(cams(shifted, "logit"), cams(variables, "logit"), atol=1e-3)
  np.testing.assert_allclose(cams(shifted, "centred"), cams(variables, "centred"), rtol=1e-4,
                             atol=1e-6)
  with pytest.raises(ValueError, match="target"):
    gradcam.grad_cam(model, variables, x, classes, target="softmax")


def test_squared_distances_are_four_times_one_minus_cosine():
  model, variables, x = tiny("flatten")
  maps = np.asarray(jit_grad_cam(model, variables, x, np.array([[0, 1], [2, 3], [1, 2]])),
                    np.float64)
  a, b = maps[:, 0].reshape(B, -1), maps[:, 1].reshape(B, -1)
  nonzero = (np.abs(a).max(1) > 0) & (np.abs(b).max(1) > 0)
  assert nonzero.sum() >= 2
  a, b = a[nonzero], b[nonzero]
  cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  np.testing.assert_allclose(np.sum((a - b) ** 2, 1), 4 * (1 - cos), rtol=1e-5, atol=1e-6)
  assert (np.sum((a - b) ** 2, 1) <= 4 + 1e-6).all()


def test_accepts_inference_apply_and_bound_apply():
  model, variables, x = tiny()
  classes = np.array([0, 1, 2], np.int32)
  want = gradcam.grad_cam(model, variables, x, classes)
  for handle in (inference_apply(model), model.apply):
    np.testing.assert_array_equal(gradcam.grad_cam(handle, variables, x, classes), want)


@pytest.mark.parametrize("name", ["small_cnn_tiny", "resnet_tiny"])
def test_zoo_models_agree_with_feature_map_gradient(name):
  """One shared forward pass (vjp) gives the maps of the gradient path of `insides`."""
  model = get_model(name, num_classes=5)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12, 12, 3)), jnp.float32)
  variables = random_variables(model, x, seed=4)
  classes = np.array([[4, 1], [0, 2]], np.int32)
  maps = jit_grad_cam(model, variables, x, classes, normalize=False)  # [2, 2, h, w]
  gradient_path = jax.jit(feature_map_gradient, static_argnums=0)
  for n in range(2):
    _, fmap, grad = gradient_path(model, variables, x, jnp.asarray(classes[:, n]))
    alpha = np.asarray(grad, np.float64).mean(axis=(1, 2))
    ref = np.maximum(np.einsum("bhwc,bc->bhw", np.asarray(fmap, np.float64), alpha), 0)
    np.testing.assert_allclose(maps[:, n], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  logits = jax.jit(lambda v, x: gradcam.logits_and_cam(model, v, x)[0])(variables, x)
  np.testing.assert_allclose(logits, model.apply(variables, x, train=False), rtol=1e-5,
                             atol=1e-6)


def test_vmap_over_classes_equals_separate_calls():
  model, variables, x = tiny("flatten")
  classes = np.array([[0, 1, 3], [2, 2, 0], [3, 1, 2]], np.int32)  # [B, n]
  stacked = jit_grad_cam(model, variables, x, classes)  # [B, n, h, w]
  assert stacked.shape == (B, 3, 4, 3)
  separate = np.stack([jit_grad_cam(model, variables, x, classes[:, n]) for n in range(3)], 1)
  # Batched and single backward passes sum in different orders: float32 rounding of maps of
  # norm sqrt(2).
  np.testing.assert_allclose(stacked, separate, rtol=1e-5, atol=1e-6)
  outside = jax.vmap(functools.partial(gradcam.grad_cam, model, variables, x), in_axes=1,
                     out_axes=1)(classes)
  np.testing.assert_allclose(outside, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,size", [("mean", None), ("flatten", (6, 5))])
def test_parameter_gradient_matches_finite_differences(head, size):
  """d/dparams of a scalar of the normalised maps: second order through the network."""
  with jax.enable_x64(True):
    model, variables, x = tiny(head, seed=9)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jnp.asarray(x, jnp.float64)
    classes = np.array([[0, 2], [1, 3], [3, 0]], np.int32)
    shape = (6, 5) if size else (4, 3)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, 2) + shape))
    # A generic point: no ReLU (of the network or of the map) has a pre-activation within
    # 30 times the difference step (1e-6 times a random direction of norm ~10) of its kink.
    for n in range(2):
      raw, kink = np_grad_cam(variables["params"], x, classes[:, n], head, kinks=True)
      assert (raw.max(axis=(1, 2)) > 0).all() and kink > 3e-4

    @jax.jit
    def f(params):
      maps = gradcam.grad_cam(model, {"params": params}, x, classes, size=size)
      return jnp.sum(weights * maps)

    grad = jax.grad(f)(variables["params"])
    # The head's bias shifts every logit's value, not its gradient: no effect on the maps.
    np.testing.assert_array_equal(grad["dense"].pop("bias"), 0.0)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grad))
    check_grads(f, (variables["params"],), order=1, modes=["rev"], eps=1e-6)


def test_all_zero_map_is_zero_with_finite_gradients():
  model, variables, _ = tiny()
  params = jax.tree.map(jnp.zeros_like, variables["params"])  # every pre-activation is 0
  params["dense"]["kernel"] = jnp.ones_like(params["dense"]["kernel"])
  x = jnp.zeros((B, H, W, C))
  classes = np.array([0, 1, 2], np.int32)

  @jax.jit
  def f(params):
    return jnp.sum(gradcam.grad_cam(model, {"params": params}, x, classes, size=(8, 6)))

  value, grad = jax.value_and_grad(f)(params)
  assert float(value) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
  zeros = jnp.zeros((2, 3, 3))
  np.testing.assert_array_equal(gradcam.normalize_maps(zeros), zeros)
  g = jax.grad(lambda m: jnp.sum(jnp.square(gradcam.normalize_maps(m) - 1.0)))(zeros)
  assert np.isfinite(np.asarray(g)).all()


def np_bilinear(maps, size):
  """Half-pixel-centre bilinear resize with clamped edges, float64 loops: [..., h, w]."""
  maps = np.asarray(maps, np.float64)
  h, w = maps.shape[-2:]
  out = np.zeros(maps.shape[:-2] + tuple(size))

  def taps(i, n_in, n_out):
    pos = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n_in - 1)
    return lo, hi, pos - lo

  for i in range(size[0]):
    i0, i1, fi = taps(i, h, size[0])
    for j in range(size[1]):
      j0, j1, fj = taps(j, w, size[1])
      out[..., i, j] = ((1 - fi) * (1 - fj) * maps[..., i0, j0] + (1 - fi) * fj * maps[..., i0, j1]
                        + fi * (1 - fj) * maps[..., i1, j0] + fi * fj * maps[..., i1, j1])
  return out


def test_resize_maps_upsamples_bilinearly():
  # 2x2 -> 4x4 by hand: rows sample at -0.25, 0.25, 0.75, 1.25 (clamped to 0 and 1).
  maps = np.array([[[0.0, 4.0], [8.0, 12.0]]], np.float32)
  want_row0 = [0.0, 1.0, 3.0, 4.0]
  got = np.asarray(gradcam.resize_maps(maps, (4, 4)))
  np.testing.assert_allclose(got[0, 0], want_row0, atol=1e-6)
  np.testing.assert_allclose(got[0, :, 0], [0.0, 2.0, 6.0, 8.0], atol=1e-6)
  rng = np.random.default_rng(0)
  maps = rng.uniform(size=(2, 3, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(gradcam.resize_maps(maps, (7, 9)), np_bilinear(maps, (7, 9)),
                             rtol=1e-5, atol=1e-6)
  assert gradcam.resize_maps(maps, (3, 4)) is maps
  assert (np.asarray(gradcam.resize_maps(maps, (2, 2))) >= 0).all()
  assert gradcam.common_size((2, 2), (8, 4), (4, 8)) == (8, 8)


def test_bad_inputs_raise():
  model, variables, x = tiny()
  classes = np.array([0, 1, 2], np.int32)
  with pytest.raises(ValueError, match="integer"):
    gradcam.grad_cam(model, variables, x, classes.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[B\] or \[B, n\]"):
    gradcam.grad_cam(model, variables, x, classes[:2])
  with pytest.raises(ValueError, match="must lie in"):
    gradcam.grad_cam(model, variables, x, np.array([0, 1, K], np.int32))
  with pytest.raises(ValueError, match="images"):
    gradcam.grad_cam(model, variables, x[0], classes)
  with pytest.raises(ValueError, match="Flax Linen module"):
    gradcam.grad_cam(lambda v, x: model.apply(v, x), variables, x, classes)
  with pytest.raises(ValueError, match="size"):
    gradcam.resize_maps(np.zeros((2, 3, 3)), (0, 3))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(K)(x.reshape(x.shape[0], -1))

  mlp = MLP()
  mlp_vars = random_variables(mlp, x, seed=0)
  with pytest.raises(ValueError, match="feature map cannot be found"):
    gradcam.grad_cam(mlp, mlp_vars, x, classes)
