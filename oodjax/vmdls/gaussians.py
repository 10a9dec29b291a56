"""Class-conditional Gaussians over feature ensembles: VMDLS's decision statistics (Sec. 3.1-3.2).

After training, the feature ensemble t(x) [F] of every training image (Eq. 8: pooled block
outputs, g(x) and mu(g(x)), concatenated) is collected in one pass without augmentation, and a
full-covariance ("anisotropic") Gaussian N(m_c, Sigma_c) is fitted to the ensembles of each class c.
A test ensemble t then gets the log-likelihoods l_c = log N(t; m_c, Sigma_c), l = max_c l_c and
c_max = argmax_c l_c (Sec. 3.2). VMDLS_b's OOD score is -l (higher = more OOD, the library's
convention); the open-set prediction is c_max when the input is accepted and "unknown" otherwise
(`oodjax.metrics.open_set_predictions`).

    sums = empty_sums(num_classes, dim)
    for features, labels in batches:           # features [B, F], labels [B]
      sums = accumulate(sums, features, labels)
    gaussians = fit_class_gaussians(sums)      # a pytree of float32 arrays: the fitted state
    l, c_max = best_class(log_likelihoods(gaussians, test_features))
    score = -l                                 # [B]

The statistics are gathered on the host in float64 and the Gaussians are factored there; only the
finished means and whitening matrices (inverse Cholesky factors, inverted in float64) go to the
device, in float32, where the log-likelihoods are one batched matmul (jittable).

References:
  Dinari & Freifeld 2022, VMDLS, Sec. 3.1 ("Learning C anisotropic Gaussians over deep feature
  ensembles", Eq. 8), Sec. 3.2 (l, c_max, the thresholded decision rule).
  Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples and
  adversarial attacks" (Mahalanobis): the class-conditional Gaussians over feature ensembles.
  Chan, Golub, LeVeque 1979/1983: the pairwise update of means and scatter matrices.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

# Average variances at or below this are treated as zero (a class whose features are all equal,
# e.g. a single example). Large enough that ridge * _MIN_SCALE keeps float32 Cholesky entries and
# Mahalanobis terms finite for features of order 1.
_MIN_SCALE = 1e-12
# Ridge increases (x10 each) tried before giving up on a class's Cholesky factorisation.
_MAX_RIDGE_INCREASES = 12


class GaussianSums(NamedTuple):
  """Per-class running statistics of the feature ensembles, float64 on the host.

  The statistics are held as counts, means and CENTRED scatter matrices, merged batch by batch
  with Chan et al.'s pairwise update (`merge_sums`), instead of raw sums of t and t t^T. The raw
  form needs Sigma = sum t t^T / n - m m^T, which cancels catastrophically when the features
  have a large common offset: with |m| = 1e6 and unit variance, float64 loses ~1e-4 of the
  variance and float32 (as in the authors' released code) loses all of it. In the centred form
  every term added to `scatter` is a scatter of deviations from a mean, so nothing large is ever
  subtracted, the result is positive semi-definite by construction, and no reference point
  (such as a first batch's mean, which may lack some classes) has to be chosen.

  Attributes:
    count: [C] int64, examples seen per class.
    mean: [C, F] float64, per-class mean of the features (0 for a class not yet seen).
    scatter: [C, F, F] float64, per-class sum over examples of (t - m_c)(t - m_c)^T.
  """
  count: np.ndarray
  mean: np.ndarray
  scatter: np.ndarray


@flax.struct.dataclass
class ClassGaussians:
  """One Gaussian N(m_c, Sigma_c) per class: the fitted state of VMDLS_b.

  Attributes:
    means: [C, F] float32, m_c.
    whitening: [C, F, F] float32, W_c = L_c^{-1}, the inverse of the lower-triangular Cholesky
      factor L_c of Sigma_c = L_c L_c^T (so Sigma_c^{-1} = W_c^T W_c), inverted on the host
      in float64. The log-likelihoods are then one batched matmul: no LAPACK custom call on the
      device (two concurrent triangular-solve custom calls, VMDLS_b and VMDLS scored in one
      program, deadlocked XLA:CPU in jaxlib 0.10.2), and a matmul is the fastest op anywhere.
    log_det: [C] float32, log |Sigma_c| (computed in float64 from the float64 factor).
    ridge: [C] float32, delta_c, the multiple of the identity that was added to the empirical
      covariance (a diagnostic: it tells how far Sigma_c was regularised).
  """
  means: jax.Array
  whitening: jax.Array
  log_det: jax.Array
  ridge: jax.Array


def empty_sums(num_classes: int, dim: int) -> GaussianSums:
  """Statistics of zero examples, the start of `accumulate`.

  Args:
    num_classes: C, the number of in-distribution classes.
    dim: F, the length of a feature ensemble.

  Returns:
    `GaussianSums` with count [C], mean [C, F] and scatter [C, F, F], all zero.
  """
  if num_classes < 1 or dim < 1:
    raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}.")
  return GaussianSums(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)),
                      np.zeros((num_classes, dim, dim)))


def merge_sums(a: GaussianSums, b: GaussianSums) -> GaussianSums:
  """The statistics of the union of two disjoint sets of examples (Chan et al.'s update).

  With n = n_a + n_b and d = m_b - m_a, per class:
    m = m_a + d n_b / n,    S = S_a + S_b + d d^T n_a n_b / n.
  Exact in real arithmetic and order-independent; a class absent from one side keeps the other
  side's statistics unchanged. Useful to combine per-host or per-shard statistics too.

  Args:
    a, b: `GaussianSums` of the same C and F.

  Returns:
    A new `GaussianSums`; the inputs are not modified.
  """
  if a.mean.shape != b.mean.shape:
    raise ValueError(f"cannot merge statistics of shapes {a.mean.shape} and {b.mean.shape}.")
  n_a, n_b = a.count.astype(np.float64), b.count.astype(np.float64)  # [C]
  n = np.maximum(n_a + n_b, 1.0)  # a class absent from both keeps mean 0: avoid 0 / 0
  delta = b.mean - a.mean  # [C, F]
  mean = a.mean + delta * (n_b / n)[:, None]
  cross = (n_a * n_b / n)[:, None, None] * delta[:, :, None] * delta[:, None, :]  # [C, F, F]
  return GaussianSums(a.count + b.count, mean, a.scatter + b.scatter + cross)


def batch_sums(features, labels, num_classes: int) -> GaussianSums:
  """The statistics of one batch, each class centred on its own batch mean (two passes).

  Args:
    features: [B, F] float array (host numpy or jax), the feature ensembles t(x) of Eq. 8.
    labels: [B] int array, classes in [0, num_classes).
    num_classes: C.

  Returns:
    `GaussianSums` of the batch, float64.

  Raises:
    ValueError: bad shapes, non-integer or out-of-range labels, or non-finite features (a NaN
      would silently poison a class's statistics).
  """
  features = np.asarray(features)
  labels = np.asarray(labels)
  if features.ndim != 2:
    raise ValueError(f"features must be [B, F], got shape {features.shape}.")
  if labels.shape != features.shape[:1]:
    raise ValueError(f"labels must be [B] = {features.shape[:1]}, got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                     f"[{labels.min()}, {labels.max()}].")
  x = features.astype(np.float64)  # [B, F]
  if not np.isfinite(x).all():
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    raise ValueError(f"features contain NaN or inf in rows {bad[:10]}.")
  dim = x.shape[1]
  count = np.bincount(labels.astype(np.int64), minlength=num_classes)  # [C]
  mean = np.zeros((num_classes, dim))
  scatter = np.zeros((num_classes, dim, dim))
  for c in np.flatnonzero(count):  # a host loop over the classes in the batch: one BLAS call each
    x_c = x[labels == c]  # [n_c, F]
    mean[c] = x_c.mean(axis=0)
    centred = x_c - mean[c]
    scatter[c] = centred.T @ centred
  return GaussianSums(count.astype(np.int64), mean, scatter)


def accumulate(sums: GaussianSums, features, labels) -> GaussianSums:
  """Adds a batch of labelled feature ensembles to the running statistics.

  Call it once per batch in one pass over the training set (or a held-out ID set); the result
  does not depend on how the examples are split into batches, up to float64 rounding.

  Args:
    sums: `GaussianSums` so far (start from `empty_sums`).
    features: [B, F] float32 (host numpy or jax array), feature ensembles of the batch.
    labels: [B] int, their classes in [0, C).

  Returns:
    The updated `GaussianSums` (new arrays; `sums` is not modified).
  """
  num_classes, dim = sums.mean.shape
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[1] != dim:
    raise ValueError(f"features must be [B, {dim}], got shape {features.shape}.")
  return merge_sums(sums, batch_sums(features, labels, num_classes))


def _cholesky_with_ridge(cov: np.ndarray, ridge: float, label: int) -> tuple[np.ndarray, float]:
  """(L, delta): the float64 Cholesky factor of cov + delta I, delta = ridge x 10^k, smallest k."""
  eye = np.eye(cov.shape[0])
  for _ in range(_MAX_RIDGE_INCREASES + 1):
    try:
      return np.linalg.cholesky(cov + ridge * eye), ridge
    except np.linalg.LinAlgError:
      ridge *= 10.0
  raise np.linalg.LinAlgError(
      f"class {label}: covariance + delta I is not positive definite even with delta = "
      f"{ridge / 10.0:.3g}; are the statistics corrupt?")


def fit_class_gaussians(sums: GaussianSums, *, ridge: float = 1e-6) -> ClassGaussians:
  """Fits N(m_c, Sigma_c) to each class's feature ensembles (Sec. 3.1, after Eq. 8).

  Sigma_c is the maximum-likelihood covariance S_c = scatter_c / n_c (the paper does not say which;
  this is what the authors' released code and Lee et al.'s Mahalanobis detector use, and it is
  defined for a single example) plus a ridge delta_c I:

    delta_c = ridge * v_c,    v_c = tr(S_c) / F   (the class's average variance).

  A class with fewer examples than F has a singular S_c; the ridge makes it positive definite,
  giving the directions its examples do not span a variance of ridge * v_c. When v_c is zero
  (one example, or identical examples) the class has no scale of its own and v_c falls back to
  the POOLED within-class average variance, sum_c tr(scatter_c) / (F * sum_c n_c) (or 1e-12 if
  that is zero too): such a class becomes a narrow isotropic Gaussian around its example(s), so
  it is finite and usable but accepts little beyond them.

  If the float64 Cholesky factorisation still fails, delta_c is multiplied by 10 and tried again
  (at most 12 times). The authors' released code does the same in spirit: it adds 1e-6 k I with
  k = 1, 2, ... until a Cholesky factorisation succeeds, with an ABSOLUTE 1e-6 (ours is relative
  to each class's scale, so it does not depend on the units of the features) and then applies
  the largest k (+2) to every class. Because `accumulate` keeps centred scatters, S_c is positive
  semi-definite and the first try almost always succeeds.

  Args:
    sums: `GaussianSums` from `accumulate`, every class with at least one example.
    ridge: relative ridge, > 0.

  Returns:
    `ClassGaussians` of float32 arrays: means [C, F], whitening [C, F, F], log_det [C],
    ridge [C] (the delta_c used).

  Raises:
    ValueError: a class has no examples, the statistics are not finite, or ridge <= 0.
    numpy.linalg.LinAlgError: a factorisation failed even after 12 ridge increases.
  """
  if not ridge > 0:
    raise ValueError(f"ridge must be > 0, got {ridge}.")
  count = np.asarray(sums.count)
  mean = np.asarray(sums.mean, np.float64)
  scatter = np.asarray(sums.scatter, np.float64)
  num_classes, dim = mean.shape
  if count.shape != (num_classes,) or scatter.shape != (num_classes, dim, dim):
    raise ValueError(f"inconsistent shapes: count {count.shape}, mean {mean.shape}, "
                     f"scatter {scatter.shape}.")
  empty = np.flatnonzero(count <= 0)
  if empty.size:
    raise ValueError(f"class {', '.join(map(str, empty))} has no examples: a Gaussian needs at "
                     "least one.")
  if not (np.isfinite(mean).all() and np.isfinite(scatter).all()):
    raise ValueError("the statistics contain NaN or inf.")
  n = count.astype(np.float64)  # [C]
  cov = scatter / n[:, None, None]  # [C, F, F], ML
  cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))  # exactly symmetric
  scale = np.trace(cov, axis1=1, axis2=2) / dim  # [C], v_c
  pooled = np.trace(scatter.sum(axis=0)) / (dim * n.sum())
  scale = np.where(scale > _MIN_SCALE, scale, max(pooled, _MIN_SCALE))
  chol = np.empty_like(cov)
  delta = np.empty(num_classes)
  for c in range(num_classes):
    chol[c], delta[c] = _cholesky_with_ridge(cov[c], ridge * scale[c], c)
  log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)  # [C]
  eye = np.eye(dim)
  whitening = np.stack([scipy.linalg.solve_triangular(chol[c], eye, lower=True)
                        for c in range(num_classes)])  # [C, F, F] L_c^{-1}, float64
  return ClassGaussians(means=jnp.asarray(mean, jnp.float32),
                        whitening=jnp.asarray(whitening, jnp.float32),
                        log_det=jnp.asarray(log_det, jnp.float32),
                        ridge=jnp.asarray(delta, jnp.float32))


def log_likelihoods(gaussians: ClassGaussians, features) -> jax.Array:
  """l_c = log N(t; m_c, Sigma_c) for every test ensemble t and class c (Sec. 3.2).

    l_c = -1/2 |L_c^{-1} (t - m_c)|^2 - 1/2 log|Sigma_c| - F/2 log(2 pi),

  with L_c^{-1} (t - m_c) = W_c (t - m_c), one batched matmul against the whitening matrices
  inverted once at fit time. Jittable; the [C, B, F] intermediate scales with the batch, so
  score large sets in batches.

  Args:
    gaussians: `ClassGaussians` from `fit_class_gaussians`.
    features: [B, F] float, feature ensembles of the test inputs (cast to float32).

  Returns:
    [B, C] float32 log-likelihoods.
  """
  features = jnp.asarray(features)
  num_classes, dim = gaussians.means.shape
  if features.ndim != 2 or features.shape[1] != dim:
    raise ValueError(f"features must be [B, {dim}], got shape {features.shape}.")
  features = features.astype(gaussians.means.dtype)
  diff = features[None, :, :] - gaussians.means[:, None, :]  # [C, B, F]
  white = jnp.einsum("cfg,cbg->cbf", gaussians.whitening, diff)  # [C, B, F]
  mahalanobis = jnp.sum(white * white, axis=-1)  # [C, B]
  log_norm = gaussians.log_det + float(dim * np.log(2.0 * np.pi))  # [C]
  return -0.5 * (mahalanobis + log_norm[:, None]).T  # [B, C]


def best_class(loglik: jax.Array) -> tuple[jax.Array, jax.Array]:
  """l = max_c l_c and c_max = argmax_c l_c (Sec. 3.2).

  Args:
    loglik: [B, C] log-likelihoods from `log_likelihoods`.

  Returns:
    (l [B] float32, c_max [B] int32); ties go to the lowest class index. VMDLS_b's OOD score is
    -l.
  """
  return jnp.max(loglik, axis=-1), jnp.argmax(loglik, axis=-1).astype(jnp.int32)
