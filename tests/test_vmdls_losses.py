"""VMDLS losses (Eqs. 2-7) against float64 references written from the paper.

References: scipy (cdist, multivariate normal log-densities and entropy, numerical integration),
a plain Python triple loop over every (anchor, positive, negative), and numbers worked out by hand.

Tolerances: float32 results against float64 references use rtol = atol = 1e-5. The values are
O(1) means of at most a few hundred O(1) hinge terms, so float32 rounding (~6e-8 relative per
operation) stays below 1e-6; 1e-5 leaves a margin, while any wrong term, sign or denominator moves
the result by far more. Monte-Carlo comparisons use 5 standard errors of the estimate. Gradients
are checked in float64 (finite differences in float32 are too noisy to be a sharp test).

All tests share a few shapes and go through jitted wrappers so that each compiles once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import integrate, stats
from scipy.spatial import distance

from oodjax.vmdls import losses

B, D, C = 12, 3, 4  # batch, latent dimension, classes
TOL = dict(rtol=1e-5, atol=1e-5)


def make_batch(seed: int, *, b: int = B, dtype=np.float32):
  """Random (mu, sigma, eps, labels, class_means) with 4 classes among the labels."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(b, D))
  sigma = rng.uniform(0.1, 0.5, size=(b, D))
  eps = rng.normal(size=(b, D))
  labels = rng.permutation(np.arange(b) % C).astype(np.int32)
  means = rng.normal(size=(C, D))
  return (mu.astype(dtype), sigma.astype(dtype), eps.astype(dtype), labels,
          means.astype(dtype))


def np_metric(z, labels, mt, md, valid, reducer):
  """Per anchor: mean L_t, mean L_d, #triplets in the mean, has_triplet; a float64 triple loop."""
  z = np.asarray(z, np.float64)
  b = len(z)
  triplet, distancing, count = np.zeros(b), np.zeros(b), np.zeros(b)
  has = np.zeros(b, bool)
  for a in range(b):
    pairs = []
    for p in range(b):
      for n in range(b):
        if not (valid[a] and valid[p] and valid[n]):
          continue
        if p == a or labels[p] != labels[a] or labels[n] == labels[a]:
          continue
        d_ap = np.sum((z[a] - z[p]) ** 2)
        d_an = np.sum((z[a] - z[n]) ** 2)
        pairs.append((max(0.0, mt + d_ap - d_an), max(0.0, md - d_an)))
    has[a] = bool(pairs)
    if reducer == "nonzero":
      pairs = [pair for pair in pairs if pair[0] + pair[1] > 0]
    if pairs:
      triplet[a] = np.mean([pair[0] for pair in pairs])
      distancing[a] = np.mean([pair[1] for pair in pairs])
      count[a] = len(pairs)
  return triplet, distancing, count, has


def np_hinge_arguments(z, labels, mt, md, valid):
  """Every hinge argument (M_t + d_ap - d_an and M_d - d_an) over valid triplets, float64."""
  z = np.asarray(z, np.float64)
  d2 = distance.cdist(z, z, "sqeuclidean")
  args = []
  for a in np.flatnonzero(valid):
    for p in np.flatnonzero(valid):
      for n in np.flatnonzero(valid):
        if p != a and labels[p] == labels[a] and labels[n] != labels[a]:
          args += [mt + d2[a, p] - d2[a, n], md - d2[a, n]]
  return np.array(args)


