"""OOD metrics against scikit-learn (float64) and against numbers worked out by hand.

Each new pair of input shapes costs a compilation (~1 s on 2 cores), so the tests reuse a few
shapes and go through one jitted function that returns every metric.
"""
from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from oodjax import metrics

KEYS = ("fpr95", "detection_error", "auroc", "aupr_in", "aupr_out")
ATOL = 1e-6  # float32 ratios and means against sklearn's float64


def sklearn_reference(scores_in, scores_out, tpr=0.95) -> dict[str, float]:
  """Every metric from sklearn, in float64, straight from the definitions in the brief."""
  is_in = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
  scores = np.r_[scores_in, scores_out].astype(np.float64)
  # ID positive: rank by -score, so "predicted positive" is "score <= threshold".
  fpr, tpr_in, thresholds = skm.roc_curve(is_in, -scores, drop_intermediate=False)
  first_reaching = np.argmax(tpr_in >= tpr)  # TPR and FPR both rise along the curve
  # OOD positive: rank by score, so "predicted positive" is "score >= threshold".
  fpr_o, tpr_o, thresholds_o = skm.roc_curve(1 - is_in, scores, drop_intermediate=False)
  first_reaching_o = np.argmax(tpr_o >= tpr)
  return {
      "fpr95": fpr[tpr_in >= tpr].min(),
      "detection_error": (0.5 * (1 - tpr_in) + 0.5 * fpr).min(),
      "auroc": skm.roc_auc_score(is_in, -scores),
      "aupr_in": skm.average_precision_score(is_in, -scores),
      "aupr_out": skm.average_precision_score(1 - is_in, scores),
      "fpr_out_positive": fpr_o[tpr_o >= tpr].min(),
      "threshold_in": -thresholds[first_reaching],
      "threshold_out": thresholds_o[first_reaching_o],
  }


@jax.jit
def everything(scores_in, scores_out, tpr=0.95):
  """Every public metric in one compiled call; `tpr` is traced, so sweeping it reuses the code."""
  out = dict(metrics.all_metrics(scores_in, scores_out))
  out["fpr95"] = metrics.fpr_at_tpr(scores_in, scores_out, tpr)  # all_metrics pins 0.95
  out["tnr_in_positive"] = metrics.tnr_at_tpr(scores_in, scores_out, tpr)
  out["fpr_out_positive"] = metrics.fpr_at_tpr(scores_in, scores_out, tpr, positive="out")
  out["tnr_out_positive"] = metrics.tnr_at_tpr(scores_in, scores_out, tpr, positive="out")
  out["detection_error_out_positive"] = metrics.detection_error(scores_in, scores_out,
                                                                positive="out")
  out["threshold_in"] = metrics.threshold_at_tpr(scores_in, tpr)
  out["threshold_out"] = metrics.threshold_at_tpr(scores_out, tpr, positive="out")
  return out


