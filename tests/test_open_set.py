"""Open-set predictions and macro-F1 against hand-worked numbers and scikit-learn."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from oodjax import metrics
from oodjax.vmdls import gaussians as vg


def sklearn_f1(labels, predictions, num_classes):
  return skm.f1_score(labels, predictions, labels=range(num_classes + 1), average="macro",
                      zero_division=0)


f1_jit = jax.jit(metrics.open_set_f1, static_argnames="num_classes")


@jax.jit
def vmdls_b(fitted, features):
  """(score = -l [B], c_max [B]): VMDLS_b's OOD score and closed-set class, in one compiled call."""
  loglik, c_max = vg.best_class(vg.log_likelihoods(fitted, features))
  return -loglik, c_max


@jax.jit
def open_set_f1_at(scores, classes, threshold, labels):
  predictions = metrics.open_set_predictions(scores, classes, threshold, 3)
  return predictions, metrics.open_set_f1(labels, predictions, 3)


def test_predictions_hand_worked():
  # Accept (keep the class) where score <= 0.5, the tie included; K = 3 is "unknown".
  scores = np.array([0.1, 0.5, 0.9, 0.5, -2.0], np.float32)
  classes = np.array([2, 0, 1, 1, 0])
  got = metrics.open_set_predictions(scores, classes, 0.5, 3)
  np.testing.assert_array_equal(got, [2, 0, 3, 1, 0])
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(metrics.open_set_predictions(scores, classes, -3.0, 3), [3] * 5)


def test_f1_hand_worked():
  # K = 2 (label 2 = unknown). labels [0, 0, 1, 2], predictions [0, 1, 1, 2]:
  #   label 0: TP 1, true 2, predicted 1 -> 2/3;  label 1: TP 1, true 1, predicted 2 -> 2/3;
  #   unknown: TP 1, true 1, predicted 1 -> 1.    Macro: (2/3 + 2/3 + 1) / 3 = 7/9.
  labels, predictions = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
  assert float(f1_jit(labels, predictions, num_classes=2)) == pytest.approx(7 / 9, abs=1e-7)
  # The same with K = 3 and the unknown label 3: label 2 is absent from both and counts as 0.
  labels, predictions = np.array([0, 0, 1, 3]), np.array([0, 1, 1, 3])
  assert float(f1_jit(labels, predictions, num_classes=3)) == pytest.approx(7 / 12, abs=1e-7)
  assert float(metrics.open_set_f1(labels, labels, 3)) == pytest.approx(3 / 4, abs=1e-7)  # eager


@pytest.mark.parametrize("num_classes", [1, 4, 10])
def test_f1_matches_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  n = 257
  for trial in range(4):
    labels = rng.integers(0, num_classes + 1, n)
    if trial == 1:  # some labels never occur in the truth
      labels = rng.choice(np.arange(0, num_classes + 1, 2), n)
    # Mostly right, some wrong; predictions from a subset in trial 2, so labels go missing there.
    guesses = rng.integers(0, num_classes + 1, n)
    if trial == 2:
      guesses = rng.choice(np.arange(1, num_classes + 1), n)
    predictions = np.where(rng.random(n) < 0.6, labels, guesses)
    if trial == 3:  # only two labels used at all: the others are absent from both sides
      labels = rng.choice([0, num_classes], n)
      predictions = rng.choice([0, num_classes], n)
    got = float(f1_jit(labels, predictions, num_classes=num_classes))
    np.testing.assert_allclose(got, sklearn_f1(labels, predictions, num_classes), atol=1e-6,
                               err_msg=f"trial {trial}")