def np_kl(mu, sigma, mean, s2):
  """D_KL(N(mu, diag sigma^2) || N(mean, s2 I)) per row, numerically: -H(q) - E_q[log p].

  H(q) is scipy's entropy; the cross term is integrated per dimension (q is a product of 1-D
  Gaussians, so E_q[log p] is a sum of 1-D integrals) with the trapezoid rule on scipy's log-pdf
  over mu +- 15 sigma, which is exponentially accurate for such smooth, fast-decaying integrands.
  """
  out = []
  for m_row, s_row, t_row in zip(np.asarray(mu, np.float64), np.asarray(sigma, np.float64),
                                 np.asarray(mean, np.float64)):
    entropy = stats.multivariate_normal(m_row, np.diag(s_row ** 2)).entropy()
    cross = 0.0
    for m, s, t in zip(m_row, s_row, t_row):
      x = np.linspace(m - 15 * s, m + 15 * s, 20001)
      cross += integrate.trapezoid(stats.norm.pdf(x, m, s) * stats.norm.logpdf(x, t, np.sqrt(s2)),
                                   x)
    out.append(-entropy - cross)
  return np.array(out)


def np_eq6(mu, sigma, mean, s2):
  """Eq. 6 as printed: sum_j -log(s / sigma_j) - (sigma_j^2 + (mu_j - m_j)^2) / (2 s^2) + 1/2."""
  mu, sigma, mean = (np.asarray(x, np.float64) for x in (mu, sigma, mean))
  s = np.sqrt(s2)
  return np.sum(-np.log(s / sigma) - (sigma ** 2 + (mu - mean) ** 2) / (2 * s ** 2) + 0.5, axis=1)


@functools.partial(jax.jit, static_argnames="reducer")
def jit_metric(z, labels, valid, mt, md, reducer):
  return losses.metric_loss(z, labels, triplet_margin=mt, distancing_margin=md, valid=valid,
                            reducer=reducer)


@functools.partial(jax.jit, static_argnames=("reducer", "normalize"))
def jit_vmdls(mu, sigma, eps, labels, means, valid, hp, reducer="all", normalize=False):
  """`hp`: dict of traced scalars (weights, margins, s2)."""
  return losses.vmdls_loss(mu, sigma, eps, labels, means, valid=valid, reducer=reducer,
                           normalize=normalize, **hp)


@functools.partial(jax.jit, static_argnames=("reducer", "normalize"))
def jit_vmdls_grad(mu, sigma, eps, labels, means, valid, hp, reducer="all", normalize=False):
  """((loss, terms), (d loss / d mu, d loss / d sigma))."""
  def loss_fn(m, s):
    return losses.vmdls_loss(m, s, eps, labels, means, valid=valid, reducer=reducer,
                             normalize=normalize, **hp)
  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(mu, sigma)


def hparams(kl=1.0, t=1.0, d=1.0, mt=0.1, md=1.0, s2=0.1, dtype=np.float32):
  values = dict(kl_weight=kl, triplet_weight=t, distancing_weight=d, triplet_margin=mt,
                distancing_margin=md, s2=s2)
  return {k: np.asarray(v, dtype) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------
# Elementwise pieces


def test_squared_distances_against_scipy_with_coincident_points():
  z = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
  z[5] = z[2]  # two coincident points
  got = np.asarray(jax.jit(losses.squared_distances)(z))
  np.testing.assert_allclose(got, distance.cdist(z.astype(np.float64), z.astype(np.float64),
                                                 "sqeuclidean"), **TOL)
  assert np.all(np.diag(got) == 0.0)
  assert got[2, 5] == 0.0 and got[5, 2] == 0.0
  assert np.all(got >= 0.0)
  # d/dz_i sum_{j,k} ||z_j - z_k||^2 = 4 sum_k (z_i - z_k), by hand; finite at coincident rows.
  grad = np.asarray(jax.grad(lambda x: losses.squared_distances(x).sum())(z))
  want = 4 * (B * z.astype(np.float64) - z.sum(0, dtype=np.float64))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-4)


