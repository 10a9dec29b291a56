"""Grad-CAM attention maps of any zoo classifier, differentiable in its parameters.

    maps = grad_cam(model, variables, x, class_index)            # [B] -> [B, h, w]
    maps = grad_cam(model, variables, x, pairs)                  # [B, n] -> [B, n, h, w]
    logits, cam = logits_and_cam(model, variables, x)            # one forward pass ...
    raw = cam(jnp.argmax(logits, axis=-1))                       # ... classes chosen from it

For a class c and the last convolutional feature map A [h, w, C] of an image (the map
`forward_with_insides` reports as "feature_map": the input of the global pooling or of the last
pooling before the head), Grad-CAM (Selvaraju et al. 2017, Eqs. 1-2) is

    alpha_k = 1/(h w) sum_ij d y^c / d A_ij^k,       map = ReLU(sum_k alpha_k A^k)     [h, w],

with y^c the class logit (the paper's "one-hot vector of the predicted class" back-propagated
from the pre-softmax scores). The gradient is taken with the `perturb` mechanism of
`forward_with_insides` (the gradient at a zero perturbation of the feature map's module), as a
`jax.vjp` so that one forward pass serves any number of classes and the classes may be chosen
from the logits of that same pass. The network runs in inference mode (BatchNorm with its
running statistics), so examples do not interact and one backward pass of a per-example one-hot
cotangent gives every example its own gradient.

Differentiability. The map is an ordinary JAX function of the variables: `jax.grad` of a loss of
the maps with respect to the parameters differentiates through the inner backward pass (a
second-order derivative of the network), which is what the attention loss of ENVISE needs.

Normalisation (our choice; neither Grad-CAM nor ENVISE fixes one for distances). Each map is
scaled to l2 norm sqrt(2) over its pixels, after it is resized to the resolution at which
distances are taken (bilinear resizing changes the norm). For two non-negative maps a, b with
||a|| = ||b|| = sqrt(2), the squared distance of Eq. 5 is

    ||a - b||^2 = 4 (1 - cos(a, b))   in [0, 4],

independent of the map's resolution: 0 for proportional maps, 4 for maps with disjoint support
(both non-zero; see below for an all-zero map). Why sqrt(2) and not 1: ENVISE reports
distances between hard-negative and hard-positive maps in [0.33, 2.8] and ablates the margin
over {0.5, 1.0, 1.5, 2.0, 2.5}. Unit maps give distances in [0, 2]: 2.8 is then impossible, and
for delta >= 2 the hinge max(0, d_p - d_n + delta) >= delta - 2 >= 0 is always active, so
delta = 2.0 and 2.5 give the same gradients and train identically. With [0, 4] the reported
range fits and every ablation margin is a distinct, attainable demand: the default delta = 1.5
asks cos(anchor, positive) - cos(anchor, negative) >= 0.375 (delta / 4), and no margin below 4
is always active. The max-normalisation used for Grad-CAM pictures (map / max) was rejected:
its distances grow with the number of pixels, so a margin would mean different things for a
2x2 and a 32x32 map.

An all-zero map (ReLU of a non-positive sum everywhere) has no direction; it stays all zero
(`normalize_maps` divides by sqrt(||m||^2 + eps)), so its squared distance to any normalised map
is 2, and neither values nor gradients are NaN.

Dead maps, and the "centred" target. Softmax, hence L_d, cannot see a shift of every class's
logit by the same amount: the mean over classes of the head's weights is left to drift. Grad-CAM
differentiates the raw logit y^c, so that drift enters every class's channel weights alpha_k. A
student whose head ends with mostly negative weights on its (non-negative) last feature map gets
alpha_k < 0 for all k and an all-zero map for every class, and since ReLU passes no gradient
there, L_at cannot revive it. It happens in our experiments (experiments/envise: most of the
adapted students' maps are all zero after the first scenario). `target="centred"`
differentiates y^c - mean_k y^k instead, which softmax does see (log-softmax differs from it by a
term common to all classes), so the drift cancels; "logit" (default) is Grad-CAM and the paper.

Resizing. Teacher and student maps of different sizes are compared at the *finer* of the two
grids (`common_size`: the larger height and the larger width): the coarser map is upsampled
bilinearly, as Grad-CAM upsamples its map to the image, so no detail of the finer map is thrown
away. `jax.image.resize` uses half-pixel centres (align_corners=False) with edge clamping.

References:
  Selvaraju et al. 2017, Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization, Eqs. 1-2.
  Sharma et al. 2021 (ICLR submission), ENVISE, Sec. 3 (attention maps, Eq. 5) and App. A.2
    (distance range [0.33, 2.8], margin 1.5).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oodjax.models.insides import InferenceApply, forward_with_insides

# l2 norm of a normalised map: squared distances of non-negative maps lie in [0, 2 MAP_NORM^2].
MAP_NORM = math.sqrt(2.0)
# Added to the squared norm before the square root: keeps an all-zero map at zero and bounds
# the normalisation's gradient by MAP_NORM / sqrt(eps) = 1.4e12. Only maps of norm below ~1e-12
# are shrunk; a larger eps such as 1e-12 would already shrink a map of norm 1e-4 (common for an
# untrained network) by a relative 5e-5.
NORM_EPS = 1e-24

CamFn = Callable[[jax.Array], jax.Array]
# What Grad-CAM differentiates for class c: the logit y^c, or y^c - mean_k y^k (see above).
TARGETS = ("logit", "centred")


def as_module(model: Any) -> nn.Module:
  """The Flax module behind `model`: a Linen module, `inference_apply(module)` or `module.apply`.

  Grad-CAM needs the module itself (to find its feature map by intercepting its submodules), not
  only an opaque apply function.

  Raises:
    ValueError: for anything else.
  """
  if isinstance(model, nn.Module):
    return model
  if isinstance(model, InferenceApply):
    return model.model
  owner = getattr(model, "__self__", None)  # a bound `module.apply`
  if isinstance(owner, nn.Module):
    return owner
  raise ValueError(f"grad_cam needs the Flax Linen module (or inference_apply(module), or "
                   f"module.apply), got {type(model).__name__}: an arbitrary apply function "
                   "does not expose its last convolutional feature map")


def feature_map_name(model: Any, variables: Mapping[str, Any], x: jax.Array) -> str:
  """Name of the module whose output Grad-CAM weights (abstract trace, no compute).

  Args:
    model: see `as_module`.
    variables: the model's variables.
    x: [B, H, W, C] inputs (only the shape and dtype matter).

  Returns:
    The module path, e.g. "ResNetStage_1" (see `Insides.feature_map_name`).

  Raises:
    ValueError: when the model has no submodule returning a rank-4 map (no Grad-CAM possible).
  """
  return _feature_map_info(as_module(model), variables, x)[0]


def _feature_map_info(module: nn.Module, variables: Mapping[str, Any], x: jax.Array
                      ) -> tuple[str, jax.ShapeDtypeStruct]:
  """(name, abstract [B, h, w, C] array) of the feature map, from an abstract trace."""
  try:
    _, shapes = jax.eval_shape(
        lambda v, x: forward_with_insides(module, v, x, which=("feature_map",)), variables, x)
  except ValueError as e:
    raise ValueError(f"cannot compute Grad-CAM for {type(module).__name__}: its last "
                     f"convolutional feature map cannot be found ({e})") from e
  return shapes.feature_map_name, shapes.feature_map


def cam_from_gradient(feature_map: jax.Array, grad: jax.Array) -> jax.Array:
  """Grad-CAM of Eqs. 1-2 given the feature map and the class logit's gradient there.

  Args:
    feature_map: [B, h, w, C] A.
    grad: [B, h, w, C] d y^c / d A for each example's class c.

  Returns:
    [B, h, w] ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of the gradient, not normalised.
  """
  alpha = jnp.mean(grad, axis=(1, 2))  # [B, C]
  return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feature_map, alpha))


def _check_inputs(x: jax.Array) -> None:
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be a batch of images [B, H, W, C], got shape {jnp.shape(x)}")


def _check_class_index(class_index: jax.Array, batch: int, num_classes: int) -> jax.Array:
  class_index = jnp.asarray(class_index)
  if not jnp.issubdtype(class_index.dtype, jnp.integer):
    raise ValueError(f"class_index must hold integer class ids, got dtype {class_index.dtype}")
  if class_index.ndim not in (1, 2) or class_index.shape[0] != batch:
    raise ValueError(f"class_index must be [B] or [B, n] with B = {batch}, got shape "
                     f"{class_index.shape}")
  if not isinstance(class_index, jax.core.Tracer) and class_index.size:
    values = np.asarray(class_index)  # numpy: under a trace, jnp ops on constants are traced
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(f"class_index must lie in [0, {num_classes}), got values in "
                       f"[{lo}, {hi}]")
  return class_index


def logits_and_cam(model: Any, variables: Mapping[str, Any], x: jax.Array, *,
                   target: str = "logit") -> tuple[jax.Array, CamFn]:
  """One inference-mode forward pass, and a function giving raw Grad-CAM maps for any classes.

  Args:
    model: a Linen classifier with a rank-4 feature map (see `as_module`).
    variables: {"params": ..., "batch_stats": ...}.
    x: [B, H, W, C] normalised inputs.
    target: what is differentiated for class c: "logit", y^c (Grad-CAM, Selvaraju et al.,
      and ENVISE), or "centred", y^c - mean_k y^k (see `TARGETS`).

  Returns:
    logits: [B, K] equal to `model.apply(variables, x, train=False)`.
    cam: `class_index [B] -> [B, h, w]` or `[B, n] -> [B, n, h, w]`, the un-normalised maps
      ReLU(sum_k alpha_k A^k) (Eqs. 1-2) of those classes, at the feature map's resolution.
      Each call is one (batched) backward pass through the stored forward pass.

  Raises:
    ValueError: for non-image inputs or a model without a feature map; `cam` raises for
      a class_index of the wrong dtype or shape, or (when concrete) out of range.
  """
  _check_inputs(x)
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  module = as_module(model)
  name, shape = _feature_map_info(module, variables, x)

  def forward(delta):
    logits, insides = forward_with_insides(module, variables, x, which=("feature_map",),
                                           perturb={name: delta})
    return logits, insides.feature_map

  zeros = jnp.zeros(shape.shape, shape.dtype)  # [B, h, w, C]
  logits, vjp_fn, feature_map = jax.vjp(forward, zeros, has_aux=True)
  batch, num_classes = logits.shape

  def cam_one(class_index):  # [B] -> [B, h, w]
    cotangent = jax.nn.one_hot(class_index, num_classes, dtype=logits.dtype)  # [B, K]
    if target == "centred":  # d (y^c - mean_k y^k) = e_c - 1/K
      cotangent = cotangent - 1.0 / num_classes
    (grad,) = vjp_fn(cotangent)  # [B, h, w, C]
    return cam_from_gradient(feature_map, grad)

  def cam(class_index):
    class_index = _check_class_index(class_index, batch, num_classes)
    if class_index.ndim == 1:
      return cam_one(class_index)
    # The forward pass is shared; only the backward pass is batched over the n classes.
    return jax.vmap(cam_one, in_axes=1, out_axes=1)(class_index)  # [B, n, h, w]

  return logits, cam


def normalize_maps(maps: jax.Array, map_norm=MAP_NORM, eps: float = NORM_EPS) -> jax.Array:
  """Scales each map (the last two axes) to l2 norm `map_norm`; an all-zero map stays zero.

  Args:
    maps: [..., h, w] non-negative maps.
    map_norm: the target norm (default sqrt(2): squared distances of non-negative maps then lie
      in [0, 4], see the module docstring); may be traced.
    eps: added to the squared norm under the square root.

  Returns:
    [..., h, w] map_norm * maps / sqrt(||maps||^2 + eps).
  """
  if jnp.ndim(maps) < 2:
    raise ValueError(f"maps must be [..., h, w], got shape {jnp.shape(maps)}")
  # At least float32, where eps is not rounded to 0 (it would be in float16).
  wide = maps.astype(jnp.promote_types(maps.dtype, jnp.float32))
  squared = jnp.sum(jnp.square(wide), axis=(-2, -1), keepdims=True)  # [..., 1, 1]
  return (map_norm * wide * jax.lax.rsqrt(squared + eps)).astype(maps.dtype)


def common_size(*sizes: Sequence[int]) -> tuple[int, int]:
  """The grid at which maps of the given (h, w) sizes are compared: the finer one.

  Args:
    *sizes: (h, w) pairs, e.g. `teacher_maps.shape[-2:]`, `student_maps.shape[-2:]`.

  Returns:
    (max h, max w).
  """
  if not sizes or any(len(s) != 2 for s in sizes):
    raise ValueError(f"common_size needs one or more (h, w) pairs, got {sizes}")
  return max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)


def resize_maps(maps: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of maps [..., h, w] to [..., H, W] (`jax.image.resize`).

  Half-pixel centres (align_corners=False) with edge clamping; downsampling is antialiased
  (jax's default), upsampling is plain bilinear interpolation. Non-negative maps stay
  non-negative (the weights are non-negative). Resize before `normalize_maps`.

  Args:
    maps: [..., h, w].
    size: (H, W).

  Returns:
    [..., H, W]; `maps` itself when the size already matches.
  """
  if jnp.ndim(maps) < 2:
    raise ValueError(f"maps must be [..., h, w], got shape {jnp.shape(maps)}")
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"size must be a positive (H, W), got {size}")
  if tuple(maps.shape[-2:]) == size:
    return maps
  return jax.image.resize(maps, maps.shape[:-2] + size, method="bilinear")