def assert_matches_sklearn(scores_in, scores_out, tpr=0.95):
  got = {k: float(v) for k, v in everything(scores_in, scores_out, tpr).items()}
  want = sklearn_reference(scores_in, scores_out, tpr)
  for key in KEYS + ("fpr_out_positive", "threshold_in", "threshold_out"):
    np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=key)
  np.testing.assert_allclose(got["tnr_in_positive"], 1 - want["fpr95"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(got["tnr_out_positive"], 1 - want["fpr_out_positive"], atol=ATOL,
                             rtol=0)
  # Both conventions visit the same partitions, and the error is symmetric in the two classes.
  np.testing.assert_allclose(got["detection_error_out_positive"], want["detection_error"],
                             atol=ATOL, rtol=0)
  # The threshold is the operating point fpr_at_tpr reports, seen from the other side.
  np.testing.assert_allclose(got["fpr95"], np.mean(scores_out <= got["threshold_in"]), atol=ATOL)
  np.testing.assert_allclose(got["fpr_out_positive"], np.mean(scores_in >= got["threshold_out"]),
                             atol=ATOL)
  return got


def _case(name: str, rng: np.random.Generator):
  """(scores_in, scores_out) float32, ID scoring lower on average (a working detector)."""
  n_in, n_out = 300, 200
  if name == "continuous":
    return rng.normal(size=n_in), rng.normal(1.0, size=n_out)
  if name == "heavy_ties":  # three score values only
    return np.round(rng.normal(size=n_in)), np.round(rng.normal(0.5, size=n_out))
  if name == "rounded":  # many ties, but more than a handful of values
    return np.round(rng.normal(size=n_in), 1), np.round(rng.normal(0.5, size=n_out), 1)
  if name == "constant":
    return np.full(n_in, 3.0), np.full(n_out, 3.0)
  if name == "perfect":
    return rng.uniform(0, 1, n_in), rng.uniform(2, 3, n_out)
  if name == "reversed":
    return rng.uniform(2, 3, n_in), rng.uniform(0, 1, n_out)
  if name == "touching":  # perfect except that the extremes tie
    return np.r_[rng.uniform(0, 1, n_in - 1), 1.0], np.r_[1.0, rng.uniform(1, 2, n_out - 1)]
  if name == "tiny":
    return rng.normal(size=1), rng.normal(size=1)
  if name == "tiny_tied":
    return np.array([0.5]), np.array([0.5])
  if name == "imbalanced_few_in":
    return rng.normal(size=5), rng.normal(1.0, size=2000)
  if name == "imbalanced_few_out":
    return rng.normal(size=2000), rng.normal(1.0, size=5)
  raise ValueError(name)


CASES = ("continuous", "heavy_ties", "rounded", "constant", "perfect", "reversed", "touching",
         "tiny", "tiny_tied", "imbalanced_few_in", "imbalanced_few_out")


@pytest.mark.parametrize("name", CASES)
def test_matches_sklearn(name):
  scores_in, scores_out = _case(name, np.random.default_rng(CASES.index(name)))
  got = assert_matches_sklearn(scores_in.astype(np.float32), scores_out.astype(np.float32))
  assert not any(np.isnan(v) for v in got.values())


def test_degenerate_values():
  """The values the brief fixes for all-tied scores, and for perfect / reversed separation."""
  rng = np.random.default_rng(0)
  tied = everything(*(s.astype(np.float32) for s in _case("constant", rng)))
  np.testing.assert_allclose([float(tied[k]) for k in KEYS], [1.0, 0.5, 0.5, 0.6, 0.4],
                             atol=ATOL)
  perfect = everything(*(s.astype(np.float32) for s in _case("perfect", rng)))
  np.testing.assert_allclose([float(perfect[k]) for k in KEYS], [0.0, 0.0, 1.0, 1.0, 1.0],
                             atol=ATOL)
  worst = everything(*(s.astype(np.float32) for s in _case("reversed", rng)))
  # Accepting 95% of ID accepts every OOD input; the best threshold is to accept nothing.
  np.testing.assert_allclose([float(worst[k]) for k in ("fpr95", "detection_error", "auroc")],
                             [1.0, 0.5, 0.0], atol=ATOL)


def test_hand_worked_example():
  # ID = [1, 2, 3, 4], OOD = [2, 3.5, 5, 6, 7]; accept as ID when score <= t.
  #   t      accepted ID  accepted OOD  TPR   FPR   0.5(1-TPR) + 0.5 FPR
  #   none   0            0             0     0     0.5
  #   1      1            0             0.25  0     0.375
  #   2      2            1 (the tie)   0.5   0.2   0.35
  #   3      3            1             0.75  0.2   0.225
  #   3.5    3            2             0.75  0.4   0.325
  #   4      4            2             1     0.4   0.2    <- detection error 0.2
  #   5..7   4            3..5          1     0.6+  0.3+
  # FPR@95: TPR >= 0.95 needs all four ID accepted, t = 4: FPR = 2/5 = 0.4.
  # At TPR 0.75 (reached exactly at t = 3): FPR 0.2.
  # OOD positive (flag when score >= t): flagging all five OOD needs t <= 2, which flags ID
  # {2, 3, 4}: FPR 3/4 = 0.75 at threshold 2.
  # AUROC: ID scores below each OOD score, ties counted 1/2: 1.5 + 3 + 4 + 4 + 4 = 16.5 of 20.
  scores_in = np.array([1, 2, 3, 4], np.float32)
  scores_out = np.array([2, 3.5, 5, 6, 7], np.float32)
  got = {k: float(v) for k, v in everything(scores_in, scores_out).items()}
  assert got["fpr95"] == pytest.approx(0.4)
  assert got["tnr_in_positive"] == pytest.approx(0.6)
  assert got["threshold_in"] == 4.0
  assert got["detection_error"] == pytest.approx(0.2)
  assert got["fpr_out_positive"] == pytest.approx(0.75)
  assert got["threshold_out"] == 2.0
  assert got["auroc"] == pytest.approx(16.5 / 20)
  assert float(everything(scores_in, scores_out, 0.75)["fpr95"]) == pytest.approx(0.2)
  assert_matches_sklearn(scores_in, scores_out)


def test_eager_calls_and_integer_scores():
  # The hand-worked example again, without jit and with integer ID scores (promoted to float32).
  scores_in, scores_out = np.array([1, 2, 3, 4]), np.array([2, 3.5, 5, 6, 7])
  result = metrics.all_metrics(scores_in, scores_out)
  assert float(result["fpr95"]) == pytest.approx(0.4)
  assert float(result["detection_error"]) == pytest.approx(0.2)
  assert float(result["auroc"]) == pytest.approx(16.5 / 20)
  assert all(v.dtype == jnp.float32 for v in result.values())
  assert float(metrics.threshold_at_tpr(scores_in, 0.75)) == 3.0


def test_tpr_reached_exactly():
  """285 of 300 ID accepted is TPR 0.95 exactly: it counts as reaching 0.95, as in sklearn."""
  scores_in = np.arange(300, dtype=np.float32)  # 285 of them are <= 284
  scores_out = np.r_[284.5, np.full(199, 1000.0)].astype(np.float32)  # shapes as in CASES
  assert float(everything(scores_in, scores_out)["fpr95"]) == 0.0  # t = 284 accepts no OOD
  assert_matches_sklearn(scores_in, scores_out)


def test_traced_tpr_sweep_matches_sklearn():
  rng = np.random.default_rng(1)
  scores_in, scores_out = (s.astype(np.float32) for s in _case("rounded", rng))
  tprs = [0.0, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]  # 0.99 of 300 is reached exactly
  fprs = jax.vmap(metrics.fpr_at_tpr, in_axes=(None, None, 0))(scores_in, scores_out,
                                                               jnp.array(tprs))
  # sklearn gets the Python floats: float32(0.99) widened to float64 exceeds 297 / 300.
  want = [sklearn_reference(scores_in, scores_out, t)["fpr95"] for t in tprs]
  np.testing.assert_allclose(fprs, want, atol=ATOL)


@hypothesis.settings(max_examples=50, deadline=None, database=None)
@hypothesis.given(
    n_in=st.sampled_from([1, 25]), n_out=st.sampled_from([4, 25]),
    levels=st.sampled_from([1, 2, 4, 1000]), shift=st.integers(-3, 3),
    seed=st.integers(0, 2**32 - 1))
def test_matches_sklearn_property(n_in, n_out, levels, shift, seed):
  # Few sizes (compilation is the cost); `levels` distinct values controls how much ties.
  rng = np.random.default_rng(seed)
  scores_in = rng.integers(0, levels, n_in).astype(np.float32)
  scores_out = (rng.integers(0, levels, n_out) + shift).astype(np.float32)
  assert_matches_sklearn(scores_in, scores_out)


def test_vmap_over_sweep_equals_sklearn_loop_and_compiles_once():
  num_t, num_e, n_in, n_out = 3, 4, 50, 60
  rng = np.random.default_rng(2)
  # Each (temperature, epsilon) gets its own separation, rounded so that ties occur.
  shift = rng.uniform(-1, 2, (num_t, num_e, 1))
  scores_in = np.round(rng.normal(size=(num_t, num_e, n_in)), 1).astype(np.float32)
  scores_out = np.round(rng.normal(size=(num_t, num_e, n_out)) + shift, 1).astype(np.float32)

  traces = []

  def counted(scores_in, scores_out):
    traces.append(None)  # runs once per trace, not per call
    return metrics.all_metrics(scores_in, scores_out)

  table = jax.jit(jax.vmap(jax.vmap(counted)))
  got = table(scores_in, scores_out)
  got_again = table(scores_in[::-1], scores_out[::-1])
  assert len(traces) == 1
  assert set(got) == set(KEYS)
  for key in KEYS:
    assert got[key].shape == (num_t, num_e)
    np.testing.assert_array_equal(got_again[key], got[key][::-1])
  for t in range(num_t):
    for e in range(num_e):
      want = sklearn_reference(scores_in[t, e], scores_out[t, e])
      for key in KEYS:
        np.testing.assert_allclose(got[key][t, e], want[key], atol=ATOL, err_msg=f"{key}[{t},{e}]")


def test_vmap_with_shared_in_distribution_scores():
  rng = np.random.default_rng(3)
  scores_in = rng.normal(size=40).astype(np.float32)
  scores_out = (rng.normal(size=(5, 30)) + np.arange(5)[:, None]).astype(np.float32)
  fpr = jax.vmap(functools.partial(metrics.fpr_at_tpr, positive="out"), in_axes=(None, 0))(
      scores_in, scores_out)
  want = [sklearn_reference(scores_in, s)["fpr_out_positive"] for s in scores_out]
  np.testing.assert_allclose(fpr, want, atol=ATOL)


def test_jit_with_static_positive():
  f = jax.jit(metrics.fpr_at_tpr, static_argnames="positive")
  scores_in = np.array([1, 2, 3, 4], np.float32)
  scores_out = np.array([2, 3.5, 5, 6, 7], np.float32)
  assert float(f(scores_in, scores_out, positive="out")) == pytest.approx(0.75)  # hand example
  assert float(f(scores_in, scores_out)) == pytest.approx(0.4)


def test_float64_and_mixed_inputs_become_float32():
  result = metrics.all_metrics(np.array([1, 2, 3, 4], np.float64), np.array([2, 3.5, 5, 6, 7]))
  assert all(v.dtype == jnp.float32 for v in result.values())
  mixed = metrics.auroc(np.array([1, 2, 3, 4], np.int32), np.array([2, 3.5, 5, 6, 7], np.float16))
  assert float(mixed) == pytest.approx(16.5 / 20)


@pytest.mark.parametrize("fn", [metrics.fpr_at_tpr, metrics.tnr_at_tpr, metrics.detection_error,
                                metrics.auroc, metrics.aupr_in, metrics.aupr_out,
                                metrics.all_metrics])
def test_bad_shapes_raise_also_under_jit(fn):
  good = jnp.arange(3.0)
  for scores_in, scores_out in [(jnp.zeros(0), good), (good, jnp.zeros(0)),
                                (jnp.zeros((2, 3)), jnp.zeros((2, 3))), (jnp.float32(1), good)]:
    with pytest.raises(ValueError, match="scores_(in|out)"):
      fn(scores_in, scores_out)
    with pytest.raises(ValueError, match="scores_(in|out)"):
      jax.jit(fn)(scores_in, scores_out)


def test_nan_raises_when_concrete():
  good = np.arange(3.0)
  with pytest.raises(ValueError, match="scores_out contains NaN"):
    metrics.auroc(good, np.array([0.0, np.nan]))
  with pytest.raises(ValueError, match="scores_in contains NaN"):
    metrics.all_metrics(np.array([np.nan]), good)
  with pytest.raises(ValueError, match="contains NaN"):
    metrics.check_scores(np.array([1.0, np.nan]))
  with pytest.raises(ValueError, match="contains NaN"):
    metrics.threshold_at_tpr(np.array([1.0, np.nan]))
  # Infinities are ordinary extreme scores.
  assert float(metrics.auroc(np.array([-np.inf, 0.0]), np.array([np.inf]))) == 1.0


def test_check_scores_passes_tracers_through():
  # Under jit the values are unknown, so only the static checks run; valid input works.
  doubled = jax.jit(lambda s: 2 * metrics.check_scores(s))(np.array([1, 2], np.int32))
  np.testing.assert_array_equal(doubled, [2.0, 4.0])
  assert doubled.dtype == jnp.float32


def test_bad_arguments_raise():
  good = np.arange(3.0)
  with pytest.raises(ValueError, match="positive"):
    metrics.fpr_at_tpr(good, good, positive="ood")
  with pytest.raises(ValueError, match="positive"):
    metrics.threshold_at_tpr(good, positive="OUT")
  with pytest.raises(ValueError, match="tpr"):
    metrics.fpr_at_tpr(good, good, tpr=95)
  with pytest.raises(ValueError, match="tpr"):
    metrics.threshold_at_tpr(good, tpr=-0.1)


# The sort behind every metric: XLA's `lax.sort` (GPU/TPU) or numpy behind `jax.pure_callback`
# (CPU). Both are forced here, whichever backend runs the tests.
SORTS = ("xla", "numpy")
GROUP_FIELDS = ("in_lt", "in_le", "out_lt", "out_le")


def _metrics_with(sort: str, positive: str = "in"):
  """all_metrics on [..., N] x [..., M] grids, with the sort path forced."""
  def fn(scores_in, scores_out):
    return metrics._metrics_from_groups(metrics._tie_groups(scores_in, scores_out, sort), positive)
  return fn


def _groups_with(sort: str):
  """The tie-group counts at the distinct scores, as a dict, with the sort path forced."""
  def fn(scores_in, scores_out):
    groups = metrics._tie_groups(scores_in, scores_out, sort)
    return {"is_last": groups.is_last, **{k: getattr(groups, k) for k in GROUP_FIELDS}}
  return fn


def _tied_grid(rng, shape_in, shape_out):
  """float32 scores on a coarse lattice (many ties across and within sets), with -0.0, 0.0 and
  infinities mixed in."""
  scores_in = np.round(rng.normal(size=shape_in), 0) / 2
  scores_out = np.round(rng.normal(0.5, size=shape_out), 0) / 2
  for scores in (scores_in, scores_out):
    flat = scores.reshape(-1, scores.shape[-1])
    flat[:, 0], flat[:, 1] = -0.0, 0.0
    flat[::2, 2], flat[1::2, 2] = np.inf, -np.inf
  return scores_in.astype(np.float32), scores_out.astype(np.float32)


def _reference_counts(scores_in, scores_out) -> dict[str, np.ndarray]:
  """ID / OOD scores below and at each distinct score, by numpy searchsorted."""
  distinct = np.unique(np.r_[scores_in, scores_out])  # -0.0 and 0.0 are one value
  sorted_in, sorted_out = np.sort(scores_in), np.sort(scores_out)
  return {"in_lt": np.searchsorted(sorted_in, distinct, "left"),
          "in_le": np.searchsorted(sorted_in, distinct, "right"),
          "out_lt": np.searchsorted(sorted_out, distinct, "left"),
          "out_le": np.searchsorted(sorted_out, distinct, "right")}


@pytest.mark.parametrize("sort", SORTS)
def test_tie_group_counts_match_searchsorted(sort):
  rng = np.random.default_rng(4)
  scores_in, scores_out = _tied_grid(rng, (2, 3, 40), (2, 3, 30))
  got = jax.jit(_groups_with(sort))(scores_in, scores_out)
  for index in np.ndindex(2, 3):
    want = _reference_counts(scores_in[index], scores_out[index])
    is_last = np.asarray(got["is_last"][index])
    assert is_last.sum() == len(want["in_lt"])  # one entry per distinct score
    for key in GROUP_FIELDS:
      np.testing.assert_array_equal(np.asarray(got[key][index])[is_last], want[key],
                                    err_msg=f"{sort} {key}{index}")


def test_xla_and_numpy_sorts_agree_on_a_tied_grid_under_jit_and_vmap():
  num_t, num_e, n_in, n_out = 3, 4, 60, 45
  scores_in, scores_out = _tied_grid(np.random.default_rng(5), (num_t, num_e, n_in),
                                     (num_t, num_e, n_out))
  results = {}
  for sort in SORTS:
    # The grid in one call (as metrics_grid does), and the 1-D core under two vmaps.
    results[sort, "grid"] = jax.jit(_metrics_with(sort))(scores_in, scores_out)
    results[sort, "vmap"] = jax.jit(jax.vmap(jax.vmap(_metrics_with(sort))))(scores_in,
                                                                             scores_out)
    results[sort, "out"] = jax.jit(_metrics_with(sort, "out"))(scores_in, scores_out)
  for key in KEYS:  # the same integers, so the same floats: equal to the bit
    for how in ("grid", "vmap", "out"):
      np.testing.assert_array_equal(results["numpy", how][key], results["xla", how][key],
                                    err_msg=f"{how} {key}")
    np.testing.assert_array_equal(results["numpy", "vmap"][key], results["numpy", "grid"][key])
  np.testing.assert_array_equal(metrics.metrics_grid(scores_in, scores_out)["auroc"],
                                results["xla", "grid"]["auroc"])
  for t in range(num_t):
    for e in range(num_e):
      # sklearn refuses infinities; a huge finite score keeps the same order and ties.
      want = sklearn_reference(*(np.clip(s[t, e].astype(np.float64), -1e30, 1e30)
                                 for s in (scores_in, scores_out)))
      for key in KEYS:
        np.testing.assert_allclose(results["xla", "grid"][key][t, e], want[key], atol=ATOL,
                                   err_msg=f"{key}[{t},{e}]")
      np.testing.assert_allclose(results["xla", "out"]["fpr95"][t, e], want["fpr_out_positive"],
                                 atol=ATOL)


def test_numpy_sort_in_blocks_over_threads(monkeypatch):
  # Small blocks, so that the host splits 12 rows over several blocks and threads.
  monkeypatch.setattr(metrics, "_BLOCK_SAMPLES", 64)
  scores_in, scores_out = _tied_grid(np.random.default_rng(6), (12, 25), (12, 20))
  got = jax.jit(_groups_with("numpy"))(scores_in, scores_out)
  want = jax.jit(_groups_with("xla"))(scores_in, scores_out)
  for key in got:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_vmap_with_shared_scores_on_both_sorts():
  rng = np.random.default_rng(7)
  scores_in = np.round(rng.normal(size=40), 1).astype(np.float32)
  scores_out = np.round(rng.normal(size=(5, 30)) + np.arange(5)[:, None], 1).astype(np.float32)
  for sort in SORTS:
    got = jax.jit(jax.vmap(_metrics_with(sort), in_axes=(None, 0)))(scores_in, scores_out)
    for m, row in enumerate(scores_out):
      want = sklearn_reference(scores_in, row)
      for key in KEYS:
        np.testing.assert_allclose(got[key][m], want[key], atol=ATOL, err_msg=f"{sort} {key}")


def test_float64_with_x64_on_both_sorts():
  rng = np.random.default_rng(8)
  # Distinct in float64 but tied in float32: float64 must be kept all the way through.
  base = rng.normal(size=(2, 50))
  scores_in = np.r_[base[0], base[0, :10] + 1e-12]
  scores_out = np.r_[base[1] + 0.5, base[0, :10]]
  want = sklearn_reference(scores_in, scores_out)
  with jax.enable_x64(True):
    got = {}
    for sort in SORTS:
      got[sort] = jax.jit(_metrics_with(sort))(jnp.asarray(scores_in), jnp.asarray(scores_out))
    public = metrics.all_metrics(scores_in, scores_out)
    grid = metrics.metrics_grid(scores_in[None], scores_out[None])
    for key in KEYS:
      assert got["xla"][key].dtype == public[key].dtype == jnp.float64
      np.testing.assert_array_equal(got["numpy"][key], got["xla"][key], err_msg=key)
      np.testing.assert_allclose(public[key], want[key], atol=1e-12, rtol=0, err_msg=key)
      np.testing.assert_allclose(grid[key][0], want[key], atol=1e-12, rtol=0, err_msg=key)