def test_hinges_by_hand():
  got = losses.triplet_loss(jnp.array([0.3, 0.5, 0.25]), jnp.array([0.5, 0.3, 0.3]), 0.1)
  np.testing.assert_allclose(got, [0.0, 0.3, 0.05], atol=1e-6)
  np.testing.assert_allclose(losses.triplet_loss(jnp.array([1.0]), jnp.array([1.5]), 1.0), [0.5])
  np.testing.assert_allclose(losses.distancing_loss(jnp.array([0.5, 2.5, 3.0]), 2.0),
                             [1.5, 0.0, 0.0])
  # At the kink both hinges have slope 0 (relu's convention), not jnp.maximum's 0.5.
  assert jax.grad(losses.distancing_loss)(2.0, 2.0) == 0.0
  assert jax.grad(losses.triplet_loss)(0.5, 1.0, 0.5) == 0.0


def test_gaussian_kl_against_scipy_entropy_and_integration():
  rng = np.random.default_rng(1)
  mu = rng.normal(size=(5, D)).astype(np.float32)
  sigma = rng.uniform(0.05, 2.0, size=(5, D)).astype(np.float32)
  mean = rng.normal(size=(5, D)).astype(np.float32)
  for s2 in (0.1, 1.7):
    got = np.asarray(jax.jit(losses.gaussian_kl)(mu, sigma, mean, s2))
    np.testing.assert_allclose(got, np_kl(mu, sigma, mean, s2), **TOL)


def test_gaussian_kl_against_monte_carlo_log_densities():
  """E_q[log q(x) - log p(x)] from 200k float64 samples and scipy's multivariate log-pdfs."""
  rng = np.random.default_rng(2)
  mu = rng.normal(size=(3, D))
  sigma = rng.uniform(0.2, 0.6, size=(3, D))
  mean = mu + rng.normal(scale=0.5, size=(3, D))
  s2 = 0.1
  got = np.asarray(losses.gaussian_kl(mu.astype(np.float32), sigma.astype(np.float32),
                                      mean.astype(np.float32), s2))
  for i in range(3):
    x = mu[i] + sigma[i] * rng.normal(size=(200_000, D))
    log_ratio = (stats.multivariate_normal(mu[i], np.diag(sigma[i] ** 2)).logpdf(x)
                 - stats.multivariate_normal(mean[i], s2 * np.eye(D)).logpdf(x))
    stderr = log_ratio.std() / np.sqrt(len(x))
    assert abs(got[i] - log_ratio.mean()) < 5 * stderr + 1e-5 * got[i], (i, got[i], stderr)


def test_gaussian_kl_is_nonnegative_and_zero_when_q_is_p():
  rng = np.random.default_rng(3)
  n = 2000
  mean = rng.normal(size=(n, D)).astype(np.float32)
  s2 = 0.1
  # Scales from far below to far above s, and rows near q == p where cancellation is worst.
  sigma = np.exp(rng.uniform(-4, 2, size=(n, D))).astype(np.float32)
  sigma[:200] = np.sqrt(s2) * (1 + rng.normal(scale=1e-6, size=(200, D)))
  offset = rng.normal(scale=rng.choice([0.0, 1e-4, 1.0], size=(n, 1)), size=(n, D))
  mu = (mean + offset).astype(np.float32)
  kl_fn = jax.jit(losses.gaussian_kl)
  assert np.all(np.asarray(kl_fn(mu, sigma, mean, s2)) >= 0.0)
  # q == p: exactly 0 where s and sigma are exact, within rounding of sqrt(0.1) otherwise.
  assert np.all(np.asarray(kl_fn(mean, np.full_like(mean, 2.0), mean, 4.0)) == 0.0)
  near = kl_fn(mean, np.full_like(mean, np.sqrt(s2)), mean, s2)
  np.testing.assert_array_less(np.asarray(near), 1e-10)
  # ... and it is a minimum: the gradient vanishes there.
  grad = jax.jit(jax.grad(lambda m, s: losses.gaussian_kl(m, s, mean, 4.0).sum(),
                          argnums=(0, 1)))(mean, np.full_like(mean, 2.0))
  assert all(np.all(np.asarray(g) == 0.0) for g in grad)


