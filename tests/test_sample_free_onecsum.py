"""1C-Sum: noise statistics (reproducible, against direct moments), file round trip, the sum."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.detectors.sample_free import onecsum, supervised, whitebox
from oodjax.models import get_model

SHAPE = (8, 8, 1)
MEAN, STD = 0.3, 0.2


@pytest.fixture(scope="module")
def net():
  model = get_model("small_cnn_tiny", 3)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + SHAPE))


@pytest.fixture(scope="module")
def stats_24(net):
  return onecsum.fit_noise_stats(*net, SHAPE, MEAN, STD, n=40, seed=7, batch_size=24)


def test_noise_stats_match_direct_moments_and_do_not_depend_on_batching(net, stats_24):
  model, variables = net
  stats_40 = onecsum.fit_noise_stats(model, variables, SHAPE, MEAN, STD, n=40, seed=7,
                                     batch_size=40)
  # Independent reference: the 40 noise images rebuilt from their keys, all indicators at once.
  keys = jax.random.split(jax.random.key(7), 40)
  u = np.stack([np.asarray(jax.random.uniform(k, SHAPE)) for k in keys])
  assert u.min() >= 0 and u.max() < 1
  scores = jax.jit(whitebox.indicators, static_argnums=0)(model, variables,
                                                         jnp.asarray((u - MEAN) / STD))
  assert set(stats_24["indicators"]) == set(onecsum.ONE_C_SUM_INDICATORS)
  for name, entry in stats_24["indicators"].items():
    values = np.asarray(scores[name], np.float64)
    np.testing.assert_allclose(entry["mean"], values.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(entry["std"], values.std(ddof=1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats_40["indicators"][name]["mean"], entry["mean"], rtol=1e-6)
    np.testing.assert_allclose(stats_40["indicators"][name]["std"], entry["std"], rtol=1e-5,
                               atol=1e-9)


def test_noise_stats_are_reproducible_from_the_seed(net, stats_24):
  again = onecsum.fit_noise_stats(*net, SHAPE, MEAN, STD, n=40, seed=7, batch_size=24)
  assert again == stats_24
  other = onecsum.fit_noise_stats(*net, SHAPE, MEAN, STD, n=40, seed=8, batch_size=24)
  assert other["indicators"]["NORM"]["mean"] != stats_24["indicators"]["NORM"]["mean"]


def test_save_load_round_trip(tmp_path, stats_24):
  path = tmp_path / "noise.json"
  onecsum.save_noise_stats(path, stats_24)
  assert onecsum.load_noise_stats(path) == stats_24
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"indicators": {}}))
  with pytest.raises(ValueError, match="not an"):
    onecsum.load_noise_stats(bad)


def test_one_c_sum_by_hand():
  scores = {"A": jnp.asarray([1.0, 3.0]), "B": jnp.asarray([10.0, 0.0]),
            "C": jnp.asarray([5.0, 6.0]), "unused": jnp.asarray([1e9, 1e9])}
  stats = {"indicators": {"A": {"mean": 1.0, "std": 2.0}, "B": {"mean": 4.0, "std": 3.0},
                          "C": {"mean": 5.0, "std": 0.0}}}  # std 0: left out
  # (1-1)/2 + (10-4)/3 = 2;  (3-1)/2 + (0-4)/3 = -1/3.
  np.testing.assert_allclose(onecsum.one_c_sum(scores, stats), [2.0, -1 / 3], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(onecsum.one_c_sum)(scores, stats), [2.0, -1 / 3],
                             rtol=1e-6)
  with pytest.raises(KeyError, match="C"):
    onecsum.one_c_sum({"A": scores["A"], "B": scores["B"]}, stats)


def test_supervised_upper_bound_separates_what_is_separable():
  rng = np.random.default_rng(0)
  # Each indicator alone overlaps; their difference separates the sets perfectly.
  a_in = rng.normal(size=200)
  a_out = rng.normal(size=200)
  scores_in = {"a": a_in, "b": a_in - 1.0}
  scores_out = {"a": a_out, "b": a_out + 1.0}
  result = _fit_and_score(scores_in, scores_out)
  assert result["auroc"] > 0.999
  same = _fit_and_score({"a": rng.normal(size=300)}, {"a": rng.normal(size=300)})
  assert 0.35 < same["auroc"] < 0.65


def _fit_and_score(scores_in, scores_out, seed=0):
  """The paper's protocol: fit on a random half of each set, AUROC on the other half."""
  from sklearn.metrics import roc_auc_score
  n_in, n_out = len(next(iter(scores_in.values()))), len(next(iter(scores_out.values())))
  fit_in, eval_in, fit_out, eval_out = supervised.paper_halves(n_in, n_out, seed)
  pick = lambda d, idx: {k: np.asarray(v)[idx] for k, v in d.items()}
  weights = supervised.fit_supervised(pick(scores_in, fit_in), pick(scores_out, fit_out))
  s_in = supervised.supervised_score(pick(scores_in, eval_in), weights)
  s_out = supervised.supervised_score(pick(scores_out, eval_out), weights)
  labels = np.r_[np.zeros(len(eval_in)), np.ones(len(eval_out))]
  return {"auroc": roc_auc_score(labels, np.r_[s_in, s_out])}


def test_supervised_score_is_sklearns_decision_function():
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  rng = np.random.default_rng(1)
  f_in = {"a": rng.normal(size=50), "b": rng.normal(2.0, 3.0, size=50)}
  f_out = {"a": rng.normal(1.0, size=40), "b": rng.normal(size=40)}
  weights = supervised.fit_supervised(f_in, f_out)
  x = np.r_[np.c_[f_in["a"], f_in["b"]], np.c_[f_out["a"], f_out["b"]]]
  scaler = StandardScaler().fit(x)
  clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x), np.r_[np.zeros(50), np.ones(40)])
  want = clf.decision_function(scaler.transform(x))
  got = supervised.supervised_score({"a": jnp.asarray(x[:, 0], jnp.float32),
                                     "b": jnp.asarray(x[:, 1], jnp.float32)}, weights)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_paper_halves_partition_each_set():
  fit_in, eval_in, fit_out, eval_out = supervised.paper_halves(11, 8, seed=3)
  assert (len(fit_in), len(eval_in), len(fit_out), len(eval_out)) == (5, 6, 4, 4)
  assert sorted(np.r_[fit_in, eval_in]) == list(range(11))
  assert sorted(np.r_[fit_out, eval_out]) == list(range(8))
  # The ID half does not depend on the OOD set's size.
  assert np.array_equal(supervised.paper_halves(11, 30, seed=3)[0], fit_in)
