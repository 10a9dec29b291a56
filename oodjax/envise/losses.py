"""The ENVISE training losses (Sec. 3, Eqs. 5-6; App. A.2, Eq. 21) as pure functions.

    per_example, aux = envise_loss(student, student_vars, teacher, teacher_vars, x)
    loss = per_example.mean()                                     # L_f of Eq. 6

The student S learns online from a frozen teacher T:

    L_d   = -1/N sum_n log softmax(s_n)[argmax t_n]                     (Sec. 3, hard labels)
    L_at  = 1/(N K) sum_n max(0, sum_k (A_t^k - A_sp^k)^2 - sum_k (A_t^k - A_sn^k)^2 + delta)
                                                                           (Eq. 5)
    L_f   = lambda1 L_d + lambda2 L_at,   lambda1 = 1, lambda2 = 0.2, delta = 1.5   (Eq. 6)

with A_t the teacher's Grad-CAM map for its own prediction (anchor), A_sp the student's map for
the teacher's label (hard positive), A_sn the student's map for its most probable incorrect
class (hard negative), K the number of pixels of a map and N the number of samples. Maps come
from `oodjax.envise.gradcam`: resized to the finer of the two grids, then scaled to l2 norm
sqrt(2), so a squared distance is 4 (1 - cosine) in [0, 4] (see that module for why).

Readings of the paper (its extracted text of Eqs. 5 and 21 is partly garbled):
  * Distances are squared: Eq. 5 writes ||A_t^k - A_s^k||^2 per pixel, summed over k, and the
    text speaks of the negative's "squared distance". delta is added once per sample, after the
    sums over pixels, and the whole is scaled by 1/(N K) as printed: per example
    max(0, d_p - d_n + delta) / K. With K fixed this only rescales lambda2 (by 1/K);
    `pixel_mean=False` gives the issue's "sum over pixels" without the 1/K.
  * The hinge max(0, .) is not visible in the extracted Eq. 5 but is the FaceNet triplet loss
    the paper cites (Schroff et al. 2015); without it delta would be an additive constant with
    no effect on training, contradicting the margin ablation (Table 3).
  * The hard negative is "the attention map from the second most probable class (incorrect
    prediction)". When the student agrees with the teacher this is its second most probable
    class. When it does not, the literal second class may be the teacher's label itself, which
    would make the negative equal to the positive (loss = delta, gradient 0). The default
    `negative="incorrect"` takes the student's most probable class other than the teacher's
    label, which is the second most probable whenever the student is right and the
    (incorrect) prediction otherwise; `negative="second"` is the literal reading.
  * Eq. 21 (the ablation L_a, "without the second term in equation 5") keeps only the
    anchor-positive term: per example d_p / K. The margin, a constant without the hinge's
    second term, is dropped (it would not change any gradient).

Per-example losses are returned ([B]); the caller takes the mean over samples (Eq. 5's 1/N,
Eq. 6). The margin and the weights are ordinary, possibly traced, arrays: a `jax.vmap` over
margins (the Table 3 ablation) is one program.

References:
  Sharma et al. 2021 (ICLR submission), ENVISE, Sec. 3 (L_d, Eqs. 5-6), App. A.2 (Eq. 21).
  Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network (the T^2 scaling).
  Schroff, Kalenichenko, Philbin 2015, FaceNet (the triplet hinge).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from oodjax.envise import gradcam
from oodjax.models.insides import inference_apply

NEGATIVES = ("incorrect", "second")
ATTENTION_LOSSES = ("triplet", "l2", "none")


def _check_logits(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
  if jnp.ndim(student_logits) != 2 or jnp.shape(student_logits) != jnp.shape(teacher_logits):
    raise ValueError("student_logits and teacher_logits must both be [B, K] of the same shape, "
                     f"got {jnp.shape(student_logits)} and {jnp.shape(teacher_logits)}")


def pseudo_labels(teacher_logits: jax.Array) -> jax.Array:
  """The teacher's hard pseudo-labels: [B, K] logits -> [B] int32 argmax."""
  return jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """L_d: cross-entropy of the student against the teacher's hard pseudo-labels, per example.

  Args:
    student_logits: [B, K].
    teacher_logits: [B, K]; only their argmax is used (no gradient flows to the teacher).

  Returns:
    [B] -log softmax(student_logits)[b, argmax teacher_logits[b]]; the paper's L_d is the mean.

  References:
    ENVISE Sec. 3: L_d = -1/N sum_i y_i log s_i with y the teacher's pseudo-labels.
  """
  _check_logits(student_logits, teacher_logits)
  labels = pseudo_labels(teacher_logits)  # [B]
  log_probs = jax.nn.log_softmax(student_logits, axis=-1)  # [B, K]
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def soft_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                           temperature=4.0) -> jax.Array:
  """The soft option of L_d: T^2 KL(softmax(t / T) || softmax(s / T)), per example.

  KL rather than the cross-entropy of Hinton et al.: they differ by the teacher's entropy, a
  constant for the student, so the gradients are the same, and KL is 0 when the student matches
  the teacher. The T^2 factor keeps the gradient's size, T (q_s - q_t) for the student logits,
  comparable across temperatures.

  Args:
    student_logits: [B, K].
    teacher_logits: [B, K]; treated as constants (stop_gradient).
    temperature: T > 0, a scalar (may be traced).

  Returns:
    [B] the per-example loss.

  References:
    Hinton, Vinyals, Dean 2015, Sec. 2.
  """
  _check_logits(student_logits, teacher_logits)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  log_q_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)  # [B, K]
  log_q_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)  # [B, K]
  kl = jnp.sum(jnp.exp(log_q_teacher) * (log_q_teacher - log_q_student), axis=-1)  # [B]
  return jnp.square(temperature) * kl