def test_negated_gaussian_kl_is_eq6():
  rng = np.random.default_rng(4)
  mu, sigma, mean = (rng.normal(size=(6, D)), rng.uniform(0.05, 1.5, size=(6, D)),
                     rng.normal(size=(6, D)))
  s2 = 0.1
  eq6 = np_eq6(mu, sigma, mean, s2)
  got = -np.asarray(losses.gaussian_kl(*(x.astype(np.float32) for x in (mu, sigma, mean)), s2))
  np.testing.assert_allclose(got, eq6, **TOL)
  assert np.all(eq6 < 0)  # the paper's L_KL is <= 0: adding it to a minimised loss is the bug


# ---------------------------------------------------------------------------------------------
# metric_loss


@pytest.mark.parametrize("reducer", ["all", "nonzero"])
@pytest.mark.parametrize("padded", [False, True])
def test_metric_loss_matches_triple_loop(reducer, padded):
  rng = np.random.default_rng(5 + padded)
  z = rng.normal(scale=0.8, size=(B, D)).astype(np.float32)
  labels = rng.integers(0, 4, size=B).astype(np.int32)
  valid = np.ones(B, bool)
  if padded:
    valid[[1, 6, 11]] = False
    z[[1, 6, 11]] = np.nan  # garbage that would poison the value and gradient if it leaked
  mt, md = 0.1, 1.0
  per_anchor, has = jit_metric(z, labels, valid, np.float32(mt), np.float32(md), reducer)
  t, d, count, want_has = np_metric(z, labels, mt, md, valid, reducer)
  np.testing.assert_allclose(np.asarray(per_anchor), t + d, **TOL)
  np.testing.assert_array_equal(np.asarray(has), want_has)
  assert want_has.sum() >= B // 2
  # The data must exercise the reducers: some triplets are active, some are not.
  args = np_hinge_arguments(z, labels, mt, md, valid).reshape(-1, 2)
  active = (args > 0).any(axis=1)
  assert 0.1 < active.mean() < 0.9
  grad = jax.grad(lambda x: jit_metric(x, labels, valid, np.float32(mt), np.float32(md),
                                       reducer)[0].sum())(z)
  assert np.all(np.isfinite(np.asarray(grad)))
  if padded:
    assert np.all(np.asarray(grad)[~valid] == 0.0)


def test_metric_loss_valid_none_is_all_valid():
  z, _, _, labels, _ = make_batch(7)
  a = jax.jit(functools.partial(losses.metric_loss, distancing_margin=1.0))(z, labels)
  b = jit_metric(z, labels, np.ones(B, bool), np.float32(0.1), np.float32(1.0), "all")
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


@pytest.mark.parametrize("reducer", ["all", "nonzero"])
def test_metric_loss_without_triplets_is_zero_and_finite(reducer):
  z = np.random.default_rng(8).normal(size=(B, D)).astype(np.float32)
  z[3] = z[0]  # coincident same-class points as well
  valid = np.ones(B, bool)
  one_class = np.zeros(B, np.int32)
  # Class 1 has a single example (index 4): it has negatives but no positive.
  singleton = np.array([0, 0, 0, 0, 1, 2, 2, 2, 3, 3, 3, 0], np.int32)
  for labels in (one_class, singleton):
    per_anchor, has = jit_metric(z, labels, valid, np.float32(0.1), np.float32(1.0), reducer)
    want_has = np_metric(z, labels, 0.1, 1.0, valid, reducer)[3]
    np.testing.assert_array_equal(np.asarray(has), want_has)
    assert np.all(np.asarray(per_anchor)[~want_has] == 0.0)
    grad = jax.grad(lambda x: jit_metric(x, labels, valid, np.float32(0.1), np.float32(1.0),
                                         reducer)[0].sum())(z)
    assert np.all(np.isfinite(np.asarray(grad)))
  margins = np.float32(0.1), np.float32(1.0)
  assert not np.any(np.asarray(jit_metric(z, one_class, valid, *margins, reducer)[1]))
  assert np.asarray(jit_metric(z, singleton, valid, *margins, reducer)[1]).sum() == B - 1


