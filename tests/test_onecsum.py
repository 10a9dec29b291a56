"""1C-Sum: noise statistics (reproducible, against direct moments), file round trip, the sum."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.detectors import onecsum, whitebox
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
  result = onecsum.supervised_upper_bound(scores_in, scores_out)
  assert result["auroc"] > 0.999
  same = onecsum.supervised_upper_bound({"a": rng.normal(size=300)},
                                        {"a": rng.normal(size=300)})
  assert 0.35 < same["auroc"] < 0.65
