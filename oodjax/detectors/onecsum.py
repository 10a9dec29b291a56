"""1C-Sum: the sample-free summary of the white-box indicators, and its supervised upper bound.

1C-Sum (Eq. 31) standardises each indicator h_i by its mean mu_i and standard deviation
sigma_i under uniform noise and sums the results, H(x) = sum_i (h_i(x) - mu_i) / sigma_i:

    stats = fit_noise_stats(model, variables, (28, 28, 1), mean, std)  # once, no data needed
    save_noise_stats("noise_stats.json", stats)
    scores = one_c_sum(indicators(model, variables, x), stats)  # [B], higher = more OOD

The noise statistics are the only thing fitted; they depend on the network and on the ID
normalisation, never on ID or OOD samples. `supervised_upper_bound` is the paper's "supervised"
row: a linear classifier on all indicators, trained on half of labelled ID and OOD samples.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021, Section 4 (Eq. 31) and Section 3 ("Supervised results").
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oodjax.detectors.whitebox import indicators

# "All indicators, except the IN- indicators and ODIN" (Section 4), read as the rows of the
# paper's Tables 4-5 minus those: ANG+ (only in Table 2) is left out so that angularity does
# not count three times.
ONE_C_SUM_INDICATORS = ("MP", "H", "T1000", "NORM", "NORM+", "ANG", "ANG++", "PROJ", "ACT",
                        "ACT+", "DMS", "DMS-AOS", "DSS", "DSS-EXT")

_FORMAT = "oodjax-noise-stats"
_VERSION = 1


def _normalised_noise(keys: jax.Array, image_shape: tuple[int, ...], mean: jax.Array,
                      std: jax.Array) -> jax.Array:
  """[B, *image_shape] images with pixels U(0, 1), one image per key, then (u - mean) / std."""
  u = jax.vmap(lambda key: jax.random.uniform(key, image_shape))(keys)
  shape = (1,) * len(image_shape) + (image_shape[-1],)  # broadcast per channel, explicitly
  return (u - mean.reshape(shape)) / std.reshape(shape)


def fit_noise_stats(model: nn.Module, variables: Mapping[str, Any],
                    image_shape: Sequence[int], mean: Any, std: Any, *, n: int = 10_000,
                    seed: int = 0, batch_size: int = 500,
                    members: Sequence[str] | None = None) -> dict[str, Any]:
  """Means and standard deviations of the 1C-Sum indicators on uniform noise.

  Image i has pixels drawn from U(0, 1) with the i-th key of `jax.random.split(key(seed), n)`,
  then normalised like ID inputs; so the images, and the statistics up to float64 summation
  order, do not depend on `batch_size`. Indicators are computed in jitted batches (the last
  batch is padded, so there is one compilation) and accumulated in float64 with Chan's
  pairwise update; sigma_i uses the unbiased (N - 1) variance.

  Args:
    model: a Flax Linen classifier.
    variables: its variables.
    image_shape: (H, W, C) of one network input.
    mean: ID mean per channel, scalar or [C] (in [0, 1] pixel units).
    std: ID std per channel, scalar or [C].
    n: number N of noise images (paper's setting here: 10,000).
    seed: seed of the noise.
    batch_size: images per forward pass.
    members: indicators to standardise; default `ONE_C_SUM_INDICATORS`, keeping those the
      model supports (`available_indicators`).

  Returns:
    {"indicators": {name: {"mean": float, "std": float}}, "n", "seed", "image_shape",
    "input_mean", "input_std"}: plain JSON-able Python values.

  References:
    Begon & Geurts 2021, Section 4 (mu_i, sigma_i of Eq. 31).
  """
  image_shape = tuple(int(d) for d in image_shape)
  channels = image_shape[-1]
  mean_c = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (channels,))
  std_c = jnp.broadcast_to(jnp.asarray(std, jnp.float32), (channels,))
  members = ONE_C_SUM_INDICATORS if members is None else tuple(members)

  @jax.jit
  def batch_scores(variables, keys):
    x = _normalised_noise(keys, image_shape, mean_c, std_c)
    scores = indicators(model, variables, x)
    return {name: scores[name] for name in members if name in scores}

  keys = jax.random.split(jax.random.key(seed), n)
  count, means, m2s = 0, {}, {}
  for start in range(0, n, batch_size):
    valid = min(batch_size, n - start)
    batch = keys[start:start + valid]
    if valid < batch_size:  # pad with repeats so the jitted function sees one shape
      batch = jnp.concatenate([batch, keys[:batch_size - valid]])
    scores = jax.device_get(batch_scores(variables, batch))
    for name, values in scores.items():
      values = np.asarray(values[:valid], np.float64)
      b_mean, b_m2 = values.mean(), np.sum(np.square(values - values.mean()))
      # Chan et al.'s merge of (count, mean, M2) pairs: exact for constant values.
      a_mean, a_m2 = means.get(name, 0.0), m2s.get(name, 0.0)
      delta = b_mean - a_mean
      total = count + valid
      means[name] = a_mean + delta * valid / total
      m2s[name] = a_m2 + b_m2 + delta * delta * count * valid / total
    count += valid
  stats = {
      name: {"mean": float(means[name]),
             "std": float(math.sqrt(m2s[name] / (count - 1))) if count > 1 else 0.0}
      for name in members if name in means
  }
  return {
      "indicators": stats, "n": int(n), "seed": int(seed), "image_shape": list(image_shape),
      "input_mean": [float(v) for v in np.asarray(mean_c)],
      "input_std": [float(v) for v in np.asarray(std_c)],
  }


def save_noise_stats(path: str | os.PathLike, stats: Mapping[str, Any]) -> None:
  """Writes `fit_noise_stats`'s result to a small JSON file."""
  payload = {"format": _FORMAT, "version": _VERSION, **stats}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, sort_keys=True)