def test_unknown_reducer_raises():
  with pytest.raises(ValueError, match="reducer"):
    losses.metric_loss(jnp.zeros((3, 2)), jnp.arange(3), distancing_margin=1.0, reducer="mean")


# ---------------------------------------------------------------------------------------------
# vmdls_loss


def np_vmdls(mu, sigma, eps, labels, means, valid, hp, reducer, normalize):
  """Eq. 7 with weights, float64: (loss, terms)."""
  mu, sigma, eps, means = (np.asarray(x, np.float64) for x in (mu, sigma, eps, means))
  hp = {k: float(v) for k, v in hp.items()}
  z = mu + sigma * eps
  if normalize:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
  t, d, count, _ = np_metric(z, labels, hp["triplet_margin"], hp["distancing_margin"], valid,
                             reducer)
  kl = np.zeros(len(mu))
  # -(Eq. 6): the paper's closed form, itself checked against scipy in the KL tests.
  kl[valid] = -np_eq6(mu[valid], sigma[valid], means[labels[valid]], hp["s2"])
  per_anchor = hp["kl_weight"] * kl + hp["triplet_weight"] * t + hp["distancing_weight"] * d
  terms = {"kl": kl[valid].mean(), "triplet": t[valid].mean(), "distancing": d[valid].mean(),
           "triplets_per_anchor": count[valid].mean()}
  return per_anchor[valid].mean(), terms


@pytest.mark.parametrize("reducer,normalize,padded", [
    ("all", False, False), ("nonzero", False, True), ("all", True, True)])
def test_vmdls_loss_matches_reference(reducer, normalize, padded):
  mu, sigma, eps, labels, means = make_batch(9)
  valid = np.ones(B, bool)
  if padded:
    valid[[0, 7]] = False
  hp = hparams(kl=0.7, t=1.3, d=0.4, mt=0.1, md=0.5 if normalize else 2.0, s2=0.1)
  (loss, terms), grads = jit_vmdls_grad(mu, sigma, eps, labels, means, valid, hp, reducer,
                                        normalize)
  want_loss, want_terms = np_vmdls(mu, sigma, eps, labels, means, valid, hp, reducer, normalize)
  np.testing.assert_allclose(float(loss), want_loss, **TOL)
  assert set(terms) == set(want_terms)
  for key, value in want_terms.items():
    np.testing.assert_allclose(float(terms[key]), value, err_msg=key, **TOL)
  # The logged terms recombine into the loss.
  np.testing.assert_allclose(
      float(loss), 0.7 * terms["kl"] + 1.3 * terms["triplet"] + 0.4 * terms["distancing"],
      rtol=1e-6)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~valid] == 0.0)


def test_unit_weights_give_mean_of_eq4():
  """With unit metric weights and no KL, the loss is the mean over anchors of metric_loss."""
  mu, sigma, eps, labels, means = make_batch(10)
  valid = np.ones(B, bool)
  (loss, terms), _ = jit_vmdls_grad(mu, sigma, eps, labels, means, valid, hparams(kl=0.0))
  per_anchor, _ = jit_metric(mu + sigma * eps, labels, valid, np.float32(0.1), np.float32(1.0),
                             "all")
  np.testing.assert_allclose(float(loss), float(per_anchor.mean()), rtol=1e-5)
  np.testing.assert_allclose(float(terms["triplet"] + terms["distancing"]), float(loss),
                             rtol=1e-6)


