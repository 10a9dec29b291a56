"""1C-Sum: the sample-free summary of the white-box indicators, and its supervised upper bound.

1C-Sum (Eq. 31) standardises each indicator h_i by its mean mu_i and standard deviation
sigma_i under uniform noise and sums the results, H(x) = sum_i (h_i(x) - mu_i) / sigma_i:

    stats = fit_noise_stats(model, variables, (28, 28, 1), mean, std)  # once, no data needed
    save_noise_stats("noise_stats.json", stats)
    scores = one_c_sum(indicators(model, variables, x), stats)  # [B], higher = more OOD

The noise statistics are the only thing fitted; they depend on the network and on the ID
normalisation, never on ID or OOD samples.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021, Section 4 (Eq. 31) and Section 3 ("Supervised results").
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oodjax.batching import map_padded
from oodjax.detectors.sample_free.whitebox import ALL_INDICATORS, indicators

# "All indicators, except the IN- indicators and ODIN" (Section 4, after Eq. 31): every
# indicator of `ALL_INDICATORS` but the IN- ones. ANG+ is one of them, as in the authors'
# released code.
ONE_C_SUM_INDICATORS = ("MP", "H", "T1000", "NORM", "NORM+", "ANG", "ANG+", "ANG++", "PROJ",
                        "ACT", "ACT+", "DMS", "DMS-AOS", "DSS", "DSS-EXT")

_FORMAT = "oodjax-noise-stats"
_VERSION = 1


def _normalised_noise(keys: jax.Array, image_shape: tuple[int, ...], mean: jax.Array,
                      std: jax.Array) -> jax.Array:
  """[B, *image_shape] images with pixels U(0, 1), one image per key, then (u - mean) / std."""
  u = jax.vmap(lambda key: jax.random.uniform(key, image_shape))(keys)
  shape = (1,) * len(image_shape) + (image_shape[-1],)  # broadcast per channel, explicitly
  return (u - mean.reshape(shape)) / std.reshape(shape)


@functools.partial(jax.jit, static_argnames=("model", "image_shape", "members"))
def _noise_indicators(variables, keys, mean, std, *, model, image_shape, members):
  """{member: [B]} indicators of the B noise images drawn from `keys`."""
  scores = indicators(model, variables, _normalised_noise(keys, image_shape, mean, std))
  return {name: scores[name] for name in members if name in scores}


def fit_noise_stats(model: nn.Module, variables: Mapping[str, Any],
                    image_shape: Sequence[int], mean: Any, std: Any, *, n: int = 10_000,
                    seed: int = 0, batch_size: int = 500,
                    members: Sequence[str] | None = None) -> dict[str, Any]:
  """Means and standard deviations of the 1C-Sum indicators on uniform noise.

  Image i has pixels drawn from U(0, 1) with the i-th key of `jax.random.split(key(seed), n)`,
  then normalised like ID inputs; so the images, and the statistics, do not depend on
  `batch_size`. Indicators are computed in jitted padded batches (`map_padded`: one
  compilation); the mean and the unbiased (N - 1) standard deviation are taken in float64.

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

  keys = jax.random.split(jax.random.key(seed), n)
  scores = map_padded(
      lambda batch: _noise_indicators(variables, batch, mean_c, std_c, model=model,
                                      image_shape=image_shape, members=members),
      keys, batch_size)
  stats = {}
  for name in members:
    if name in scores:
      values = np.asarray(scores[name], np.float64)
      std = float(values.std(ddof=1)) if n > 1 else 0.0
      stats[name] = {"mean": float(values.mean()), "std": std}
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
  # In the paper's order, whatever order the dict arrives in (jit sorts a pytree's dict keys), so
  # the float32 sum is the same however the statistics were stored.
  order = [name for name in ALL_INDICATORS if name in entries]
  order += sorted(name for name in entries if name not in order)
  total = 0.0
  for name in order:
    entry = entries[name]
    h = indicator_scores[name]
    std = jnp.asarray(entry["std"], h.dtype)
    safe_std = jnp.where(std > 0, std, 1.0)
    total = total + jnp.where(std > 0, (h - entry["mean"]) / safe_std, 0.0)
  return jnp.asarray(total)
