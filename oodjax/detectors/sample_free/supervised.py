"""The sample-free paper's "supervised" row: a linear classifier on every indicator.

An upper reference, not a practical detector: it is fitted on labelled ID and OOD samples of the
very distributions it is tested on. `fit_supervised` trains a logistic regression on
standardised indicators (the paper uses a linear SVM; any linear classifier serves as this
unrealistic upper reference) and returns its weights as a pytree; `supervised_score` is its
decision function, so the row is scored by the same compiled path as every other detector.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021, Section 3, "Supervised results".
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


def paper_halves(n_in: int, n_out: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The paper's split: a random half of each set trains the classifier, the rest tests it.

  Args:
    n_in: N, ID samples (>= 2).
    n_out: M, OOD samples (>= 2).
    seed: seed of the permutations (the ID one is drawn first, so it does not depend on M).

  Returns:
    (fit_in [N // 2], eval_in, fit_out [M // 2], eval_out): int64 indices.
  """
  rng = np.random.default_rng(seed)
  perm_in, perm_out = rng.permutation(n_in), rng.permutation(n_out)
  return perm_in[:n_in // 2], perm_in[n_in // 2:], perm_out[:n_out // 2], perm_out[n_out // 2:]


def fit_supervised(features_in: Mapping[str, Any], features_out: Mapping[str, Any], *,
                   names: Sequence[str] | None = None) -> dict[str, Any]:
  """Logistic regression (scikit-learn, L2, C = 1) of OOD vs ID on standardised indicators.

  Args:
    features_in: {indicator: [N]} of ID samples (N >= 2).
    features_out: {indicator: [M]} of OOD samples (M >= 2).
    names: the indicators to use, in the order they are fitted; default every key of
      `features_in`.

  Returns:
    {"mean": {name: []}, "scale": {name: []} (the standardisation), "coef": {name: []},
    "intercept": []}, float32 arrays; `supervised_score` applies them. OOD is the positive
    class, so the decision function is higher for more OOD inputs.
  """
  # Imported here: only this fit needs scikit-learn (a core dependency all the same).
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  names = list(features_in) if names is None else list(names)
  x_in = np.stack([np.asarray(features_in[k], np.float64) for k in names], axis=1)  # [N, F]
  x_out = np.stack([np.asarray(features_out[k], np.float64) for k in names], axis=1)  # [M, F]
  train_x = np.concatenate([x_in, x_out])
  train_y = np.concatenate([np.zeros(len(x_in)), np.ones(len(x_out))])  # OOD = 1
  scaler = StandardScaler().fit(train_x)
  clf = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_y)

  def per_name(values):
    return {k: jnp.float32(v) for k, v in zip(names, values)}

  return {"mean": per_name(scaler.mean_), "scale": per_name(scaler.scale_),
          "coef": per_name(clf.coef_[0]), "intercept": jnp.float32(clf.intercept_[0])}


def supervised_score(features: Mapping[str, jax.Array], weights: Mapping[str, Any]) -> jax.Array:
  """The fitted classifier's decision function, higher = more OOD.

  Args:
    features: {indicator: [B]}, holding at least the indicators of `weights`.
    weights: `fit_supervised`'s output.

  Returns:
    [B] scores sum_f coef_f (x_f - mean_f) / scale_f + intercept.
  """
  total = weights["intercept"]
  for name, coef in weights["coef"].items():
    chex.assert_rank(features[name], 1)
    total = total + coef * (features[name] - weights["mean"][name]) / weights["scale"][name]
  return total
