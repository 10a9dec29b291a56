"""Practical thresholds for a 1-D OOD score, from little or no labelled data.

A score s (higher = more OOD, the library's convention) is turned into a decision by a
threshold t: an input is REJECTED as OOD when s > t and accepted when s <= t (the same rule as
`oodjax.metrics`). Section 5 of Begon & Geurts sketches three ways to pick t once the model is
deployed; each is a function here:

* `threshold_from_labels`: a few scores labelled ID/OOD; t minimises the (balanced) error on
  them.
* `threshold_from_proportion`: an expected fraction of OOD inputs in the stream; t rejects
  that fraction of the observed scores.
* `threshold_two_groups`: nothing but the stream; t splits the sorted scores into the two
  groups with the smallest within-group sum of squares (Otsu's criterion, exact in 1-D).

They are not rows of `oodjax.evaluate`'s report: they pick the threshold of a deployed detector
from the scores it sees, while the report measures detectors threshold-free (AUROC, AUPR) or at
a fixed 95% TPR on labelled test data. Apply them to the scores `evaluate_ood` returns.

All are exact (no grid of candidate thresholds), pure `jnp`, and work under `jax.jit`. Where
several thresholds give the same decisions, the one returned is the midpoint of the gap
between the two scores that bracket it, the most robust choice for unseen scores.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021, Section 5. N. Otsu. A threshold selection method from
  gray-level histograms. IEEE Trans. SMC, 1979.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_scores(scores, name: str) -> jax.Array:
  scores = jnp.asarray(scores)
  if scores.ndim != 1 or scores.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape {scores.shape}")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  return scores


def _midpoint_above(sorted_scores: jax.Array, t: jax.Array) -> jax.Array:
  """Midpoint between t (a value of sorted_scores) and the next larger score; t if none."""
  nxt = jnp.searchsorted(sorted_scores, t, side="right")
  upper = sorted_scores[jnp.minimum(nxt, sorted_scores.shape[0] - 1)]
  return jnp.where(nxt < sorted_scores.shape[0], 0.5 * (t + upper), t)


def threshold_from_labels(scores_in, scores_out, *, balanced: bool = True) -> jax.Array:
  """The threshold that makes the fewest errors on a few labelled scores.

  Errors are ID scores rejected (s > t) and OOD scores accepted (s <= t). With `balanced`, each
  kind is a rate (so a handful of OOD samples weighs as much as many ID ones):
  0.5 * (ID rejected / N + OOD accepted / M); otherwise their total count. Every distinct
  decision is examined exactly: accepting nothing (t = -inf) or accepting all scores <= v for
  each observed v. Ties in the error go to the lowest threshold.

  Args:
    scores_in: [N] scores of samples labelled ID.
    scores_out: [M] scores of samples labelled OOD.
    balanced: error rates averaged (True) or errors counted (False); a Python bool.

  Returns:
    [] threshold t: the midpoint between the best cut's largest accepted score and the next
    score, -inf if rejecting everything is best.

  References:
    Begon & Geurts 2021, Section 5, "Test samples can be labeled".
  """
  scores_in = _as_scores(scores_in, "scores_in")
  scores_out = _as_scores(scores_out, "scores_out")
  n, m = scores_in.shape[0], scores_out.shape[0]
  every = jnp.sort(jnp.concatenate([scores_in, scores_out]))  # [N + M]
  candidates = jnp.concatenate([jnp.full((1,), -jnp.inf, every.dtype), every])  # accept <= c
  in_rejected = n - jnp.searchsorted(jnp.sort(scores_in), candidates, side="right")
  out_accepted = jnp.searchsorted(jnp.sort(scores_out), candidates, side="right")
  if balanced:
    error = 0.5 * (in_rejected / n + out_accepted / m)
  else:
    error = (in_rejected + out_accepted).astype(every.dtype)
  best = candidates[jnp.argmin(error)]
  return jnp.where(jnp.isneginf(best), best, _midpoint_above(every, best))


def threshold_from_proportion(scores, ood_fraction) -> jax.Array:
  """The threshold that rejects an expected fraction of a stream of scores.

  With n scores and r = round(ood_fraction * n), t lies midway between the (r+1)-th and the
  r-th largest score, so exactly r scores are rejected when the scores are distinct (fewer when
  scores tie across the cut, since equal scores get the same decision). r = 0 gives the
  largest score (nothing rejected); r = n gives -inf (everything rejected).

  Args:
    scores: [n] observed scores (ID and OOD mixed, unlabelled).
    ood_fraction: [] expected proportion of OOD inputs, in [0, 1]; may be traced.

  Returns:
    [] threshold t.

  References:
    Begon & Geurts 2021, Section 5, "No labeling is possible" (first example).
  """
  scores = jnp.sort(_as_scores(scores, "scores"))
  n = scores.shape[0]
  r = jnp.clip(jnp.round(jnp.asarray(ood_fraction, scores.dtype) * n), 0, n).astype(jnp.int32)
  below = scores[jnp.clip(n - r - 1, 0, n - 1)]  # largest accepted score
  above = scores[jnp.clip(n - r, 0, n - 1)]  # smallest rejected score
  return jnp.where(r == 0, scores[n - 1],
                   jnp.where(r == n, -jnp.inf, 0.5 * (below + above)))


def threshold_two_groups(scores) -> jax.Array:
  """Splits unlabelled scores into two groups with minimum within-group variance (Otsu).

  In 1-D an optimal split into two groups is a cut of the sorted scores, so all n - 1 cuts
  are examined. Minimising the within-group sum of squares equals maximising the between-group
  one, which for the cut after the i lowest (centred) scores with prefix sum P_i is
  n P_i^2 / (i (n - i)): one cumulative sum, no squares to cancel. Cuts between equal scores
  are not allowed (a threshold cannot separate them); ties in the criterion go to the lowest
  cut.

  Args:
    scores: [n] observed scores, n >= 1.

  Returns:
    [] threshold t, the midpoint of the best cut's gap; the largest score (nothing rejected)
    when all scores are equal.

  References:
    Begon & Geurts 2021, Section 5, "No labeling is possible" (second example); Otsu 1979.
  """
  scores = jnp.sort(_as_scores(scores, "scores"))
  n = scores.shape[0]
  if n == 1:
    return scores[0]
  centred = scores - jnp.mean(scores)
  prefix = jnp.cumsum(centred)[:-1]  # [n - 1] P_i, i = 1 .. n-1 scores on the left
  left = jnp.arange(1, n, dtype=scores.dtype)
  between = n * jnp.square(prefix) / (left * (n - left))
  valid = scores[:-1] < scores[1:]
  best = jnp.argmax(jnp.where(valid, between, -jnp.inf))
  return jnp.where(jnp.any(valid), 0.5 * (scores[best] + scores[best + 1]), scores[n - 1])