@pytest.mark.parametrize("reducer,normalize", [("all", False), ("nonzero", True)])
def test_vmdls_loss_gradients(reducer, normalize):
  with jax.enable_x64(True):
    mu, sigma, eps, labels, means = make_batch(14, dtype=np.float64)
    valid = np.ones(B, bool)
    valid[5] = False
    hp = hparams(kl=0.7, t=1.3, d=0.4, md=0.5 if normalize else 2.0, dtype=np.float64)
    # A generic point: no hinge within 1e-2 of its kink, far beyond the 1e-4 difference step.
    z = mu + sigma * eps
    if normalize:
      z = z / np.linalg.norm(z, axis=1, keepdims=True)
    args = np_hinge_arguments(z, labels, 0.1, float(hp["distancing_margin"]), valid)
    assert np.abs(args).min() > 1e-2
    assert (args > 0).any() and (args < 0).any()

    def f(m, s):
      return jit_vmdls(m, s, eps, labels, means, valid, hp, reducer, normalize)[0]

    check_grads(f, (mu, sigma), order=1, modes=["rev"])


def test_vmdls_loss_without_triplets_is_finite_and_masked():
  mu, sigma, eps, _, means = make_batch(12)
  valid = np.ones(B, bool)
  one_class = np.zeros(B, np.int32)
  singleton = np.array([0, 0, 0, 0, 1, 2, 2, 2, 3, 3, 3, 0], np.int32)
  eps[2] = eps[1]
  mu[2], sigma[2] = mu[1], sigma[1]  # coincident z
  for labels in (one_class, singleton):
    (loss, terms), grads = jit_vmdls_grad(mu, sigma, eps, labels, means, valid, hparams())
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert all(np.isfinite(float(v)) for v in terms.values())
    if labels is one_class:  # nothing but the KL term
      assert float(terms["triplet"]) == float(terms["distancing"]) == 0.0
      assert float(terms["triplets_per_anchor"]) == 0.0
      np.testing.assert_allclose(float(loss), float(terms["kl"]), rtol=1e-6)
      np.testing.assert_allclose(float(terms["kl"]),
                                 -np_eq6(mu, sigma, means[one_class], 0.1).mean(), **TOL)
    else:
      want = np_vmdls(mu, sigma, eps, labels, means, valid, hparams(), "all", False)[0]
      np.testing.assert_allclose(float(loss), want, **TOL)


def test_padding_rows_reach_neither_value_nor_gradient():
  mu, sigma, eps, labels, means = make_batch(13)
  keep = np.ones(B, bool)
  keep[[2, 9]] = False
  hp = hparams(kl=0.7, t=1.3, d=0.4)
  results = []
  for filler in (None, np.nan, np.inf, 0.0):  # None: ordinary random rows
    mu_p, sigma_p, eps_p, labels_p = mu.copy(), sigma.copy(), eps.copy(), labels.copy()
    if filler is not None:
      mu_p[~keep], sigma_p[~keep], eps_p[~keep] = filler, filler, filler  # sigma = 0 too
      labels_p[~keep] = [-3, 99]
    results.append(jit_vmdls_grad(mu_p, sigma_p, eps_p, labels_p, means, keep, hp))
  want_loss, want_terms = np_vmdls(mu, sigma, eps, labels, means, keep, hp, "all", False)
  np.testing.assert_allclose(float(results[0][0][0]), want_loss, **TOL)
  for (loss, terms), grads in results:
    # Bit-identical whatever the padding holds.
    assert float(loss) == float(results[0][0][0])
    for key in want_terms:
      assert float(terms[key]) == float(results[0][0][1][key])
    for g, want in zip(grads, results[0][1]):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
      assert np.all(np.asarray(g)[~keep] == 0.0)


def test_zero_kl_weight_ignores_missing_class_means():
  mu, sigma, eps, labels, means = make_batch(14)
  valid = np.ones(B, bool)
  missing = np.full_like(means, np.nan)
  missing[0] = np.inf
  (want_loss, _), want_grads = jit_vmdls_grad(mu, sigma, eps, labels, means, valid,
                                              hparams(kl=0.0))
  (loss, _), grads = jit_vmdls_grad(mu, sigma, eps, labels, missing, valid, hparams(kl=0.0))
  assert float(loss) == float(want_loss)
  for g, want in zip(grads, want_grads):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
  # With a non-zero weight, missing means or a label outside [0, C) are loud, not silent.
  assert np.isnan(float(jit_vmdls_grad(mu, sigma, eps, labels, missing, valid, hparams())[0][0]))
  bad = labels.copy()
  bad[3] = C
  assert np.isnan(float(jit_vmdls_grad(mu, sigma, eps, bad, means, valid, hparams())[0][0]))


