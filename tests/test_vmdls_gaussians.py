"""Class-conditional Gaussians (VMDLS Sec. 3.1-3.2) against numpy float64 and scipy references.

References are computed from the raw features with np.mean / np.cov (two-pass, float64) and
scipy.stats.multivariate_normal, never from the statistics under test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from oodjax.vmdls import gaussians as vg


def _labelled_features(rng, counts, dim, offset=0.0, spread=1.0):
  """float32 features [N, F] with a different mean and anisotropic covariance per class."""
  xs, ys = [], []
  for c, n in enumerate(counts):
    mixing = rng.normal(size=(dim, dim)) * spread / np.sqrt(dim)  # a random full covariance
    mean = offset + 3.0 * rng.normal(size=dim)
    xs.append(mean + rng.normal(size=(n, dim)) @ mixing)
    ys.append(np.full(n, c))
  order = rng.permutation(sum(counts))  # interleave the classes across batches
  return np.concatenate(xs)[order].astype(np.float32), np.concatenate(ys)[order]


def _accumulate_in_batches(x, y, num_classes, sizes):
  sums = vg.empty_sums(num_classes, x.shape[1])
  start = 0
  for size in sizes:
    sums = vg.accumulate(sums, x[start:start + size], y[start:start + size])
    start += size
  assert start == len(x)
  return sums


def _reference_moments(x, y, c):
  """float64 mean [F] and ML covariance [F, F] of class c, two-pass."""
  x_c = x[y == c].astype(np.float64)
  return x_c.mean(axis=0), np.atleast_2d(np.cov(x_c, rowvar=False, bias=True))


def test_accumulate_in_batches_matches_numpy():
  rng = np.random.default_rng(0)
  x, y = _labelled_features(rng, [90, 60, 53], dim=5)
  sizes = [1, 17, 50, 100, 35]  # a one-example batch, and batches lacking some classes
  y[:18] = 0  # the first two batches hold class 0 only
  in_batches = _accumulate_in_batches(x, y, 3, sizes)
  at_once = vg.accumulate(vg.empty_sums(3, 5), x, y)
  backwards = _accumulate_in_batches(x[::-1], y[::-1], 3, sizes[::-1])
  halves = vg.merge_sums(vg.accumulate(vg.empty_sums(3, 5), x[100:], y[100:]),
                         vg.accumulate(vg.empty_sums(3, 5), x[:100], y[:100]))
  for sums in (in_batches, at_once, backwards, halves):
    np.testing.assert_array_equal(sums.count, np.bincount(y, minlength=3))
    assert sums.mean.dtype == np.float64 and sums.scatter.dtype == np.float64
    for c in range(3):
      mean, cov = _reference_moments(x, y, c)
      np.testing.assert_allclose(sums.mean[c], mean, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(sums.scatter[c] / sums.count[c], cov, rtol=1e-11, atol=1e-12)


def test_accumulate_is_pure_and_takes_jax_arrays():
  rng = np.random.default_rng(1)
  x, y = _labelled_features(rng, [10, 12], dim=3)
  sums = vg.accumulate(vg.empty_sums(2, 3), x[:11], y[:11])
  copies = [a.copy() for a in sums]
  from_jax = vg.accumulate(sums, jnp.asarray(x[11:]), jnp.asarray(y[11:]))
  from_numpy = vg.accumulate(sums, x[11:], y[11:])
  for before, after in zip(copies, sums):
    np.testing.assert_array_equal(before, after)
  for a, b in zip(from_jax, from_numpy):
    np.testing.assert_array_equal(a, b)


def test_large_offset_keeps_covariance_accurate():
  """Features 1e6 + N(0, 1) in float32: the centred sums still give the covariance to ~1e-12.

  The raw-sum formula sum t t^T / n - m m^T, even in float64, is off by ~2e-4 here, so this
  test tells the two apart.
  """
  rng = np.random.default_rng(2)
  x, y = _labelled_features(rng, [300, 212], dim=4, offset=1e6)
  sizes = [64] * 8
  sums = _accumulate_in_batches(x, y, 2, sizes)
  worst_naive = 0.0
  for c in range(2):
    mean, cov = _reference_moments(x, y, c)
    np.testing.assert_allclose(sums.mean[c], mean, rtol=1e-14)
    np.testing.assert_allclose(sums.scatter[c] / sums.count[c], cov, rtol=1e-9, atol=1e-9)
    # The raw-sum formula, batch by batch in float64.
    x_c = x[y == c].astype(np.float64)
    raw_outer = sum(b.T @ b for b in np.array_split(x_c, 8))
    naive = raw_outer / len(x_c) - np.outer(mean, mean)
    worst_naive = max(worst_naive, np.abs(naive - cov).max())
  assert worst_naive > 1e-5  # so the tolerance above is a real test


def _reference_covariance(x, y, c, ridge):
  """ML covariance of class c plus ridge * (average variance) I, from the raw features."""
  mean, cov = _reference_moments(x, y, c)
  return mean, cov + ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


def test_log_likelihoods_match_scipy():
  rng = np.random.default_rng(3)
  x, y = _labelled_features(rng, [200, 150, 120], dim=6)
  sums = _accumulate_in_batches(x, y, 3, [100, 100, 100, 100, 70])
  ridge = 1e-3  # large enough for its effect on the log-likelihoods to be visible
  fitted = vg.fit_class_gaussians(sums, ridge=ridge)
  assert all(a.dtype == jnp.float32 for a in (fitted.means, fitted.whitening, fitted.log_det))
  # Test points: some of each class, and some far away (OOD).
  test = np.concatenate([x[:40], 10.0 * rng.normal(size=(20, 6))]).astype(np.float32)
  want = np.empty((len(test), 3))
  for c in range(3):
    mean, cov = _reference_covariance(x, y, c, ridge)
    want[:, c] = stats.multivariate_normal(mean, cov).logpdf(test.astype(np.float64))
    np.testing.assert_allclose(float(fitted.ridge[c]),
                               ridge * np.trace(_reference_moments(x, y, c)[1]) / 6, rtol=1e-6)
    np.testing.assert_allclose(float(fitted.log_det[c]), np.linalg.slogdet(cov)[1], rtol=1e-5,
                               atol=1e-5)
  got = jax.jit(vg.log_likelihoods)(fitted, test)
  assert got.shape == (60, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(vg.log_likelihoods(fitted, test), got, rtol=1e-6, atol=1e-4)
  best, c_max = vg.best_class(got)
  np.testing.assert_allclose(best, want.max(axis=1), rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(c_max, want.argmax(axis=1))
  assert c_max.dtype == jnp.int32
  # The ID points are mostly classified as their own class (the classes are well separated).
  assert np.mean(np.asarray(c_max[:40]) == y[:40]) > 0.9


def test_small_classes_give_finite_positive_definite_gaussians():
  """Classes of 60, 1 and 4 examples in F = 10: all PD, finite; the 1-example class falls back
  to the pooled average variance."""
  rng = np.random.default_rng(4)
  dim, ridge = 10, 1e-6
  x, y = _labelled_features(rng, [60, 1, 4], dim=dim)
  sums = _accumulate_in_batches(x, y, 3, [30, 35])
  fitted = vg.fit_class_gaussians(sums, ridge=ridge)
  chol = np.linalg.inv(np.asarray(fitted.whitening, np.float64))
  covs = chol @ np.swapaxes(chol, 1, 2)
  assert np.isfinite(chol).all() and np.isfinite(np.asarray(fitted.log_det)).all()
  assert (np.diagonal(chol, axis1=1, axis2=2) > 0).all()
  assert (np.linalg.eigvalsh(covs) > 0).all()
  # W = L^{-1} is lower triangular, exactly (its inverse only up to rounding).
  np.testing.assert_array_equal(np.triu(np.asarray(fitted.whitening), 1), 0.0)
  # Pooled within-class average variance: squared deviations from each class mean over F N.
  pooled = sum(((x[y == c] - x[y == c].astype(np.float64).mean(0)) ** 2).sum()
               for c in range(3)) / (dim * len(x))
  np.testing.assert_allclose(covs[1], ridge * pooled * np.eye(dim), rtol=1e-5)
  np.testing.assert_allclose(float(fitted.ridge[1]), ridge * pooled, rtol=1e-6)
  np.testing.assert_allclose(fitted.means[1], x[y == 1][0], rtol=1e-7)
  for c in (0, 2):
    _, cov = _reference_covariance(x, y, c, ridge)
    np.testing.assert_allclose(covs[c], cov, rtol=1e-4, atol=1e-6 * np.abs(cov).max())
  test = np.concatenate([x, 20.0 * rng.normal(size=(5, dim)).astype(np.float32)])
  loglik = np.asarray(vg.log_likelihoods(fitted, test))
  assert np.isfinite(loglik).all()
  # The lone example is the mode of its (narrow) Gaussian: l_1 = -1/2 log|Sigma_1| - F/2 log 2 pi.
  lone = np.flatnonzero(y == 1)[0]
  np.testing.assert_allclose(loglik[lone, 1], -0.5 * dim * np.log(2 * np.pi * ridge * pooled),
                             rtol=1e-5)
  # Against scipy for the rank-deficient 4-example class (condition number ~1e6: looser).
  mean, cov = _reference_covariance(x, y, 2, ridge)
  want = stats.multivariate_normal(mean, cov).logpdf(test[y.size - 10:y.size].astype(np.float64))
  np.testing.assert_allclose(loglik[y.size - 10:y.size, 2], want, rtol=1e-3)


def test_class_without_examples_is_an_error():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = np.where(np.arange(20) < 10, 0, 2)  # class 1 never seen
  sums = vg.accumulate(vg.empty_sums(3, 3), x, y)
  with pytest.raises(ValueError, match="class 1 has no examples"):
    vg.fit_class_gaussians(sums)


def test_ridge_grows_tenfold_until_cholesky_succeeds():
  # A hand-made indefinite "covariance" diag(1, -1e-3) of one example (ML covariance = scatter).
  # v = tr / F = 0.4995, delta = 1e-6 v = 4.995e-7; cov + delta I is PD once delta > 1e-3, which
  # takes four tenfold increases: delta = 4.995e-3.
  sums = vg.GaussianSums(np.array([1]), np.zeros((1, 2)), np.diag([1.0, -1e-3])[None])
  fitted = vg.fit_class_gaussians(sums, ridge=1e-6)
  np.testing.assert_allclose(float(fitted.ridge[0]), 4.995e-3, rtol=1e-6)
  chol = np.linalg.inv(np.asarray(fitted.whitening[0], np.float64))
  np.testing.assert_allclose(chol @ chol.T, np.diag([1.004995, 3.995e-3]), rtol=1e-6)
  np.testing.assert_allclose(float(fitted.log_det[0]), np.log(1.004995 * 3.995e-3), rtol=1e-6)
  hopeless = vg.GaussianSums(np.array([1]), np.zeros((1, 2)), np.diag([1.0, -1e10])[None])
  with pytest.raises(np.linalg.LinAlgError, match="class 0"):
    vg.fit_class_gaussians(hopeless)


def test_input_validation():
  sums = vg.empty_sums(2, 3)
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"\[B, 3\]"):
    vg.accumulate(sums, np.zeros((4, 2), np.float32), np.zeros(4, int))
  with pytest.raises(ValueError, match="lie in"):
    vg.accumulate(sums, x, np.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match="integers"):
    vg.accumulate(sums, x, np.zeros(4))
  with pytest.raises(ValueError, match="NaN"):
    vg.accumulate(sums, np.where(np.eye(4, 3) > 0, np.nan, 0.0), np.zeros(4, int))
  with pytest.raises(ValueError, match="ridge"):
    vg.fit_class_gaussians(vg.accumulate(sums, x, np.array([0, 1, 0, 1])), ridge=0.0)
  fitted = vg.fit_class_gaussians(vg.accumulate(sums, np.eye(4, 3), np.array([0, 1, 0, 1])))
  with pytest.raises(ValueError, match=r"\[B, 3\]"):
    vg.log_likelihoods(fitted, np.zeros((2, 4), np.float32))
