"""The VMDLS training losses (Sec. 3.1, Eqs. 2-7) as pure functions of arrays.

    z = mu + sigma * eps                                             # [B, d], Eq. 1
    loss, terms = vmdls_loss(mu, sigma, eps, labels, class_means, distancing_margin=2.0)

Per anchor x_i the paper minimises (Eq. 7)

    L(x_i) = KL_i + 1/|T(x_i)| sum_{(p, n) in T(x_i)} [L_t(x_i, p, n) + L_d(x_i, n)],

where T(x_i) holds every (positive, negative) pair of the batch, L_t is the triplet hinge (Eq. 2),
L_d the distancing hinge (Eq. 3), both on SQUARED Euclidean distances of z, and KL_i the
class-conditional Gaussian KL divergence (Eqs. 5-6, see `gaussian_kl` for its sign). The batch
loss is the mean of L(x_i) over the anchors.

Everything is `jnp`, so it works under `jax.jit`, `jax.grad` and `jax.vmap`. Margins, weights and
s^2 are ordinary (possibly traced) arrays: the Table 4 ablations (L_t; L_t + L_d; L_KL + L_t;
L_KL + L_t + L_d) are one function with different weights, and a vmap over them compiles once.
`reducer` and `normalize` change the program and are Python values (static under `jit`).

Two options reproduce departures of the authors' released code from the paper; the defaults are
the paper's:
  * `reducer="nonzero"`: average an anchor's L_m only over its triplets with L_m > 0.
  * `normalize=True`: L2-normalise z before the distances.

Padding: a `valid` mask [B] marks real rows. Padding rows are neither anchors, positives nor
negatives, and may hold anything (even NaN): they are replaced by harmless values before any
arithmetic, so they reach neither the loss nor its gradient.

References:
  Dinari & Freifeld 2022, VMDLS, Sec. 3.1, Eqs. 1-7.
  Schroff, Kalenichenko, Philbin 2015, FaceNet (the triplet loss of Eq. 2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCERS = ("all", "nonzero")


def squared_distances(z: jax.Array) -> jax.Array:
  """All pairwise squared Euclidean distances ||z_i - z_j||^2.

  Computed from the differences, not from ||a||^2 + ||b||^2 - 2 a.b: a sum of squares is never
  negative, the diagonal is exactly 0, and the gradient 2 (z_i - z_j) is finite (zero) at
  coincident points; no clip or sqrt guard is needed. The cost is a [B, B, d] intermediate, no
  larger than the [B, B, B] triplet tensor of `metric_loss` while d <= B.

  Args:
    z: [B, d] embeddings.

  Returns:
    [B, B] squared distances, symmetric, >= 0, with a zero diagonal.
  """
  diff = z[:, None, :] - z[None, :, :]  # [B, B, d]
  return jnp.sum(jnp.square(diff), axis=-1)


def triplet_loss(d_ap: jax.Array, d_an: jax.Array, margin=0.1) -> jax.Array:
  """The triplet hinge of Eq. 2, elementwise: max(0, M_t + d_ap - d_an).

  Args:
    d_ap: [...] SQUARED anchor-positive distances.
    d_an: [...] SQUARED anchor-negative distances, the same shape as `d_ap`.
    margin: M_t, a scalar (the paper fixes M_t = 0.1).

  Returns:
    [...] the hinge, >= 0.

  References:
    Dinari & Freifeld 2022, Eq. 2.
  """
  # relu has derivative 0 at the kink, where jnp.maximum would split it 0.5/0.5.
  return jax.nn.relu(margin + d_ap - d_an)


def distancing_loss(d_an: jax.Array, margin) -> jax.Array:
  """The distancing hinge of Eq. 3, elementwise: max(0, M_d - d_an).

  Args:
    d_an: [...] SQUARED anchor-negative distances.
    margin: M_d, a scalar (the paper usually takes M_d = d, the latent dimension).

  Returns:
    [...] the hinge, >= 0.

  References:
    Dinari & Freifeld 2022, Eq. 3.
  """
  return jax.nn.relu(margin - d_an)


def gaussian_kl(mu: jax.Array, sigma: jax.Array, mean: jax.Array, s2=0.1) -> jax.Array:
  """D_KL(N(mu, diag sigma^2) || N(mean, s2 I)) per row: the KL term that training MINIMISES.

  Sign: Eq. 5 defines L_KL = -D_KL and Eq. 6 writes out -D_KL, yet Eq. 7 adds L_KL to a loss
  that is minimised, which taken literally would maximise the divergence. The intent (a VAE's
  ELBO maximises -KL, i.e. minimises KL; Sec. 3.1 wants each class "as close as possible to an
  isotropic Gaussian") is to minimise D_KL, so this returns D_KL itself, = -(Eq. 6):

    D_KL = sum_j [log(s / sigma_j) + (sigma_j^2 + (mu_j - m_j)^2) / (2 s^2) - 1/2]
         = sum_j [(r_j - 1 - log r_j) / 2 + (mu_j - m_j)^2 / (2 s^2)],   r_j = sigma_j^2 / s^2,

  from E_q[log q - log p] with log N(x; a, v) = -(log 2 pi v)/2 - (x - a)^2 / (2 v) and
  E_q[(x - m)^2] = sigma^2 + (mu - m)^2. The second form is used: r - 1 - log r >= 0 and
  (mu - m)^2 >= 0 are each non-negative, so the result is >= 0 in floating point too.

  Args:
    mu: [B, d] the mean of q(.|g(x_i)).
    sigma: [B, d] its standard deviations, >= 0 (not log sigma); 0 (an underflowed exp) is
      read as the smallest positive normal variance ratio.
    mean: [B, d] the class mean m(y_i) of each row, already gathered from the [C, d] means.
    s2: s^2, the variance of every class Gaussian, a scalar (the paper uses 0.1).

  Returns:
    [B] the divergence of each row, >= 0, and 0 exactly when mu = mean and sigma^2 = s2.

  References:
    Dinari & Freifeld 2022, Eqs. 5-6; Kingma & Welling 2014, Appendix B.
  """
  # r is floored at the smallest normal float: a σ that underflows to 0 (nothing else bounds it
  # from below when the KL term is off, e.g. Table 4's L_t alone) gives a large finite KL, not
  # inf, so that weighting the term by 0 still gives 0 and a 0 gradient rather than NaN.
  r = jnp.maximum(jnp.square(sigma) / s2, jnp.finfo(jnp.result_type(sigma, float)).tiny)
  # r - 1 - log r is >= 0 exactly; rounding can leave about -1e-14 when r is within an ulp of
  # 1, and the clip removes only that.
  shape_term = jnp.maximum(r - 1.0 - jnp.log(r), 0.0)  # [B, d]
  mean_term = jnp.square(mu - mean) / s2  # [B, d]
  return 0.5 * jnp.sum(shape_term + mean_term, axis=-1)


def _metric_parts(z, labels, triplet_margin, distancing_margin, valid, reducer):
  """Per-anchor triplet and distancing means, triplet counts, has_triplet: all [B]."""
  if reducer not in REDUCERS:
    raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}.")
  b = z.shape[0]
  if valid is None:
    valid = jnp.ones((b,), bool)
  # Padding rows may hold NaN; even masked out, 0 * NaN would reach the gradient of the others.
  z = jnp.where(valid[:, None], z, 0.0)  # [B, d]
  d2 = squared_distances(z)  # [B, B]
  same = labels[:, None] == labels[None, :]  # [B, B]
  both_valid = valid[:, None] & valid[None, :]  # [B, B]
  is_pos = same & both_valid & ~jnp.eye(b, dtype=bool)  # [B, B] (a, p)
  is_neg = ~same & both_valid  # [B, B] (a, n)
  is_triplet = is_pos[:, :, None] & is_neg[:, None, :]  # [B, B, B] (a, p, n)

  l_t = triplet_loss(d2[:, :, None], d2[:, None, :], triplet_margin)  # [B, B, B]
  l_d = distancing_loss(d2, distancing_margin)[:, None, :]  # [B, 1, B], shared by every p
  # Both hinges are finite everywhere, so masking with `where` leaves no NaN in the gradient.
  l_t = jnp.where(is_triplet, l_t, 0.0)  # [B, B, B]
  l_d = jnp.where(is_triplet, l_d, 0.0)  # [B, B, B]
  if reducer == "all":
    counted = is_triplet
  else:
    # A triplet with L_m = 0 adds 0 to both sums, so only the denominator changes.
    counted = is_triplet & (l_t + l_d > 0)  # [B, B, B]
  count = jnp.sum(counted, axis=(1, 2)).astype(z.dtype)  # [B]
  denom = jnp.maximum(count, 1.0)  # an anchor without triplets sums 0 and gets 0
  triplet = jnp.sum(l_t, axis=(1, 2)) / denom  # [B]
  distancing = jnp.sum(l_d, axis=(1, 2)) / denom  # [B]
  return triplet, distancing, count, jnp.any(is_triplet, axis=(1, 2))


def metric_loss(z: jax.Array, labels: jax.Array, *, triplet_margin=0.1, distancing_margin,
                valid: jax.Array | None = None, reducer: str = "all"
                ) -> tuple[jax.Array, jax.Array]:
  """Each anchor's mean metric loss L_m = L_t + L_d (Eq. 4) over all its triplets (Eq. 7).

  The triplets of anchor a are all (p, n) with labels[p] == labels[a], p != a,
  labels[n] != labels[a], and a, p, n valid. They are formed as a masked [B, B, B] tensor over
  (a, p, n), so memory grows as B^3 (67 MB of float32 at B = 256).

  Args:
    z: [B, d] float embeddings, the generator's outputs f(g(x)).
    labels: [B] int class labels.
    triplet_margin: M_t of Eq. 2, a scalar.
    distancing_margin: M_d of Eq. 3, a scalar.
    valid: [B] bool, False on padding rows, whose z and labels may hold anything (even NaN);
      None means every row is real.
    reducer: "all" (the paper, Eq. 7): the mean over all of the anchor's triplets. "nonzero"
      (the authors' released code): the mean over its triplets with L_m > 0 only.

  Returns:
    (per_anchor, has_triplet): per_anchor [B] the anchor's mean L_m, exactly 0 for an anchor
    without triplets (no positive, no negative, or padding) or, with "nonzero", without a
    triplet of positive loss; has_triplet [B] bool, whether the anchor has any triplet.

  Raises:
    ValueError: `reducer` is neither "all" nor "nonzero".

  References:
    Dinari & Freifeld 2022, Eqs. 2-4 and 7.
  """
  triplet, distancing, _, has_triplet = _metric_parts(
      z, labels, triplet_margin, distancing_margin, valid, reducer)
  return triplet + distancing, has_triplet


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit norm; a zero row stays zero with a finite gradient."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)  # [B, 1]
  return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))


def vmdls_loss(mu: jax.Array, sigma: jax.Array, eps: jax.Array, labels: jax.Array,
               class_means: jax.Array, *, kl_weight=1.0, triplet_weight=1.0,
               distancing_weight=1.0, triplet_margin=0.1, distancing_margin, s2=0.1,
               valid: jax.Array | None = None, reducer: str = "all", normalize: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The VMDLS batch loss of Eq. 7, with one weight per term.

    loss = mean over valid i of [kl_weight KL_i + triplet_weight T_i + distancing_weight D_i],

  with z = mu + sigma * eps (Eq. 1), KL_i = `gaussian_kl` against m(labels[i]), and T_i, D_i the
  anchor's mean triplet and distancing hinges over its triplets, so that T_i + D_i is the mean
  L_m of Eq. 4 and unit weights give Eq. 7. An anchor without triplets keeps its KL term and
  contributes 0 to the metric part, yet still counts in the mean over anchors (1/N in Eq. 7;
  the paper leaves 1/|T(x_i)| with |T(x_i)| = 0 undefined).

  With kl_weight == 0 the KL term adds exactly 0 to the loss and to its gradient even when
  `class_means` holds NaN or inf (means not computed yet): such entries are read as 0.

  Args:
    mu: [B, d] the encoder's means.
    sigma: [B, d] its standard deviations, > 0 on valid rows.
    eps: [B, d] standard normal noise, drawn by the caller from its key.
    labels: [B] int class labels in [0, C) on valid rows.
    class_means: [C, d] the class means m(c) (the previous epoch's mean z per class). A valid
      row whose label lies outside [0, C) reads NaN means, so the mistake is loud.
    kl_weight, triplet_weight, distancing_weight: scalar weights of the three terms.
    triplet_margin: M_t of Eq. 2, a scalar.
    distancing_margin: M_d of Eq. 3, a scalar.
    s2: s^2, the variance of the class Gaussians, a scalar.
    valid: [B] bool, False on padding rows (which may hold anything); None: all rows are real.
    reducer: "all" (the paper) or "nonzero" (released code), see `metric_loss`.
    normalize: L2-normalise z before the distances (released code; the paper does not). The KL
      still uses the raw mu and sigma: normalisation only changes the space the metric loss
      measures.

  Returns:
    (loss, terms): loss [] the weighted batch loss; terms a dict of [] means over the valid
    anchors of the UNWEIGHTED per-anchor values, for logging: "kl", "triplet", "distancing",
    and "triplets_per_anchor", the number of triplets in each anchor's mean (all of its
    triplets with "all", those with L_m > 0 with "nonzero"). With no valid row everything is 0.
    loss == kl_weight * kl + triplet_weight * triplet + distancing_weight * distancing.

  Raises:
    ValueError: `reducer` is neither "all" nor "nonzero".

  References:
    Dinari & Freifeld 2022, Sec. 3.1, Eqs. 1-7.
  """
  b = mu.shape[0]
  if valid is None:
    valid = jnp.ones((b,), bool)
  row = valid[:, None]  # [B, 1]
  # Harmless stand-ins for padding rows, so garbage there reaches no value and no gradient.
  mu = jnp.where(row, mu, 0.0)  # [B, d]
  sigma = jnp.where(row, sigma, 1.0)  # [B, d]
  eps = jnp.where(row, eps, 0.0)  # [B, d]
  class_means = jnp.asarray(class_means)
  num_classes = class_means.shape[0]
  known = (labels >= 0) & (labels < num_classes)  # [B]
  means = class_means[jnp.clip(labels, 0, num_classes - 1)]  # [B, d] m(y_i)
  means = jnp.where(known[:, None], means, jnp.nan)  # [B, d]
  # A NaN in an unused branch still poisons the gradient (0 * NaN), so clean the inputs of the
  # KL term rather than masking its output.
  unused = ~row | ((kl_weight == 0) & ~jnp.isfinite(means))  # [B, d]
  means = jnp.where(unused, 0.0, means)  # [B, d]

  z = mu + sigma * eps  # [B, d], Eq. 1
  if normalize:
    z = _l2_normalize(z)
  kl = gaussian_kl(mu, sigma, means, s2)  # [B]
  triplet, distancing, count, _ = _metric_parts(
      z, labels, triplet_margin, distancing_margin, valid, reducer)

  n_valid = jnp.maximum(jnp.sum(valid).astype(mu.dtype), 1.0)

  def valid_mean(x):  # [B] -> []
    return jnp.sum(jnp.where(valid, x, 0.0)) / n_valid

  terms = {"kl": valid_mean(kl), "triplet": valid_mean(triplet),
           "distancing": valid_mean(distancing), "triplets_per_anchor": valid_mean(count)}
  loss = valid_mean(kl_weight * kl + triplet_weight * triplet + distancing_weight * distancing)
  return loss, terms