def load_noise_stats(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a file written by `save_noise_stats`.

  Raises:
    ValueError: the file is not a noise-statistics file of a known version.
  """
  with open(path, encoding="utf-8") as f:
    payload = json.load(f)
  if payload.get("format") != _FORMAT or payload.get("version") != _VERSION:
    raise ValueError(f"{os.fspath(path)!r} is not an {_FORMAT} file of version {_VERSION}")
  for name, entry in payload.get("indicators", {}).items():
    if set(entry) != {"mean", "std"}:
      raise ValueError(f"{os.fspath(path)!r}: indicator {name!r} needs exactly mean and std")
  return {key: value for key, value in payload.items() if key not in ("format", "version")}


def one_c_sum(indicator_scores: Mapping[str, jax.Array],
              noise_stats: Mapping[str, Any]) -> jax.Array:
  """1C-Sum: the sum of the indicators standardised by their noise statistics.

  The indicators summed are those in `noise_stats["indicators"]`. One whose std on noise is 0
  (e.g. DSS-EXT = 1 on every noise image) carries no scale: it is left out of the sum rather
  than divided by zero. Pure jnp: jit-able, with the statistics static or traced.

  Args:
    indicator_scores: {name: [B]} from `indicators` (extra entries are ignored).
    noise_stats: from `fit_noise_stats` or `load_noise_stats`.

  Returns:
    [B] 1C-Sum scores, higher = more OOD.

  Raises:
    KeyError: an indicator of `noise_stats` is missing from `indicator_scores`.

  References:
    Begon & Geurts 2021, Eq. 31.
  """
  entries = noise_stats["indicators"]
  missing = [name for name in entries if name not in indicator_scores]
  if missing:
    raise KeyError(f"1C-Sum needs {missing}: compute them with `indicators` (the noise "
                   "statistics were fitted with them)")
  total = 0.0
  for name, entry in entries.items():
    h = indicator_scores[name]
    std = jnp.asarray(entry["std"], h.dtype)
    safe_std = jnp.where(std > 0, std, 1.0)
    total = total + jnp.where(std > 0, (h - entry["mean"]) / safe_std, 0.0)
  return jnp.asarray(total)


def supervised_upper_bound(scores_in: Mapping[str, Any], scores_out: Mapping[str, Any], *,
                           names: Sequence[str] | None = None,
                           seed: int = 0) -> dict[str, float]:
  """The paper's "supervised" comparison: a linear classifier on all indicators.

  Half of the ID and half of the OOD samples (chosen at random) train a logistic regression on
  standardised indicators (the paper uses a linear SVM; any linear classifier serves as this
  unrealistic upper reference); its decision function on the other halves is the OOD score.
  An evaluation tool, not a detector: it uses labelled OOD samples from the test distribution.

  Args:
    scores_in: {name: [N]} indicators of ID samples (N >= 4).
    scores_out: {name: [M]} indicators of OOD samples (M >= 4).
    names: the indicators to use; default every key of `scores_in`.
    seed: seed of the random halves.

  Returns:
    `oodjax.metrics.all_metrics` on the held-out halves, as Python floats.

  References:
    Begon & Geurts 2021, Section 3, "Supervised results".
  """
  # Imported here: sklearn is an evaluation dependency, not needed to compute indicators.
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  from oodjax import metrics  # pylint: disable=g-import-not-at-top

  names = list(scores_in) if names is None else list(names)
  x_in = np.stack([np.asarray(scores_in[k], np.float64) for k in names], axis=1)  # [N, F]
  x_out = np.stack([np.asarray(scores_out[k], np.float64) for k in names], axis=1)  # [M, F]
  rng = np.random.default_rng(seed)
  idx_in, idx_out = rng.permutation(len(x_in)), rng.permutation(len(x_out))
  half_in, half_out = len(x_in) // 2, len(x_out) // 2
  train_x = np.concatenate([x_in[idx_in[:half_in]], x_out[idx_out[:half_out]]])
  train_y = np.concatenate([np.zeros(half_in), np.ones(half_out)])  # OOD = 1: higher = OOD
  scaler = StandardScaler().fit(train_x)
  clf = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_y)
  test_in = clf.decision_function(scaler.transform(x_in[idx_in[half_in:]]))
  test_out = clf.decision_function(scaler.transform(x_out[idx_out[half_out:]]))
  result = metrics.all_metrics(jnp.asarray(test_in, jnp.float32),
                               jnp.asarray(test_out, jnp.float32))
  return {key: float(value) for key, value in result.items()}