def test_threshold_sweep_vmapped_matches_sklearn():
  rng = np.random.default_rng(7)
  num_classes, n = 5, 300
  labels = rng.integers(0, num_classes + 1, n)
  classes = np.where(rng.random(n) < 0.8, labels % num_classes, rng.integers(0, num_classes, n))
  scores = (rng.normal(size=n) + 2.0 * (labels == num_classes)).astype(np.float32)
  thresholds = np.array([-np.inf, -1.0, 0.0, 0.7, 1.5, 3.0, np.inf], np.float32)

  def f1_at(threshold):
    predictions = metrics.open_set_predictions(scores, classes, threshold, num_classes)
    return metrics.open_set_f1(labels, predictions, num_classes)

  got = jax.jit(jax.vmap(f1_at))(thresholds)
  want = [sklearn_f1(labels, np.where(scores <= t, classes, num_classes), num_classes)
          for t in thresholds]
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("decimals", [None, 1])  # continuous scores, and many ties
def test_threshold_at_95_accepts_95_percent_of_id(decimals):
  rng = np.random.default_rng(8)
  id_scores = rng.normal(size=1003)
  if decimals is not None:
    id_scores = np.round(id_scores, decimals)
  id_scores = id_scores.astype(np.float32)
  threshold = metrics.threshold_at_tpr(id_scores, 0.95)
  predictions = metrics.open_set_predictions(id_scores, np.zeros(1003, np.int32), threshold, 1)
  accepted = np.mean(np.asarray(predictions) == 0)
  assert accepted >= 0.95
  # ... and it is the smallest observed score that does so.
  below = id_scores[id_scores < float(threshold)]
  assert below.size == 0 or np.mean(id_scores <= below.max()) < 0.95


def test_vmdls_b_open_set_end_to_end():
  """Gaussians fitted on ID training features, lambda at 95% of the training set, F1 on a test
  set with OOD points, against sklearn on the same predictions."""
  rng = np.random.default_rng(9)
  num_classes, dim = 3, 4
  centres = 6.0 * np.eye(num_classes, dim)

  def draw(n):
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels

  x_train, y_train = draw(600)
  sums = vg.empty_sums(num_classes, dim)
  for start in range(0, 600, 128):
    sums = vg.accumulate(sums, x_train[start:start + 128], y_train[start:start + 128])
  fitted = vg.fit_class_gaussians(sums)
  train_scores, _ = vmdls_b(fitted, x_train)
  threshold = jax.jit(metrics.threshold_at_tpr)(train_scores, 0.95)
  assert np.mean(np.asarray(train_scores) <= float(threshold)) >= 0.95

  x_id, y_id = draw(200)
  x_ood = (rng.normal(size=(100, dim)) * 0.5 - 6.0).astype(np.float32)  # far from every class
  x_test = np.concatenate([x_id, x_ood])
  y_test = np.concatenate([y_id, np.full(100, num_classes)])
  test_scores, c_max = vmdls_b(fitted, x_test)
  predictions, f1 = open_set_f1_at(test_scores, c_max, threshold, y_test)
  f1 = float(f1)
  np.testing.assert_allclose(f1, sklearn_f1(y_test, np.asarray(predictions), num_classes),
                             atol=1e-6)
  assert f1 > 0.9  # separable classes, OOD far away: only ~5% of ID is rejected


def test_validation():
  with pytest.raises(ValueError, match="lie in"):
    metrics.open_set_f1(np.array([0, 1, 3]), np.array([0, 1, 2]), 2)
  with pytest.raises(ValueError, match="lie in"):
    metrics.open_set_f1(np.array([0, 1, 2]), np.array([0, -1, 2]), 2)
  with pytest.raises(ValueError, match="same shape"):
    metrics.open_set_f1(np.array([0, 1, 2]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="integers"):
    metrics.open_set_f1(np.array([0.0, 1.0]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="same shape"):
    metrics.open_set_predictions(np.zeros(3, np.float32), np.zeros(2, np.int32), 0.0, 2)
  with pytest.raises(ValueError, match="lie in"):  # a closed-set class cannot be "unknown"
    metrics.open_set_predictions(np.zeros(2, np.float32), np.array([0, 2]), 0.0, 2)
  with pytest.raises(ValueError, match="NaN"):
    metrics.open_set_predictions(np.array([0.0, np.nan], np.float32), np.zeros(2, np.int32),
                                 0.0, 2)
