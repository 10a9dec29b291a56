"""Threshold-free and fixed-TPR metrics for out-of-distribution detection.

Convention (the same across oodjax): a detector's score is HIGHER for MORE out-of-distribution
inputs, and in-distribution (ID) is the POSITIVE class for TPR, as in ODIN (Liang et al., 2018,
section 4.3). An input is accepted as in-distribution when `score <= threshold`, so

  TPR(t) = fraction of ID scores <= t,    FPR(t) = fraction of OOD scores <= t,

and "FPR at 95% TPR" is the fraction of OOD inputs accepted when at least 95% of ID inputs are
accepted. OpenOOD and pytorch-ood make OOD the positive class instead (an input is flagged as
OOD when `score >= threshold`); their "FPR@95" is the fraction of ID inputs flagged when at least
95% of OOD inputs are flagged, which is a different number. `positive="out"` on `fpr_at_tpr`,
`tnr_at_tpr` and `threshold_at_tpr` gives that variant.

Everything is computed exactly from sorted scores, with no grid of thresholds. Ties are handled as
scikit-learn does: all samples with the same score share one threshold, so ROC points sit only at
the distinct score values (plus the "accept nothing" point TPR = FPR = 0). Every count is an
integer (`jnp.searchsorted` into the sorted scores); only the final ratios and means are floating
point, in float32 unless the scores are float64 (with `jax_enable_x64`).

All functions take one score vector per set: `scores_in: [N]`, `scores_out: [M]`, N, M >= 1. Shapes
are static, so each function works under `jax.jit` and `jax.vmap`; a `[T, E, N]` sweep becomes a
`[T, E]` table with `jax.vmap(jax.vmap(all_metrics))`. `positive` is a Python string: mark it
static (`jax.jit(f, static_argnames="positive")`) or bind it with `functools.partial`.

Validation: shape problems (not 1-D, empty) raise `ValueError` before any computation, also
under `jit`, because shapes are static. NaN scores raise `ValueError` only when the scores are
concrete; under `jit`/`vmap` they cannot be inspected and the caller must validate them first
(`check_scores`), otherwise the results are meaningless. Infinite scores are allowed.

References:
  Liang, Li, Srikant. Enhancing the reliability of out-of-distribution image detection in neural
  networks (ODIN). ICLR 2018, section 4.3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_POSITIVES = ("in", "out")


def check_scores(scores, name: str = "scores") -> jax.Array:
  """Checks that `scores` is a usable score vector and returns it as a floating array.

  The shape checks are static and always run. The NaN check runs only when `scores` is concrete
  (not a tracer inside `jit`/`vmap`); traced callers must validate their scores beforehand.

  Args:
    scores: [N] array-like of detector scores, N >= 1.
    name: the argument's name, used in error messages.

  Returns:
    [N] the scores, as float32 (or the input's wider floating dtype).

  Raises:
    ValueError: `scores` is not 1-D, is empty, or (when concrete) contains NaN.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(
        f"{name} must be a 1-D vector of scores, got shape {scores.shape}; for a batch of score "
        "vectors use jax.vmap over the leading axes.")
  if scores.shape[0] == 0:
    raise ValueError(f"{name} is empty: every metric needs at least one score per set.")
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  if not isinstance(scores, jax.core.Tracer) and bool(jnp.isnan(scores).any()):
    raise ValueError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(scores))[:10]}.")
  return scores


def _check_pair(scores_in, scores_out) -> tuple[jax.Array, jax.Array]:
  scores_in = check_scores(scores_in, "scores_in")
  scores_out = check_scores(scores_out, "scores_out")
  # One dtype for both sets, so that searching one in the other compares like with like.
  dtype = jnp.promote_types(scores_in.dtype, scores_out.dtype)
  return scores_in.astype(dtype), scores_out.astype(dtype)


def _check_positive(positive: str) -> None:
  if positive not in _POSITIVES:
    raise ValueError(f"positive must be 'in' or 'out', got {positive!r}.")