def grad_cam(model: Any, variables: Mapping[str, Any], x: jax.Array, class_index: jax.Array,
             *, size: Sequence[int] | None = None, normalize: bool = True,
             map_norm=MAP_NORM, target: str = "logit") -> jax.Array:
  """Grad-CAM maps of the given classes, resized and normalised per map.

  Args:
    model: a Linen classifier with a rank-4 feature map (a zoo model, `inference_apply(model)`
      or `model.apply`); it runs in inference mode.
    variables: {"params": ..., "batch_stats": ...}; differentiable (second order).
    x: [B, H, W, C] normalised inputs.
    class_index: [B] int (one class per image) or [B, n] int (n classes per image).
    size: (H', W') to resize to before normalising; None keeps the feature map's (h, w).
    normalize: scale each map to l2 norm `map_norm` (see the module docstring); False gives
      the raw ReLU(sum_k alpha_k A^k).
    map_norm: the norm of a normalised map (default sqrt(2)).
    target: "logit" (default) or "centred" (see `logits_and_cam`).

  Returns:
    [B, h, w] for a [B] class_index, [B, n, h, w] for [B, n] (h, w = size when given).

  Raises:
    ValueError: for non-image inputs, a model without a feature map, or a bad class_index.

  References:
    Selvaraju et al. 2017, Eqs. 1-2; ENVISE Sec. 3 (maps of the predicted class).
  """
  _, cam = logits_and_cam(model, variables, x, target=target)
  maps = cam(class_index)
  if size is not None:
    maps = resize_maps(maps, size)
  return normalize_maps(maps, map_norm) if normalize else maps
