"""Detectors computed from the softmax of the logits."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def msp(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
        x: jax.Array) -> jax.Array:
  """Maximum-softmax-probability baseline (Hendrycks & Gimpel, 2017), as an OOD score.

  The baseline accepts an input as in-distribution when max_k softmax(f(x))_k is high; to keep
  the library's convention (higher = more OOD) the score is 1 − max softmax.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.

  Returns:
    [B] float32 scores in [0, 1 − 1/K].
  """
  logits = apply_fn(variables, x)  # [B, K]
  # exp(max log-softmax) avoids forming the full softmax and is exact for large logits.
  return 1.0 - jnp.exp(jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1))
