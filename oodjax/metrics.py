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
the distinct score values (plus the "accept nothing" point TPR = FPR = 0). Each (ID, OOD) pair is
sorted once, merged, and every metric comes from integer counts of ID and OOD scores below and at
each distinct score (running sums over that one order, `_tie_groups`); only the final ratios and
means are floating point, in float32 unless the scores are float64 (with `jax_enable_x64`). On
the CPU backend the sort runs in numpy behind `jax.pure_callback`, as XLA's CPU sort is ~50x
slower; other backends use `lax.sort`. Both give the same numbers.

All functions take one score vector per set: `scores_in: [N]`, `scores_out: [M]`, N, M >= 1. Shapes
are static, so each function works under `jax.jit` and `jax.vmap`; a `[T, E, N]` sweep becomes a
`[T, E]` table with `jax.vmap(jax.vmap(all_metrics))`, or faster with `metrics_grid`, which sorts
the whole grid in one call. `positive` is a Python string: mark it static
(`jax.jit(f, static_argnames="positive")`) or bind it with `functools.partial`.

Validation: shape problems (not 1-D, empty) raise `ValueError` before any computation, also
under `jit`, because shapes are static. NaN scores raise `ValueError` only when the scores are
concrete; under `jit`/`vmap` they cannot be inspected and the caller must validate them first
(`check_scores`), otherwise the results are meaningless. Infinite scores are allowed.

Open-set recognition (K known classes plus "unknown", label K): `open_set_predictions` turns
scores, closed-set classes and a threshold into K + 1-way labels, and `open_set_f1` is their
macro-F1 against the true labels, as `sklearn.metrics.f1_score(average="macro")` over all K + 1.

References:
  Liang, Li, Srikant. Enhancing the reliability of out-of-distribution image detection in neural
  networks (ODIN). ICLR 2018, section 4.3.
  scikit-learn `roc_curve`, `roc_auc_score` and `average_precision_score` (AP = sum_k
  (R_k - R_{k-1}) P_k over distinct thresholds, no interpolation): the definitions matched here.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


class _TieGroups(NamedTuple):
  """How many ID and OOD scores lie below and at each distinct score of an (ID, OOD) pair.

  The arrays have one entry per sample of the merged scores in sorted order, [..., N + M]; only
  the entries where `is_last` is set (the last sample of each group of tied scores, so one per
  distinct score s) are meaningful, and every metric reads only those. The counts are integers.
  """
  is_last: jax.Array  # bool: the next sample has a larger score, or there is none
  in_lt: jax.Array  # int32: ID scores < s
  in_le: jax.Array  # int32: ID scores <= s
  out_lt: jax.Array  # int32: OOD scores < s
  out_le: jax.Array  # int32: OOD scores <= s
  num_in: int  # N
  num_out: int  # M
  dtype: jnp.dtype  # of the scores; the metrics' dtype


def _counts_from_sorted(xp, sorted_scores, is_in) -> tuple:
  """`(is_last, in_le, in_lt, all_lt)` from scores sorted along the last axis and their labels.

  `sorted_scores` may be any keys in the scores' order (ties stay ties), [..., L]; `is_in` is
  [..., L] bool. Written once for both array modules: `xp` is `numpy` (in the CPU callback) or
  `jax.numpy`. At a group's last sample the running count of ID samples is its "<=" count; its "<"
  count is the running count just before the group's first sample, which a running max carries
  forward to the group's last sample (counts only grow along the order). The order of tied samples
  is irrelevant.
  """
  new_value = sorted_scores[..., 1:] != sorted_scores[..., :-1]  # [..., L - 1]
  edge = xp.ones((*sorted_scores.shape[:-1], 1), dtype=bool)
  is_first = xp.concatenate([edge, new_value], axis=-1)  # [..., L]
  is_last = xp.concatenate([new_value, edge], axis=-1)  # [..., L]
  in_le = xp.cumsum(is_in, axis=-1, dtype=xp.int32)  # ID samples at positions <= i
  before = xp.arange(sorted_scores.shape[-1], dtype=xp.int32)  # samples at positions < i
  if xp is np:
    running_max = functools.partial(np.maximum.accumulate, axis=-1)
  else:
    running_max = lambda a: lax.cummax(a, axis=a.ndim - 1)
  in_lt = running_max(xp.where(is_first, in_le - is_in, 0))
  all_lt = running_max(xp.where(is_first, before, 0))
  return is_last, in_le, in_lt, all_lt


