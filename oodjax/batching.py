"""The one padded-batch loop: run a compiled function over an array in fixed-size batches.

A jitted function compiles once per input shape. Datasets rarely divide by the batch size, so
`map_padded` pads the last batch with copies of its last row up to `batch_size`, and cuts the
padding off the outputs again: one compiled program serves every batch and every dataset of
the same image shape. Outputs come back to the host as numpy arrays, concatenated.

    scores = map_padded(lambda images: scorer(normalize(images)), dataset.images, 500)

Every batched loop in oodjax (scoring datasets, ODIN's grid, 1C-Sum's noise statistics) goes
through here.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _pad_rows(batch, size: int):
  """`batch` [b, ...] padded to [size, ...] with copies of its last row (numpy or jax)."""
  missing = size - batch.shape[0]
  if missing == 0:
    return batch
  xp = np if isinstance(batch, np.ndarray) else jnp
  return xp.concatenate([batch, xp.repeat(batch[-1:], missing, axis=0)])


def _cut(array, valid: int, axis: int) -> np.ndarray:
  array = np.asarray(array)
  return np.take(array, np.arange(valid), axis=axis)


def map_padded(fn: Callable[[Any], Any], xs, batch_size: int, *, out_axis: int = 0) -> Any:
  """`fn` over `xs` in batches of `batch_size` rows, the last batch padded to the same shape.

  Args:
    fn: maps a [batch_size, ...] array to a pytree of arrays whose `out_axis` is the batch
      axis (each row's output must depend on that row alone, or padding leaks into it).
    xs: [N, ...] numpy or jax array (a jax PRNG key array works too); N >= 1.
    batch_size: rows per call, >= 1. Every call gets exactly this many rows (a set smaller
      than one batch is padded too), so `fn` sees one shape whatever N is.
    out_axis: the batch axis of `fn`'s outputs (e.g. -1 for ODIN's [T, E, B] grid).

  Returns:
    The pytree of `fn`'s outputs with the batches concatenated along `out_axis`, as numpy
    arrays of N rows.

  Raises:
    ValueError: an empty `xs` or a batch size below 1.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  n = xs.shape[0]
  if n == 0:
    raise ValueError("map_padded needs at least one row")
  outputs = []
  for start in range(0, n, batch_size):
    batch = xs[start:start + batch_size]
    valid = batch.shape[0]
    out = fn(_pad_rows(batch, batch_size))
    outputs.append(jax.tree.map(lambda a, v=valid: _cut(a, v, out_axis), out))
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=out_axis), *outputs)