def _check_maps(**maps: jax.Array) -> tuple[int, ...]:
  shapes = {name: jnp.shape(m) for name, m in maps.items()}
  first = next(iter(shapes.values()))
  if len(first) < 3 or any(s != first for s in shapes.values()):
    raise ValueError("attention maps must all be [B, h, w] of one shape (resize them to a "
                     f"common size with gradcam.resize_maps first), got {shapes}")
  return first


def squared_map_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum_k (a^k - b^k)^2 over the pixels k of each map: [B, h, w] x2 -> [B]."""
  _check_maps(a=a, b=b)
  return jnp.sum(jnp.square(a - b), axis=(-2, -1))


def attention_triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array,
                           margin=1.5, *, pixel_mean: bool = True) -> jax.Array:
  """L_at of Eq. 5, per example: max(0, d(A_t, A_sp) - d(A_t, A_sn) + delta) / K.

  d is the squared distance summed over the K = h * w pixels. See the module docstring for the
  hinge and the 1/K.

  Args:
    anchor: [B, h, w] A_t, the teacher's map for its prediction.
    positive: [B, h, w] A_sp, the student's map for the teacher's label.
    negative: [B, h, w] A_sn, the student's map for its hard negative class.
    margin: delta (the paper's 1.5), a scalar; may be traced (vmap over margins).
    pixel_mean: divide by K as Eq. 5's 1/(N K) does (default); False sums over pixels.

  Returns:
    [B] the per-example loss, >= 0; L_at is its mean over the samples.

  References:
    ENVISE Eq. 5; Schroff et al. 2015 (triplet hinge).
  """
  shape = _check_maps(anchor=anchor, positive=positive, negative=negative)
  d_pos = squared_map_distance(anchor, positive)  # [B]
  d_neg = squared_map_distance(anchor, negative)  # [B]
  # relu: derivative 0 at the kink (jnp.maximum would split it 0.5 / 0.5).
  loss = jax.nn.relu(d_pos - d_neg + margin)
  return loss / (shape[-2] * shape[-1]) if pixel_mean else loss


def ablation_attention_loss(anchor: jax.Array, positive: jax.Array, *,
                            pixel_mean: bool = True) -> jax.Array:
  """L_a of Eq. 21 (the ablation without the hard negative), per example: d(A_t, A_sp) / K.

  Args:
    anchor: [B, h, w] A_t.
    positive: [B, h, w] A_sp.
    pixel_mean: divide by K, as Eq. 5 (default); False sums over pixels.

  Returns:
    [B] the per-example loss; L_a is its mean over the samples.

  References:
    ENVISE App. A.2, Eq. 21.
  """
  shape = _check_maps(anchor=anchor, positive=positive)
  loss = squared_map_distance(anchor, positive)
  return loss / (shape[-2] * shape[-1]) if pixel_mean else loss


def hard_negative_classes(student_logits: jax.Array, teacher_labels: jax.Array,
                          negative: str = "incorrect") -> jax.Array:
  """The student's hard-negative class per example (see the module docstring).

  Args:
    student_logits: [B, K], K >= 2.
    teacher_labels: [B] int, the teacher's pseudo-labels.
    negative: "incorrect": the student's most probable class other than the teacher's label;
      "second": the student's second most probable class (the literal reading).

  Returns:
    [B] int32 class ids.
  """
  if negative not in NEGATIVES:
    raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
  if jnp.ndim(student_logits) != 2 or jnp.shape(student_logits)[1] < 2:
    raise ValueError(f"student_logits must be [B, K] with K >= 2, got {jnp.shape(student_logits)}")
  if negative == "second":
    _, top2 = jax.lax.top_k(student_logits, 2)  # [B, 2]
    return top2[:, 1].astype(jnp.int32)
  num_classes = student_logits.shape[1]
  is_label = jax.nn.one_hot(teacher_labels, num_classes, dtype=bool)  # [B, K]
  masked = jnp.where(is_label, -jnp.inf, student_logits)
  return jnp.argmax(masked, axis=-1).astype(jnp.int32)


def envise_loss(
    student: Any,
    student_variables: Mapping[str, Any],
    teacher: Any,
    teacher_variables: Mapping[str, Any],
    x: jax.Array,
    *,
    margin=1.5,
    lambda_d=1.0,
    lambda_at=0.2,
    attention: str = "triplet",
    temperature=None,
    negative: str = "incorrect",
    student_logits: jax.Array | None = None,
    pixel_mean: bool = True,
    map_norm=gradcam.MAP_NORM,
    cam_target: str = "logit",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_f = lambda1 L_d + lambda2 L_at (Eq. 6), per example, from the two networks.

  Both networks run in inference mode (BatchNorm with running statistics) for their logits and
  Grad-CAM maps; the teacher's outputs are constants (stop_gradient). Differentiate with respect
  to `student_variables["params"]`: the attention term differentiates Grad-CAM's inner gradient
  (second order). A student trained with BatchNorm in training mode can pass its
  training-mode `student_logits`; they are then used for L_d and for the hard negative, while
  the maps still come from the inference-mode pass.

  Args:
    student: the student Linen module (or `inference_apply(module)`); needs a rank-4 feature map
      unless attention="none".
    student_variables: its variables.
    teacher: the teacher Linen module, likewise.
    teacher_variables: its variables.
    x: [B, H, W, C] normalised images (the same for both networks).
    margin: delta of Eq. 5 (default 1.5); may be traced.
    lambda_d: lambda1 (default 1); may be traced.
    lambda_at: lambda2 (default 0.2); may be traced.
    attention: "triplet" (L_at, Eq. 5), "l2" (the ablation L_a, Eq. 21) or "none" (L_d only,
      no Grad-CAM computed).
    temperature: None for the hard-label L_d (the paper's); a value T for the soft option
      `soft_distillation_loss`.
    negative: "incorrect" (default) or "second"; see `hard_negative_classes`.
    student_logits: [B, K] optional training-mode logits of the student.
    pixel_mean: the 1/K of Eq. 5 (see `attention_triplet_loss`).
    map_norm: l2 norm of the normalised maps (see `oodjax.envise.gradcam`).
    cam_target: what Grad-CAM differentiates, for both networks: "logit" (the paper) or
      "centred" (y^c - mean_k y^k; see `oodjax.envise.gradcam`, "Dead maps").

  Returns:
    loss: [B] lambda1 L_d + lambda2 L_attention per example; its mean is L_f.
    aux: "distillation" [B], "attention" [B] (zeros for attention="none"), "teacher_labels" [B],
      "student_logits" [B, K], "teacher_logits" [B, K]; and unless attention="none":
      "negative_classes" [B], "d_pos" [B], "d_neg" [B] (squared map distances),
      "anchor", "positive", "negative" [B, h, w] (normalised maps at the common size).

  Raises:
    ValueError: for unknown options or mismatched shapes.

  References:
    ENVISE Sec. 3, Eqs. 5-6; App. A.2, Eq. 21.
  """
  if attention not in ATTENTION_LOSSES:
    raise ValueError(f"attention must be one of {ATTENTION_LOSSES}, got {attention!r}")
  if negative not in NEGATIVES:
    raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
  aux = {}
  if attention == "none":
    teacher_logits = inference_apply(gradcam.as_module(teacher))(teacher_variables, x)
    inference_logits = inference_apply(gradcam.as_module(student))(student_variables, x)
  else:
    teacher_logits, teacher_cam = gradcam.logits_and_cam(teacher, teacher_variables, x,
                                                         target=cam_target)
    inference_logits, student_cam = gradcam.logits_and_cam(student, student_variables, x,
                                                           target=cam_target)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  logits = inference_logits if student_logits is None else student_logits
  if jnp.shape(logits) != jnp.shape(teacher_logits):
    raise ValueError(f"student and teacher logits differ in shape: {jnp.shape(logits)} vs "
                     f"{jnp.shape(teacher_logits)} (the student must predict the teacher's K "
                     "classes)")
  labels = pseudo_labels(teacher_logits)  # [B]
  if temperature is None:
    loss_d = distillation_loss(logits, teacher_logits)
  else:
    loss_d = soft_distillation_loss(logits, teacher_logits, temperature)

  if attention == "none":
    loss_at = jnp.zeros_like(loss_d)
  else:
    negatives = hard_negative_classes(jax.lax.stop_gradient(logits), labels, negative)  # [B]
    anchor = jax.lax.stop_gradient(teacher_cam(labels))  # [B, h_t, w_t]
    student_maps = student_cam(jnp.stack([labels, negatives], axis=1))  # [B, 2, h_s, w_s]
    size = gradcam.common_size(anchor.shape[-2:], student_maps.shape[-2:])
    anchor = gradcam.normalize_maps(gradcam.resize_maps(anchor, size), map_norm)
    student_maps = gradcam.normalize_maps(gradcam.resize_maps(student_maps, size), map_norm)
    positive, negative_map = student_maps[:, 0], student_maps[:, 1]  # [B, h, w] each
    if attention == "triplet":
      loss_at = attention_triplet_loss(anchor, positive, negative_map, margin,
                                       pixel_mean=pixel_mean)
    else:
      loss_at = ablation_attention_loss(anchor, positive, pixel_mean=pixel_mean)
    aux.update(negative_classes=negatives, d_pos=squared_map_distance(anchor, positive),
               d_neg=squared_map_distance(anchor, negative_map), anchor=anchor,
               positive=positive, negative=negative_map)
  aux.update(distillation=loss_d, attention=loss_at, teacher_labels=labels,
             student_logits=logits, teacher_logits=teacher_logits)
  return lambda_d * loss_d + lambda_at * loss_at, aux