def _counts_xla(scores_in: jax.Array, scores_out: jax.Array) -> tuple:
  """`_counts_from_sorted` after one `lax.sort` of the merged scores carrying the labels."""
  scores = jnp.concatenate([scores_in, scores_out], axis=-1)  # [..., L]
  is_in = jnp.concatenate([jnp.ones(scores_in.shape, bool), jnp.zeros(scores_out.shape, bool)],
                          axis=-1)
  sorted_scores, sorted_is_in = lax.sort((scores, is_in), dimension=-1, num_keys=1)
  return _counts_from_sorted(jnp, sorted_scores, sorted_is_in)


def _sort_numpy(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The merged scores sorted along the last axis (or keys in the same order) and their labels."""
  num_in = scores_in.shape[-1]
  scores = np.concatenate([scores_in, scores_out], axis=-1)  # [..., L]
  if scores.dtype == np.float32:
    # A float32 score and its label fit in one int64 key that sorts like the score, and numpy's
    # (SIMD) sort of the keys is about half the cost of an argsort and a gather.
    bits = (scores + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into 0.0, its tie
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)  # sign-magnitude to two's complement: same order
    keys = bits.astype(np.int64) * 2  # [..., L]
    keys[..., num_in:] += 1  # the label in the lowest bit: 1 for OOD
    keys.sort(axis=-1)
    return keys >> 1, (keys & 1) == 0
  order = np.argsort(scores, axis=-1)
  return np.take_along_axis(scores, order, axis=-1), order < num_in


_BLOCK_SAMPLES = 1 << 17  # samples per block of rows on the host: the block's arrays fit in cache


def _counts_numpy(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple:
  """`_counts_from_sorted` in numpy, on the host: the body of the CPU callback.

  numpy sorts and scans on one core, and a pass over [210, 20000] arrays runs from memory, so the
  rows go in cache-sized blocks spread over the CPU's cores (numpy releases the GIL in them).
  """
  num_in, num_out = scores_in.shape[-1], scores_out.shape[-1]
  rows_in, rows_out = scores_in.reshape(-1, num_in), scores_out.reshape(-1, num_out)
  num_rows, length = rows_in.shape[0], num_in + num_out
  counts = (np.empty((num_rows, length), bool),
            *(np.empty((num_rows, length), np.int32) for _ in range(3)))

  def count_block(rows: slice) -> None:
    block = _counts_from_sorted(np, *_sort_numpy(rows_in[rows], rows_out[rows]))
    for whole, part in zip(counts, block):
      whole[rows] = part

  rows_per_block = max(1, _BLOCK_SAMPLES // length)
  blocks = [slice(start, start + rows_per_block) for start in range(0, num_rows, rows_per_block)]
  workers = min(len(blocks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
  if workers <= 1:
    for rows in blocks:
      count_block(rows)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(count_block, blocks))  # list() re-raises a block's exception
  return tuple(a.reshape(*scores_in.shape[:-1], length) for a in counts)


def _counts_numpy_callback(scores_in: jax.Array, scores_out: jax.Array) -> tuple:
  """`_counts_numpy` behind `jax.pure_callback`. It takes any leading axes, so a vmapped call is
  still one callback (`vmap_method="broadcast_all"`)."""
  shape = (*jnp.broadcast_shapes(scores_in.shape[:-1], scores_out.shape[:-1]),
           scores_in.shape[-1] + scores_out.shape[-1])
  result = (jax.ShapeDtypeStruct(shape, jnp.bool_),) + 3 * (jax.ShapeDtypeStruct(shape, jnp.int32),)
  return jax.pure_callback(_counts_numpy, result, scores_in, scores_out,
                           vmap_method="broadcast_all")


def _tie_groups(scores_in: jax.Array, scores_out: jax.Array, sort: str = "auto") -> _TieGroups:
  """Sorts an (ID, OOD) pair once and counts each set's scores below and at every distinct score.

  Every metric in this module is a short function of these counts. XLA's sort is slow on CPU
  ([210, 20000] float32: ~0.65 s, against ~0.012 s for `np.sort`), and so are its cumulative ops
  (an associative scan there), so on the CPU backend the sort and the scans run in numpy behind
  `jax.pure_callback`; other backends keep XLA's. `lax.platform_dependent` picks the path when the
  computation is lowered for its device, not from the default backend at trace time. Both paths
  give the same integers, hence the same metrics to the bit (tested).

  Args:
    scores_in: [..., N] ID scores, N >= 1.
    scores_out: [..., M] OOD scores, M >= 1, of the same floating dtype and leading axes.
    sort: "auto", or "xla" / "numpy" to force one path (for tests).

  Returns:
    `_TieGroups`, each array [..., N + M].
  """
  if sort == "auto":
    counts = lax.platform_dependent(scores_in, scores_out, cpu=_counts_numpy_callback,
                                    default=_counts_xla)
  elif sort == "xla":
    counts = _counts_xla(scores_in, scores_out)
  elif sort == "numpy":
    counts = _counts_numpy_callback(scores_in, scores_out)
  else:
    raise ValueError(f"sort must be 'auto', 'xla' or 'numpy', got {sort!r}.")
  is_last, in_le, in_lt, all_lt = counts
  # At a group's last sample, position + 1 samples score <= s.
  all_le = lax.broadcasted_iota(jnp.int32, in_le.shape, in_le.ndim - 1) + 1
  return _TieGroups(is_last, in_lt, in_le, all_lt - in_lt, all_le - in_le,
                    scores_in.shape[-1], scores_out.shape[-1], scores_in.dtype)


def _roc_points(groups: _TieGroups, positive: str = "in") -> tuple[jax.Array, jax.Array]:
  """The ROC curve, one point per distinct score s (entries where `groups.is_last`).

  Together with the "accept nothing" point TPR = FPR = 0 these are the points of
  `sklearn.metrics.roc_curve(..., drop_intermediate=False)`.

  Returns:
    tpr, fpr: [..., N + M]. positive="in": the fractions of ID / OOD scores <= s.
    positive="out": the fractions of OOD / ID scores >= s.
  """
  g = groups
  if positive == "in":
    tpr, fpr = g.in_le.astype(g.dtype) / g.num_in, g.out_le.astype(g.dtype) / g.num_out
  else:
    tpr = (g.num_out - g.out_lt).astype(g.dtype) / g.num_out
    fpr = (g.num_in - g.in_lt).astype(g.dtype) / g.num_in
  return tpr, fpr


def _fpr_at_tpr(groups: _TieGroups, tpr, positive: str) -> jax.Array:
  roc_tpr, roc_fpr = _roc_points(groups, positive)
  # No point reaches tpr only if tpr > 1 (a traced tpr skips the range check): report FPR 1.
  fpr = jnp.min(jnp.where(groups.is_last & (roc_tpr >= tpr), roc_fpr, 1.0), axis=-1)
  # The "accept nothing" point (TPR = FPR = 0) qualifies when tpr <= 0.
  return jnp.where(tpr <= 0, jnp.zeros_like(fpr), fpr)


def _detection_error(groups: _TieGroups) -> jax.Array:
  roc_tpr, roc_fpr = _roc_points(groups)
  # The "accept nothing" point (error 0.5) can be left out: "accept everything" scores
  # 0.5 FPR <= 0.5 and is among the points.
  return jnp.min(jnp.where(groups.is_last, 0.5 * (1.0 - roc_tpr) + 0.5 * roc_fpr, 1.0), axis=-1)


def _auroc(groups: _TieGroups) -> jax.Array:
  g = groups
  # Each OOD sample at a distinct score s beats the ID samples below s and ties with those at s:
  # twice its wins (a tie counts half) is an integer.
  out_at, twice_wins = g.out_le - g.out_lt, g.in_lt + g.in_le
  twice_pairs = 2 * g.num_in * g.num_out
  widest_int = jax.dtypes.canonicalize_dtype(jnp.int64)  # int32 unless jax_enable_x64
  if twice_pairs <= jnp.iinfo(widest_int).max:  # no product or total can overflow: exact
    total = jnp.sum(jnp.where(g.is_last, out_at.astype(widest_int) * twice_wins, 0), axis=-1)
    return total.astype(g.dtype) / twice_pairs
  terms = out_at.astype(g.dtype) * twice_wins.astype(g.dtype) / twice_pairs
  return jnp.sum(jnp.where(g.is_last, terms, 0.0), axis=-1)


def _average_precision(num_pos_at, precision, is_last, num_pos) -> jax.Array:
  # sklearn's step-wise AP, sum over distinct thresholds of (R_k - R_{k-1}) P_k: the recall step
  # at a distinct score is the number of positives at that score over N_pos.
  steps = jnp.where(is_last, num_pos_at.astype(precision.dtype) * precision, 0.0)
  return jnp.sum(steps, axis=-1) / num_pos


def _aupr_in(groups: _TieGroups) -> jax.Array:
  g = groups
  # ID positive, ranked by -score: accepting scores <= s, precision = ID <= s / all <= s (>= 1).
  precision = g.in_le.astype(g.dtype) / (g.in_le + g.out_le).astype(g.dtype)
  return _average_precision(g.in_le - g.in_lt, precision, g.is_last, g.num_in)


def _aupr_out(groups: _TieGroups) -> jax.Array:
  g = groups
  # OOD positive, ranked by score: flagging scores >= s, precision = OOD >= s / all >= s.
  out_ge, in_ge = g.num_out - g.out_lt, g.num_in - g.in_lt
  precision = out_ge.astype(g.dtype) / (out_ge + in_ge).astype(g.dtype)
  return _average_precision(g.out_le - g.out_lt, precision, g.is_last, g.num_out)


def _metrics_from_groups(groups: _TieGroups, positive: str = "in") -> dict[str, jax.Array]:
  """The five `all_metrics` values, each [...], from one `_tie_groups` call."""
  return {
      "fpr95": _fpr_at_tpr(groups, 0.95, positive),
      "detection_error": _detection_error(groups),
      "auroc": _auroc(groups),
      "aupr_in": _aupr_in(groups),
      "aupr_out": _aupr_out(groups),
  }


def _pair_groups(scores_in, scores_out) -> _TieGroups:
  return _tie_groups(*_check_pair(scores_in, scores_out))


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
  return _fpr_at_tpr(_pair_groups(scores_in, scores_out), tpr, positive)


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
  return _detection_error(_pair_groups(scores_in, scores_out))


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
  return _auroc(_pair_groups(scores_in, scores_out))


def aupr_in(scores_in, scores_out) -> jax.Array:
  """Average precision with ID as the positive class and -score as the ranking score.

  Equals `sklearn.metrics.average_precision_score(is_in, -score)` (step-wise, no interpolation).

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.

  Returns:
    [] float32 in (0, 1]; N / (N + M) when all scores are tied.
  """
  return _aupr_in(_pair_groups(scores_in, scores_out))


def aupr_out(scores_in, scores_out) -> jax.Array:
  """Average precision with OOD as the positive class and score as the ranking score.

  Equals `sklearn.metrics.average_precision_score(is_out, score)`.

  Args:
    scores_in: [N] scores of in-distribution inputs (higher = more OOD).
    scores_out: [M] scores of out-of-distribution inputs.

  Returns:
    [] float32 in (0, 1]; M / (N + M) when all scores are tied.
  """
  return _aupr_out(_pair_groups(scores_in, scores_out))


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
  _check_positive(positive)
  return _metrics_from_groups(_pair_groups(scores_in, scores_out), positive)


def _metrics_grid(scores_in: jax.Array, scores_out: jax.Array) -> dict[str, jax.Array]:
  # The whole grid in one `_tie_groups` call (one callback on CPU), not a vmap of all_metrics.
  dtype = jnp.promote_types(jnp.promote_types(scores_in.dtype, scores_out.dtype), jnp.float32)
  return _metrics_from_groups(_tie_groups(scores_in.astype(dtype), scores_out.astype(dtype)))


_metrics_grid_jit = jax.jit(_metrics_grid)


def metrics_grid(scores_in, scores_out) -> dict[str, jax.Array]:
  """`metrics.all_metrics` for every grid point of two score grids, in one compiled call.

  The whole grid goes through one sort (`_tie_groups`: numpy behind one callback on CPU, `lax.sort`
  elsewhere), so a [10, 21, 10000] x [10, 21, 10000] grid takes ~0.15 s on 2 CPU cores, ~15x a
  scikit-learn loop over the 210 configurations (`benchmarks/metrics_grid.py`).

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


# Open-set recognition: K known classes plus "unknown" (label K), scored by macro-F1.


def _check_labels(values, name: str, num_labels: int) -> jax.Array:
  """[N] int32 class labels in [0, num_labels); the range is checked when concrete."""
  values = jnp.asarray(values)
  if values.ndim != 1 or values.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {values.shape}.")
  if not jnp.issubdtype(values.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {values.dtype}.")
  if not isinstance(values, jax.core.Tracer):
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_labels:
      raise ValueError(f"{name} must lie in [0, {num_labels}), got values in [{low}, {high}].")
  return values.astype(jnp.int32)


def open_set_predictions(scores, classes, threshold, num_classes: int) -> jax.Array:
  """Open-set labels: the closed-set class where the input is accepted as ID, else "unknown".

  An input is accepted when `score <= threshold`, the convention of this module; e.g. for VMDLS_b
  the score is -l and the class c_max (Dinari & Freifeld 2022, Sec. 3.2: y = c_max if l > lambda,
  else OOD; we accept the tie l = lambda too, so that a threshold from `threshold_at_tpr`, which
  is an observed score, accepts at least the requested fraction). Fix the threshold on ID data
  only (training or validation set), e.g. `threshold_at_tpr(id_scores, 0.95)` (their Remark 2).

  Args:
    scores: [N] detector scores, higher = more OOD.
    classes: [N] int, the closed-set prediction of each input, in [0, num_classes).
    threshold: scalar; may be traced (e.g. vmapped over a sweep).
    num_classes: K, the number of known classes; K is the "unknown" label.

  Returns:
    [N] int32 labels in [0, K].
  """
  scores = check_scores(scores)
  classes = _check_labels(classes, "classes", num_classes)
  if classes.shape != scores.shape:
    raise ValueError(f"scores and classes must have the same shape, got {scores.shape} and "
                     f"{classes.shape}.")
  return jnp.where(scores <= threshold, classes, num_classes)


def open_set_f1(labels, predictions, num_classes: int) -> jax.Array:
  """Macro-averaged F1 over the K known classes and "unknown" (K + 1 labels).

  F1_k = 2 TP_k / (#true_k + #predicted_k), the harmonic mean of precision and recall, averaged
  with equal weight over k = 0..K as in open-set recognition benchmarks (Dinari & Freifeld 2022,
  Sec. 4; Sun et al. 2020). A label with no true and no predicted example has F1 = 0 and still
  counts in the average, so this equals
  `sklearn.metrics.f1_score(labels, predictions, labels=range(K + 1), average="macro",
  zero_division=0)`. (The authors' released code omits `labels=` and so averages over the labels
  present; on a test set where every label occurs the two agree.) Counts are integer bincounts,
  with no loop over classes; jittable with `num_classes` static, and vmappable.

  Args:
    labels: [N] int true labels in [0, K], K = unknown (OOD).
    predictions: [N] int predicted labels in [0, K], e.g. from `open_set_predictions`.
    num_classes: K, a Python int (it fixes the shapes).

  Returns:
    [] float32 in [0, 1].
  """
  num_labels = int(num_classes) + 1
  labels = _check_labels(labels, "labels", num_labels)
  predictions = _check_labels(predictions, "predictions", num_labels)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels and predictions must have the same shape, got {labels.shape} and "
                     f"{predictions.shape}.")
  num_true = jnp.bincount(labels, length=num_labels)  # [K + 1]
  num_predicted = jnp.bincount(predictions, length=num_labels)  # [K + 1]
  # Misses go to an extra bin that is dropped: the hits per label are the true positives.
  hits = jnp.bincount(jnp.where(labels == predictions, labels, num_labels),
                      length=num_labels + 1)[:num_labels]  # [K + 1]
  support = num_true + num_predicted
  f1 = jnp.where(support > 0, (2 * hits).astype(jnp.float32) / jnp.maximum(support, 1), 0.0)
  return jnp.mean(f1)