def _check_tpr(tpr) -> None:
  if isinstance(tpr, jax.core.Tracer):
    return  # A swept tpr is only known at run time.
  if not 0.0 <= float(tpr) <= 1.0:
    raise ValueError(f"tpr must lie in [0, 1], got {tpr}.")


def _count_le(sorted_scores: jax.Array, values: jax.Array) -> jax.Array:
  """[V] int32: how many of `sorted_scores` are <= each of `values`."""
  return jnp.searchsorted(sorted_scores, values, side="right")


def _count_lt(sorted_scores: jax.Array, values: jax.Array) -> jax.Array:
  """[V] int32: how many of `sorted_scores` are < each of `values`."""
  return jnp.searchsorted(sorted_scores, values, side="left")


def _roc_points(scores_in: jax.Array, scores_out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The ROC curve with ID positive, one point per sample.

  Accepting `score <= s` for every observed score s visits every distinct threshold; tied samples
  give the same point more than once, which does not change a min or a max over points.

  Returns:
    tpr: [N + M] fraction of ID scores <= each observed score.
    fpr: [N + M] fraction of OOD scores <= each observed score.
  """
  thresholds = jnp.concatenate([scores_in, scores_out])  # [N + M]
  dtype = thresholds.dtype
  tpr = _count_le(jnp.sort(scores_in), thresholds).astype(dtype) / scores_in.shape[0]
  fpr = _count_le(jnp.sort(scores_out), thresholds).astype(dtype) / scores_out.shape[0]
  return tpr, fpr


def _fpr_at_tpr_in_positive(scores_in, scores_out, tpr) -> jax.Array:
  roc_tpr, roc_fpr = _roc_points(scores_in, scores_out)
  # No point reaches tpr only if tpr > 1 (a traced tpr skips the range check): report FPR 1.
  fpr = jnp.min(jnp.where(roc_tpr >= tpr, roc_fpr, 1.0))
  # The "accept nothing" point (TPR = FPR = 0) qualifies when tpr <= 0.
  return jnp.where(tpr <= 0, jnp.zeros_like(fpr), fpr)


def _swap_roles(scores_in, scores_out):
  """OOD-positive metrics are ID-positive metrics of the negated, swapped sets.

  With s' = -score, "flag as OOD when score >= t" is "accept when s' <= -t", so the OOD set plays
  the part of the positive set. Negation keeps ties tied.
  """
  return -scores_out, -scores_in


def fpr_at_tpr(scores_in, scores_out, tpr=0.95, *, positive: str = "in") -> jax.Array:
  """False positive rate at the operating point that reaches a true positive rate of `tpr`.

  The operating point is the ROC point (one per distinct score value, plus TPR = FPR = 0) with the
  smallest FPR among those with TPR >= `tpr`. This is what
  `min(fpr[tpr >= 0.95])` over `sklearn.metrics.roc_curve(..., drop_intermediate=False)` gives.
  TPR is computed in the score dtype and compared with `tpr` rounded to that dtype, so an exact
  fraction such as 19/20 counts as reaching 0.95.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.
    tpr: scalar in [0, 1], the true positive rate to reach; may be traced.
    positive: "in" (default, ODIN): ID is positive, an input is accepted when score <= threshold,
      and the result is the fraction of OOD accepted when >= tpr of ID is accepted.
      "out" (OpenOOD, pytorch-ood): OOD is positive, an input is flagged when score >= threshold,
      and the result is the fraction of ID flagged when >= tpr of OOD is flagged.

  Returns:
    [] float32 in [0, 1]. 1.0 when the sets cannot be told apart (e.g. all scores tied).
  """
  _check_positive(positive)
  _check_tpr(tpr)
  scores_in, scores_out = _check_pair(scores_in, scores_out)
  if positive == "out":
    scores_in, scores_out = _swap_roles(scores_in, scores_out)
  return _fpr_at_tpr_in_positive(scores_in, scores_out, tpr)


def tnr_at_tpr(scores_in, scores_out, tpr=0.95, *, positive: str = "in") -> jax.Array:
  """True negative rate, 1 - `fpr_at_tpr`, at the same operating point.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.
    tpr: scalar in [0, 1]; may be traced.
    positive: "in" (default): fraction of OOD rejected when >= tpr of ID is accepted.
      "out": fraction of ID not flagged when >= tpr of OOD is flagged.

  Returns:
    [] float32 in [0, 1].
  """
  return 1.0 - fpr_at_tpr(scores_in, scores_out, tpr, positive=positive)


def threshold_at_tpr(scores, tpr=0.95, *, positive: str = "in") -> jax.Array:
  """The score threshold of the operating point that `fpr_at_tpr` picks.

  It depends on the positive set only, so it can be fixed on held-out ID data and reused.

  Args:
    scores: [N] scores of the positive set: ID scores when positive="in", OOD scores when
      positive="out".
    tpr: scalar in [0, 1]; may be traced.
    positive: "in" (default): the smallest observed score t with at least a fraction `tpr` of
      `scores` <= t; accept as ID when score <= t. "out": the largest observed score t with at
      least a fraction `tpr` of `scores` >= t; flag as OOD when score >= t.

  Returns:
    [] the threshold, in the dtype of `scores` (promoted to float32 at least). When tpr <= 0 it is
    -inf for "in" (accept nothing) and +inf for "out" (flag nothing).
  """
  _check_positive(positive)
  _check_tpr(tpr)
  scores = check_scores(scores)
  if positive == "out":
    return -threshold_at_tpr(-scores, tpr, positive="in")
  sorted_scores = jnp.sort(scores)
  reached = _count_le(sorted_scores, sorted_scores).astype(scores.dtype) / scores.shape[0] >= tpr
  # Ties share a count, so the first score that reaches tpr is the smallest such threshold.
  threshold = jnp.min(jnp.where(reached, sorted_scores, jnp.inf))
  return jnp.where(tpr <= 0, -jnp.inf, threshold).astype(scores.dtype)


def detection_error(scores_in, scores_out, *, positive: str = "in") -> jax.Array:
  """Minimum over thresholds of 0.5 (1 - TPR) + 0.5 FPR: the error of the best threshold when ID
  and OOD are equally likely.

  ODIN defines P_e "when TPR is 95%" in the text but its released code minimises over thresholds;
  we follow the code, as most later work does.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.
    positive: "in" or "out". Accepted for a uniform interface only: both conventions visit the
      same partitions of the scores and 0.5 (1 - TPR) + 0.5 FPR is symmetric in the two kinds of
      error, so the number is the same.

  Returns:
    [] float32 in [0, 0.5]; 0.5 when the sets cannot be told apart.
  """
  _check_positive(positive)
  scores_in, scores_out = _check_pair(scores_in, scores_out)
  roc_tpr, roc_fpr = _roc_points(scores_in, scores_out)
  # The "accept nothing" point (error 0.5) can be left out: "accept everything" scores
  # 0.5 FPR <= 0.5 and is among the points.
  return jnp.min(0.5 * (1.0 - roc_tpr) + 0.5 * roc_fpr)


def auroc(scores_in, scores_out) -> jax.Array:
  """Area under the ROC curve, P(score_in < score_out) + 0.5 P(score_in == score_out).

  The same number with either class positive; equals `sklearn.metrics.roc_auc_score` with ID
  labelled 1 and -score as the ranking score (or OOD labelled 1 and score).

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.

  Returns:
    [] float32 in [0, 1]; 0.5 when all scores are tied.
  """
  scores_in, scores_out = _check_pair(scores_in, scores_out)
  sorted_in = jnp.sort(scores_in)
  # Per OOD sample, twice the number of ID samples it beats (a tie counts half), as an integer.
  twice_wins = _count_lt(sorted_in, scores_out) + _count_le(sorted_in, scores_out)  # [M]
  # Normalise before averaging: the total can exceed int32 for large sets.
  return jnp.mean(twice_wins.astype(scores_out.dtype) / (2 * scores_in.shape[0]))


def _average_precision_of_lowest(scores_pos, scores_neg) -> jax.Array:
  """Average precision when the positives should have the LOWER scores.

  sklearn's step-wise AP, sum_k (R_k - R_{k-1}) P_k over distinct thresholds, gives every
  positive sample a recall step of 1 / N_pos at the threshold equal to its own score, so it is the
  mean over positives of the precision among the samples scoring <= that positive.
  """
  sorted_pos, sorted_neg = jnp.sort(scores_pos), jnp.sort(scores_neg)
  true_pos = _count_le(sorted_pos, scores_pos)  # [N_pos] >= 1, so no division by zero
  false_pos = _count_le(sorted_neg, scores_pos)  # [N_pos]
  dtype = scores_pos.dtype
  return jnp.mean(true_pos.astype(dtype) / (true_pos + false_pos).astype(dtype))


def aupr_in(scores_in, scores_out) -> jax.Array:
  """Average precision with ID as the positive class and -score as the ranking score.

  Equals `sklearn.metrics.average_precision_score(is_in, -score)` (step-wise, no interpolation).

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.

  Returns:
    [] float32 in (0, 1]; N / (N + M) when all scores are tied.
  """
  scores_in, scores_out = _check_pair(scores_in, scores_out)
  return _average_precision_of_lowest(scores_in, scores_out)


def aupr_out(scores_in, scores_out) -> jax.Array:
  """Average precision with OOD as the positive class and score as the ranking score.

  Equals `sklearn.metrics.average_precision_score(is_out, score)`.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.

  Returns:
    [] float32 in (0, 1]; M / (N + M) when all scores are tied.
  """
  scores_in, scores_out = _check_pair(scores_in, scores_out)
  return _average_precision_of_lowest(*_swap_roles(scores_in, scores_out))


def all_metrics(scores_in, scores_out, *, positive: str = "in") -> dict[str, jax.Array]:
  """The usual table row: FPR at 95% TPR, detection error, AUROC, AUPR-in, AUPR-out.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.
    positive: the convention for "fpr95" only (see `fpr_at_tpr`); the other four do not depend
      on it.

  Returns:
    dict with keys "fpr95", "detection_error", "auroc", "aupr_in", "aupr_out", each [] float32.
    Under `jax.vmap` each value gets the mapped leading axes.
  """
  return {
      "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95, positive=positive),
      "detection_error": detection_error(scores_in, scores_out),
      "auroc": auroc(scores_in, scores_out),
      "aupr_in": aupr_in(scores_in, scores_out),
      "aupr_out": aupr_out(scores_in, scores_out),
  }


def _metrics_grid(scores_in: jax.Array, scores_out: jax.Array) -> dict[str, jax.Array]:
  fn = all_metrics
  for _ in range(scores_in.ndim - 1):  # one vmap per leading grid axis
    fn = jax.vmap(fn)
  return fn(scores_in, scores_out)


_metrics_grid_jit = jax.jit(_metrics_grid)


def metrics_grid(scores_in, scores_out) -> dict[str, jax.Array]:
  """`metrics.all_metrics` for every grid point of two score grids, in one compiled call.

  Args:
    scores_in: [T, E, N] in-distribution scores (any number of leading grid axes, e.g. [T, N]).
    scores_out: [T, E, M] out-of-distribution scores with the same leading axes.

  Returns:
    dict with keys "fpr95", "detection_error", "auroc", "aupr_in", "aupr_out", each [T, E]
    float32 (ID = positive class, as in ODIN).

  Raises:
    ValueError: mismatched leading axes, empty score vectors, or NaN scores (metrics cannot check
      for NaN under `vmap`, so it is checked here first).
  """
  scores_in, scores_out = jnp.asarray(scores_in), jnp.asarray(scores_out)
  if scores_in.ndim < 1 or scores_in.shape[:-1] != scores_out.shape[:-1]:
    raise ValueError(f"score grids must share their leading axes, got {scores_in.shape} and "
                     f"{scores_out.shape}.")
  for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
    if s.shape[-1] == 0:
      raise ValueError(f"{name} is empty along its last axis.")
    if not isinstance(s, jax.core.Tracer) and bool(jnp.isnan(s).any()):
      raise ValueError(f"{name} contains NaN.")
  return _metrics_grid_jit(scores_in, scores_out)
