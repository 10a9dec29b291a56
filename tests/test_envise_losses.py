"""ENVISE losses (oodjax.envise.losses) against hand-worked numbers and float64 references.

References: numbers worked out by hand (2x2 maps, three-class logits), optax's integer-label
cross-entropy, float64 numpy for L_d / the soft variant / the triplet hinge, the closed-form
gradient T (q_s - q_t) of the T^2-scaled KL, and finite differences (`check_grads`, float64) for
the gradient of L_f with respect to the student's parameters (second order through Grad-CAM).
The wiring of `envise_loss` (which maps are anchor, positive and negative) is checked against
maps requested class by class from `grad_cam` and a numpy hinge.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from test_envise_gradcam import TinyNet, random_variables

from oodjax.envise import gradcam, losses
from oodjax.models import get_model, inference_apply

TOL = {"rtol": 1e-5, "atol": 1e-6}


def test_distillation_loss_hand_worked():
  # student softmax rows: [0.25, 0.75, 0] -> use logits log p (p > 0 everywhere below).
  student = np.log(np.array([[0.2, 0.6, 0.2], [0.2, 0.6, 0.2], [0.5, 0.25, 0.25]], np.float32))
  teacher = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [0.0, 0.0, 9.0]], np.float32)
  # labels 0, 1, 2 -> -log 0.2, -log 0.6, -log 0.25
  want = [1.6094379124341003, 0.5108256237659907, 1.3862943611198906]
  np.testing.assert_allclose(losses.distillation_loss(student, teacher), want, **TOL)
  np.testing.assert_array_equal(losses.pseudo_labels(teacher), [0, 1, 2])


def test_distillation_loss_matches_optax_and_numpy():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(8, 5)).astype(np.float32) * 3
  teacher = rng.normal(size=(8, 5)).astype(np.float32)
  labels = teacher.argmax(1)
  got = losses.distillation_loss(student, teacher)
  np.testing.assert_allclose(
      got, optax.softmax_cross_entropy_with_integer_labels(student, labels), **TOL)
  s = student.astype(np.float64)
  ref = -(s[np.arange(8), labels] - np.log(np.exp(s).sum(1)))
  np.testing.assert_allclose(got, ref, **TOL)
  # No gradient reaches the teacher's logits (only their argmax is used).
  g = jax.grad(lambda t: losses.distillation_loss(student, t).sum())(teacher)
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_distillation_loss_is_t2_scaled_kl(temperature):
  rng = np.random.default_rng(1)
  student = rng.normal(size=(6, 4)).astype(np.float32) * 2
  teacher = rng.normal(size=(6, 4)).astype(np.float32) * 2

  def softmax64(z):
    e = np.exp(z / temperature - (z / temperature).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  q_s, q_t = softmax64(student.astype(np.float64)), softmax64(teacher.astype(np.float64))
  kl = np.sum(q_t * (np.log(q_t) - np.log(q_s)), 1)
  got = losses.soft_distillation_loss(student, teacher, temperature)
  np.testing.assert_allclose(got, temperature**2 * kl, rtol=1e-5, atol=1e-6)
  # d/ds of T^2 KL = T (q_s - q_t): the T^2 keeps the gradient's size O(T), as Hinton et al.
  grad = jax.grad(lambda s: losses.soft_distillation_loss(s, teacher, temperature).sum())(student)
  np.testing.assert_allclose(grad, temperature * (q_s - q_t), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses.soft_distillation_loss(teacher, teacher, temperature), 0.0,
                             atol=1e-6)


# Three 2x2 triplets worked by hand: (anchor, positive, negative) -> (d_p, d_n).
ANCHOR = np.array([[[1, 0], [0, 0]], [[1, 0], [0, 0]], [[1, 0], [0, 0]]], np.float32)
POSITIVE = np.array([[[0.5, 0], [0, 0]], [[0, 0], [0, 1]], [[1, 0], [0, 0]]], np.float32)
NEGATIVE = np.array([[[0, 1], [0, 0]], [[1, 0], [0, 0]], [[0.5, 0.5], [0, 0]]], np.float32)
# d_p = 0.25, 2, 0; d_n = 1 + 1 = 2, 0, 0.25 + 0.25 = 0.5.
# delta = 1.5: max(0, .) = max(0, -0.25) = 0, 3.5, 1.0; divided by K = 4: 0, 0.875, 0.25.


def test_attention_triplet_loss_hand_worked():
  np.testing.assert_allclose(losses.squared_map_distance(ANCHOR, POSITIVE), [0.25, 2, 0])
  np.testing.assert_allclose(losses.squared_map_distance(ANCHOR, NEGATIVE), [2, 0, 0.5])
  got = losses.attention_triplet_loss(ANCHOR, POSITIVE, NEGATIVE, 1.5)
  np.testing.assert_allclose(got, [0.0, 0.875, 0.25], **TOL)
  got = losses.attention_triplet_loss(ANCHOR, POSITIVE, NEGATIVE, 1.5, pixel_mean=False)
  np.testing.assert_allclose(got, [0.0, 3.5, 1.0], **TOL)
  # delta = 2.5: 0.75, 4.5, 2.0 -> / 4.
  got = losses.attention_triplet_loss(ANCHOR, POSITIVE, NEGATIVE, jnp.float32(2.5))
  np.testing.assert_allclose(got, [0.1875, 1.125, 0.5], **TOL)


def test_ablation_attention_loss_hand_worked():
  got = losses.ablation_attention_loss(ANCHOR, POSITIVE)
  np.testing.assert_allclose(got, [0.0625, 0.5, 0.0], **TOL)
  got = losses.ablation_attention_loss(ANCHOR, POSITIVE, pixel_mean=False)
  np.testing.assert_allclose(got, [0.25, 2.0, 0.0], **TOL)


def test_attention_loss_gradients():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    a, p, n = (rng.uniform(size=(8, 3, 4)) for _ in range(3))
    margin = 0.45
    d_p = np.sum((a - p) ** 2, (1, 2))
    d_n = np.sum((a - n) ** 2, (1, 2))
    hinge = d_p - d_n + margin
    assert (np.abs(hinge) > 1e-2).all() and (hinge > 0).any() and (hinge < 0).any()
    check_grads(lambda p, n: losses.attention_triplet_loss(a, p, n, margin), (p, n), order=2,
                modes=["rev"])
    check_grads(lambda p: losses.ablation_attention_loss(a, p), (p,), order=2, modes=["rev"])
    # Closed form: d/dp = 2 (p - a) / K and d/dn = -2 (n - a) / K where the hinge is active.
    gp, gn = jax.grad(lambda p, n: losses.attention_triplet_loss(a, p, n, margin).sum(),
                      argnums=(0, 1))(p, n)
    active = (hinge > 0).astype(np.float64)[:, None, None]
    np.testing.assert_allclose(gp, active * 2 * (p - a) / 12, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gn, -active * 2 * (n - a) / 12, rtol=1e-12, atol=1e-15)


def test_vmap_over_margins_equals_separate_calls_and_traces_once():
  rng = np.random.default_rng(3)
  a, p, n = (rng.uniform(size=(6, 3, 3)).astype(np.float32) for _ in range(3))
  margins = jnp.array([0.5, 1.0, 1.5, 2.0, 2.5], jnp.float32)
  traces = []

  def mean_loss(margin):
    traces.append(1)
    return jnp.mean(losses.attention_triplet_loss(a, p, n, margin))

  swept = jax.jit(jax.vmap(mean_loss))(margins)
  assert len(traces) == 1
  separate = [float(jnp.mean(losses.attention_triplet_loss(a, p, n, m))) for m in margins]
  np.testing.assert_allclose(swept, separate, **TOL)
  assert len(set(np.round(np.asarray(swept), 6))) == 5  # the margins matter


def test_hard_negative_classes_hand_worked():
  logits = np.array([[3.0, 2.0, 1.0, 0.0],    # agrees with label 0: negative 1 either way
                     [3.0, 2.0, 1.0, 0.0],    # label 1 = its second class: "second" gives 1
                     [0.0, 1.0, 5.0, 4.0]],   # label 0, student says 2: 2 vs second 3
                    np.float32)
  labels = np.array([0, 1, 0], np.int32)
  np.testing.assert_array_equal(losses.hard_negative_classes(logits, labels), [1, 0, 2])
  np.testing.assert_array_equal(losses.hard_negative_classes(logits, labels, "second"),
                                [1, 1, 3])


# Teacher and student with Grad-CAM maps of different sizes (6x6 and 3x3 on 12x12 images).
IMAGE = (4, 12, 12, 3)
NUM_CLASSES = 5


@functools.cache
def zoo_pair():
  teacher = get_model("small_cnn_tiny", num_classes=NUM_CLASSES)
  student = get_model("densenet_tiny", num_classes=NUM_CLASSES)
  x = jnp.asarray(np.random.default_rng(7).normal(size=IMAGE), jnp.float32)
  return teacher, random_variables(teacher, x, 8), student, random_variables(student, x, 9), x


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames=("attention", "negative"))
def jit_envise(student, student_vars, teacher, teacher_vars, x, margin, lambda_d=1.0,
               lambda_at=0.2, attention="triplet", negative="incorrect", student_logits=None,
               temperature=None):
  return losses.envise_loss(student, student_vars, teacher, teacher_vars, x, margin=margin,
                            lambda_d=lambda_d, lambda_at=lambda_at, attention=attention,
                            negative=negative, student_logits=student_logits,
                            temperature=temperature)


@pytest.mark.parametrize("negative", ["incorrect", "second"])
def test_envise_loss_wiring(negative):
  teacher, t_vars, student, s_vars, x = zoo_pair()
  loss, aux = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, negative=negative)
  t_logits = np.asarray(jax.jit(inference_apply(teacher))(t_vars, x), np.float64)
  s_logits = np.asarray(jax.jit(inference_apply(student))(s_vars, x), np.float64)
  labels = t_logits.argmax(1)
  order = np.argsort(-s_logits, axis=1)
  if negative == "second":
    negatives = order[:, 1]
  else:
    negatives = np.array([next(c for c in row if c != lab) for row, lab in zip(order, labels)])
  assert (s_logits.argmax(1) != labels).any()  # the case where the two readings can differ
  np.testing.assert_array_equal(aux["teacher_labels"], labels)
  np.testing.assert_array_equal(aux["negative_classes"], negatives)

  size = (6, 6)  # the teacher's finer grid

  @jax.jit
  def reference_maps(labels, negatives):
    return (gradcam.grad_cam(teacher, t_vars, x, labels, size=size),
            gradcam.grad_cam(student, s_vars, x, labels, size=size),
            gradcam.grad_cam(student, s_vars, x, negatives, size=size))

  anchor, pos, neg = reference_maps(labels.astype(np.int32), negatives.astype(np.int32))
  for name, want in (("anchor", anchor), ("positive", pos), ("negative", neg)):
    assert aux[name].shape == (IMAGE[0],) + size
    np.testing.assert_allclose(aux[name], want, rtol=1e-4, atol=1e-5)
  a, p, n = (np.asarray(m, np.float64) for m in (anchor, pos, neg))
  d_p, d_n = np.sum((a - p) ** 2, (1, 2)), np.sum((a - n) ** 2, (1, 2))
  assert (d_p <= 4 + 1e-5).all() and (d_n <= 4 + 1e-5).all()
  l_at = np.maximum(d_p - d_n + 1.5, 0) / 36
  l_d = -(s_logits[np.arange(len(labels)), labels]
          - np.log(np.exp(s_logits).sum(1)))
  np.testing.assert_allclose(aux["attention"], l_at, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["distillation"], l_d, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, l_d + 0.2 * l_at, rtol=1e-4, atol=1e-5)


def test_envise_loss_options():
  teacher, t_vars, student, s_vars, x = zoo_pair()
  full, aux = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, 0.5, 3.0)
  np.testing.assert_allclose(full, 0.5 * aux["distillation"] + 3.0 * aux["attention"], **TOL)
  l2, aux_l2 = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, attention="l2")
  np.testing.assert_allclose(aux_l2["attention"], aux["d_pos"] / 36, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(l2, aux["distillation"] + 0.2 * aux["d_pos"] / 36, rtol=1e-4,
                             atol=1e-6)
  none, aux_none = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, attention="none")
  np.testing.assert_allclose(none, aux["distillation"], **TOL)
  np.testing.assert_array_equal(aux_none["attention"], 0.0)
  assert "anchor" not in aux_none
  # Training-mode logits supplied by the caller drive L_d and the hard negative.
  other = jnp.asarray(np.random.default_rng(11).normal(size=(IMAGE[0], NUM_CLASSES)),
                      jnp.float32)
  _, aux_other = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, student_logits=other)
  np.testing.assert_allclose(aux_other["distillation"],
                             losses.distillation_loss(other, aux["teacher_logits"]), **TOL)
  np.testing.assert_array_equal(
      aux_other["negative_classes"],
      losses.hard_negative_classes(other, aux["teacher_labels"]))
  _, aux_soft = jit_envise(student, s_vars, teacher, t_vars, x, 1.5, temperature=2.0)
  np.testing.assert_allclose(
      aux_soft["distillation"],
      losses.soft_distillation_loss(aux["student_logits"], aux["teacher_logits"], 2.0), **TOL)


def test_envise_margin_sweep_is_one_vmapped_program():
  """The Table 3 ablation: gradients for five margins from one traced, vmapped program."""
  teacher, t_vars, student, s_vars, x = zoo_pair()
  margins = jnp.array([0.5, 1.0, 1.5, 2.0, 2.5], jnp.float32)
  traces = []

  def grads(params, margin):
    traces.append(1)

    def mean_loss(params):
      loss, _ = losses.envise_loss(student, {**s_vars, "params": params}, teacher, t_vars, x,
                                   margin=margin)
      return jnp.mean(loss)

    return jax.value_and_grad(mean_loss)(params)

  swept_loss, swept_grad = jax.jit(jax.vmap(grads, in_axes=(None, 0)))(s_vars["params"], margins)
  assert len(traces) == 1
  single = jax.jit(grads)
  for i, m in enumerate(margins):
    loss, grad = single(s_vars["params"], m)
    np.testing.assert_allclose(swept_loss[i], loss, rtol=1e-5, atol=1e-6)
    for g_swept, g in zip(jax.tree.leaves(swept_grad), jax.tree.leaves(grad)):
      np.testing.assert_allclose(g_swept[i], g, rtol=1e-4, atol=1e-5)


def test_envise_loss_gradient_matches_finite_differences():
  """d L_f / d student params in float64: the attention term is second order."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(3, 7, 6, 2)))
    teacher, student = TinyNet("flatten"), TinyNet("mean")
    t_vars = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), random_variables(teacher, x, 13))
    s_vars = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), random_variables(student, x, 9))

    @functools.partial(jax.jit, static_argnames="attention")
    def f(params, attention="triplet"):
      loss, aux = losses.envise_loss(student, {"params": params}, teacher, t_vars, x, margin=2.0,
                                     attention=attention)
      return jnp.mean(loss), aux

    _, aux = f(s_vars["params"])
    hinge = aux["d_pos"] - aux["d_neg"] + 2.0
    assert (np.abs(hinge) > 1e-2).all() and (hinge > 0).any()
    check_grads(lambda p: f(p)[0], (s_vars["params"],), order=1, modes=["rev"], eps=1e-6)
    # The attention term changes the gradient (it is not dropped by a stop_gradient).
    g = jax.grad(lambda p: f(p)[0])(s_vars["params"])
    g_none = jax.grad(lambda p: f(p, "none")[0])(s_vars["params"])
    diff = jax.tree.map(lambda u, v: np.abs(np.asarray(u - v)).max(), g, g_none)
    assert diff["conv2"]["kernel"] > 1e-6


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="same shape"):
    losses.distillation_loss(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="common size"):
    losses.attention_triplet_loss(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match="negative must be"):
    losses.hard_negative_classes(np.zeros((2, 3)), np.zeros(2, np.int32), "third")
  teacher, t_vars, student, s_vars, x = zoo_pair()
  with pytest.raises(ValueError, match="attention must be"):
    losses.envise_loss(student, s_vars, teacher, t_vars, x, attention="cosine")
  small = get_model("small_cnn_tiny", num_classes=3)
  with pytest.raises(ValueError, match="differ in shape"):
    losses.envise_loss(small, random_variables(small, x, 0), teacher, t_vars, x,
                       attention="none")