def test_vmap_over_weights_and_margins_equals_separate_calls():
  """The Table 4 variants, plus other margins and s^2, in one compiled vmapped call."""
  mu, sigma, eps, labels, means = make_batch(15)
  valid = np.ones(B, bool)
  valid[4] = False
  grid = [  # (kl, t, d, M_t, M_d, s2)
      (0.0, 1.0, 0.0, 0.1, 32.0, 0.1),  # (a) L_t
      (0.0, 1.0, 1.0, 0.1, 32.0, 0.1),  # (b) L_t + L_d
      (1.0, 1.0, 0.0, 0.1, 32.0, 0.1),  # (c) L_KL + L_t
      (1.0, 1.0, 1.0, 0.1, 1.0, 0.1),  # (d) L_KL + L_t + L_d, M_d = 1
      (1.0, 1.0, 1.0, 0.1, 32.0, 0.1),  # (e) L_KL + L_t + L_d, M_d = 32
      (1.0, 1.0, 0.0, 1.0, 32.0, 0.1),  # L_t with M_t = 1 (plus KL)
      (0.5, 2.0, 0.3, 0.2, 1.5, 0.5),
  ]
  names = ("kl_weight", "triplet_weight", "distancing_weight", "triplet_margin",
           "distancing_margin", "s2")
  stacked = {k: np.array([row[i] for row in grid], np.float32) for i, k in enumerate(names)}
  for reducer in ("all", "nonzero"):
    traces = []

    def one(hp, reducer=reducer, traces=traces):
      traces.append(1)
      return losses.vmdls_loss(mu, sigma, eps, labels, means, valid=valid, reducer=reducer, **hp)

    loss, terms = jax.jit(jax.vmap(one))(stacked)
    assert len(traces) == 1  # one trace, one compilation for the whole grid
    for i, row in enumerate(grid):
      hp = {k: np.float32(v) for k, v in zip(names, row)}
      (want_loss, want_terms), _ = jit_vmdls_grad(mu, sigma, eps, labels, means, valid, hp,
                                                  reducer)
      np.testing.assert_allclose(float(loss[i]), float(want_loss), rtol=1e-5, atol=1e-6)
      for key in want_terms:
        np.testing.assert_allclose(float(terms[key][i]), float(want_terms[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    # The ablation weights do what they say: no KL in (a), (b); no distancing in (a), (c).
    np.testing.assert_allclose(float(loss[0]), float(terms["triplet"][0]), rtol=1e-6)
    np.testing.assert_allclose(float(loss[2]), float(terms["kl"][2] + terms["triplet"][2]),
                               rtol=1e-6)


def test_underflowed_sigma_keeps_an_off_kl_term_at_zero():
  """σ = exp(log σ) reaches 0 in float32 when nothing bounds it (L_t alone, Table 4): the KL is
  then large but finite, so with weight 0 the loss and its gradients are those of the metric
  terms alone (the ablation's L_t runs once went NaN at step 7 here)."""
  mu, sigma, eps, labels, means = make_batch(15)
  valid = np.ones(B, bool)
  zero = np.array(sigma)
  zero[:3] = 0.0
  kl = np.asarray(losses.gaussian_kl(mu, zero, means[labels], 0.1))
  assert np.isfinite(kl).all() and (kl[:3] > 80).all()  # d/2 · (-log tiny) per row, ~ 87 d/2
  (loss, terms), grads = jit_vmdls_grad(mu, zero, eps, labels, means, valid, hparams(kl=0.0))
  assert np.isfinite(float(loss))
  assert float(loss) == pytest.approx(float(terms["triplet"] + terms["distancing"]), rel=1e-6)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
