"""Thresholds against hand-worked examples and brute force over every possible cut."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.detectors.sample_free import thresholds


def test_labels_hand_worked():
  # Reject s > t. Cut after 0.2: rejects ID 0.4 (1 error). Cut after 0.4: accepts OOD 0.3
  # (1 error). Equal errors: the lower cut wins, midway between 0.2 and 0.3.
  t = thresholds.threshold_from_labels([0.1, 0.2, 0.4], [0.3, 0.5, 0.6], balanced=False)
  np.testing.assert_allclose(t, 0.25, rtol=1e-6)
  # Perfectly separated: midway between the largest ID and the smallest OOD score.
  t = thresholds.threshold_from_labels([1.0, 2.0], [5.0, 7.0, 9.0])
  np.testing.assert_allclose(t, 3.5)
  # All OOD below all ID: rejecting everything (-inf) ties with accepting everything
  # (balanced error 0.5 each) and is the lower threshold.
  assert np.isneginf(thresholds.threshold_from_labels([5.0, 6.0], [1.0]))


def _errors(t, s_in, s_out, balanced):
  in_rej, out_acc = np.sum(s_in > t), np.sum(s_out <= t)
  if balanced:
    return 0.5 * (in_rej / len(s_in) + out_acc / len(s_out))
  return in_rej + out_acc


@pytest.mark.parametrize("balanced", [True, False])
def test_labels_brute_force(balanced):
  rng = np.random.default_rng(0)
  fn = jax.jit(thresholds.threshold_from_labels, static_argnames="balanced")
  for trial in range(5):
    s_in = np.round(rng.normal(0, 1, 15), 1)  # rounding makes ties between the sets
    s_out = np.round(rng.normal(1.2, 1, 6), 1)
    t = float(fn(s_in, s_out, balanced=balanced))
    every = np.unique(np.concatenate([s_in, s_out]))
    cuts = np.concatenate([[-np.inf], (every[:-1] + every[1:]) / 2, [every[-1] + 1]])
    best = min(_errors(c, s_in, s_out, balanced) for c in cuts)
    np.testing.assert_allclose(_errors(t, s_in, s_out, balanced), best, err_msg=str(trial))


def test_proportion_hand_worked():
  s = [3.0, 1.0, 4.0, 1.5, 9.0, 2.0, 6.0, 5.0, 8.0, 7.0]
  np.testing.assert_allclose(thresholds.threshold_from_proportion(s, 0.2), 7.5)  # rejects 8, 9
  np.testing.assert_allclose(thresholds.threshold_from_proportion(s, 0.0), 9.0)
  assert np.isneginf(thresholds.threshold_from_proportion(s, 1.0))
  # 0.26 * 10 = 2.6 rounds to 3 rejected.
  np.testing.assert_allclose(thresholds.threshold_from_proportion(s, 0.26), 6.5)


def test_proportion_rejects_the_expected_count_under_jit():
  rng = np.random.default_rng(1)
  s = rng.normal(size=200)
  fn = jax.jit(thresholds.threshold_from_proportion)
  for fraction in (0.05, 0.1, 0.37):
    t = fn(s, fraction)
    assert np.sum(s > float(t)) == round(fraction * 200)


def test_two_groups_hand_worked():
  np.testing.assert_allclose(thresholds.threshold_two_groups([10.0, 0.0, 11.0, 1.0, 2.0]), 6.0)
  # A cut between equal scores is not allowed: 1, 1 | 1, 5 would split a tie.
  np.testing.assert_allclose(thresholds.threshold_two_groups([1.0, 1.0, 1.0, 5.0]), 3.0)
  np.testing.assert_allclose(thresholds.threshold_two_groups([2.0, 2.0]), 2.0)


def _within_ss(s, i):
  left, right = s[:i], s[i:]
  return np.sum((left - left.mean()) ** 2) + np.sum((right - right.mean()) ** 2)


def test_two_groups_brute_force():
  rng = np.random.default_rng(2)
  fn = jax.jit(thresholds.threshold_two_groups)
  for trial in range(6):
    n_in, n_out = rng.integers(5, 80), rng.integers(2, 40)
    s = np.concatenate([rng.normal(0, 1, n_in), rng.normal(rng.uniform(0, 6), 1.5, n_out)])
    s = np.sort(s)
    t = float(fn(jnp.asarray(s, jnp.float32)))
    best = min(_within_ss(s, i) for i in range(1, len(s)))
    got = _within_ss(s, int(np.sum(s <= t)))
    # float32 prefix sums may pick a cut whose criterion ties the best to rounding.
    np.testing.assert_allclose(got, best, rtol=1e-5, err_msg=str(trial))
    assert s[0] <= t < s[-1]


def test_bad_shapes_raise():
  with pytest.raises(ValueError):
    thresholds.threshold_two_groups(jnp.zeros((2, 2)))
  with pytest.raises(ValueError):
    thresholds.threshold_from_labels([], [1.0])
