"""Detectors computed from the logits alone: MSP, max logit, energy, temperature scaling.

Every detector is `score(apply_fn, variables, x, *, hyper...) -> [B]` with HIGHER = MORE
out-of-distribution; `apply_fn(variables, x) -> logits [B, K]` is the network in inference mode
and `x` is a batch of normalised inputs [B, H, W, C] (channel last).

Hyperparameters (`temperature`, `epsilon`) are ordinary array arguments, never static, so
`jax.vmap`/`jax.jit` over a grid of them compiles once. They are validated when they are
concrete (a Python number or a committed array): temperature <= 0 or epsilon < 0 raise
`ValueError`. Under `jit`/`vmap` they are tracers whose values cannot be inspected; nothing is
checked then and a non-positive temperature gives NaN or meaningless scores, so callers that trace
over a grid (`check_grid`, `oodjax.detectors.odin.grid`) validate the whole grid before tracing.
Shape checks (a scalar hyperparameter, `std` of length C, [B, K] logits) are static and always
run.

Every formula works in log space (`log_softmax`, `logsumexp`), so T = 1000 and logits of +-1e4
neither overflow nor lose the winning class to rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# The temperature of the "T1000" baseline (Hsu et al., 2020; Begon & Geurts, Eq. 11), and ODIN's
# largest temperature (Liang et al., Sec. 4.4). Defined once; everything else imports it.
T1000_TEMPERATURE = 1000.0


def _check_scalar(value, name: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}; to sweep a grid "
                     "use jax.vmap or oodjax.detectors.odin.grid.")


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_temperature(temperature) -> None:
  _check_scalar(temperature, "temperature")
  if _is_concrete(temperature) and not float(temperature) > 0:  # `not >` also catches NaN
    raise ValueError(f"temperature must be > 0, got {float(temperature)}.")


def check_epsilon(epsilon) -> None:
  _check_scalar(epsilon, "epsilon")
  if _is_concrete(epsilon) and not float(epsilon) >= 0:
    raise ValueError(f"epsilon must be >= 0, got {float(epsilon)}.")


def check_std(std, num_channels: int) -> jax.Array:
  """Checks a per-channel normalisation std and returns it as a float32 [C] array.

  Args:
    std: [C] array-like, the standard deviations used to normalise the inputs (pixel values on
      the [0, 1] scale), e.g. `dataset.std`.
    num_channels: C, the size of the inputs' last axis.

  Returns:
    [C] float32.

  Raises:
    ValueError: `std` is not 1-D of length C, or (when concrete) not finite and positive.
  """
  std = jnp.asarray(std, jnp.float32)
  if std.shape != (num_channels,):
    raise ValueError(f"std must have one entry per input channel, shape ({num_channels},), got "
                     f"shape {std.shape}. Pass the dataset's normalisation std, e.g. "
                     "`dataset.std`.")
  if _is_concrete(std) and not bool(jnp.all(jnp.isfinite(std) & (std > 0))):
    raise ValueError(f"std must be finite and > 0, got {np.asarray(std)}.")
  return std


def logits_of(apply_fn: ApplyFn, variables: Any, x: jax.Array) -> jax.Array:
  """`apply_fn(variables, x)`, checked (at trace time) to be [B, K] logits for the B inputs."""
  logits = apply_fn(variables, x)
  chex.assert_rank(logits, 2, custom_message="apply_fn must return logits [B, K]")
  chex.assert_axis_dimension(logits, 0, x.shape[0])
  return logits


def check_grid(values, name: str, *, positive: bool) -> jax.Array:
  """Validates a concrete 1-D grid of hyperparameter values.

  Args:
    values: [G] array-like, G >= 1.
    name: the argument's name, for error messages.
    positive: True for values that must be > 0 (temperatures), False for >= 0 (epsilons).

  Returns:
    [G] float32.

  Raises:
    ValueError: not 1-D, empty, traced (a grid is validated before tracing), or out of range.
  """
  if isinstance(values, jax.core.Tracer):
    raise ValueError(f"{name} must be concrete: the grid is validated before it is traced.")
  arr = np.asarray(values, np.float32)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D grid, got shape {arr.shape}.")
  if arr.shape[0] == 0:
    raise ValueError(f"{name} is an empty grid.")
  bad = ~(arr > 0) if positive else ~(arr >= 0)  # `~(>)` also flags NaN
  if bad.any():
    raise ValueError(f"{name} must all be {'> 0' if positive else '>= 0'}, got {arr[bad]}.")
  return jnp.asarray(arr)


def max_softmax_score(logits: jax.Array, temperature) -> jax.Array:
  """[B, K] logits -> [B] 1 - max_k softmax(logits / T)_k."""
  # exp(max log-softmax) never forms exp(logit), so logits of 1e4 are fine at any T.
  return 1.0 - jnp.exp(jnp.max(jax.nn.log_softmax(logits / temperature, axis=-1), axis=-1))


def msp(apply_fn: ApplyFn, variables: Any, x: jax.Array) -> jax.Array:
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
  logits = logits_of(apply_fn, variables, x)  # [B, K]
  # exp(max log-softmax) avoids forming the full softmax and is exact for large logits.
  return 1.0 - jnp.exp(jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1))


def max_logit(apply_fn: ApplyFn, variables: Any, x: jax.Array) -> jax.Array:
  """Maximum-logit score, negated so that higher = more OOD.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.

  Returns:
    [B] float32 scores, −max_k f_k(x).

  References:
    Hendrycks, Basart, Mazeika, et al. Scaling out-of-distribution detection for real-world
    settings. ICML 2022 (MaxLogit).
  """
  return -jnp.max(logits_of(apply_fn, variables, x), axis=-1)


def energy(apply_fn: ApplyFn, variables: Any, x: jax.Array, *,
           temperature: float | jax.Array = 1.0) -> jax.Array:
  """Energy score: the free energy E(x; T) = −T · logsumexp(f(x) / T).

  In-distribution inputs have LOWER energy (a larger logsumexp), so the energy itself already
  follows the library's sign convention: score = −T · logsumexp(f / T), higher = more OOD.
  (Liu et al. accept an input when the negative energy −E is high; this is the same rule.)

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperature: [] T > 0; may be traced.

  Returns:
    [B] float32 scores.

  References:
    Liu, Wang, Owens, Li. Energy-based out-of-distribution detection. NeurIPS 2020, eq. (1) and
    the score of eq. (2) with the sign flipped.
  """
  check_temperature(temperature)
  logits = logits_of(apply_fn, variables, x)  # [B, K]
  return -temperature * jax.nn.logsumexp(logits / temperature, axis=-1)


def temperature_scaled(apply_fn: ApplyFn, variables: Any, x: jax.Array, *,
                       temperature: float | jax.Array) -> jax.Array:
  """Temperature-scaled softmax score without input perturbation: 1 − max softmax(f(x) / T).

  This is ODIN with ε = 0; at T = 1000 it is the "T1000" detector of the sample-free
  comparisons (Hsu et al., 2020), whose ranking is nearly that of the max logit minus the mean
  logit (Liang et al., eq. 3).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperature: [] T > 0; may be traced.

  Returns:
    [B] float32 scores in [0, 1 − 1/K].

  References:
    Liang, Li, Srikant. Enhancing the reliability of out-of-distribution image detection in
    neural networks (ODIN). ICLR 2018, eq. (1).
    Hsu, Shen, Jin, Kira. Generalized ODIN. CVPR 2020 (the T1000 baseline).
  """
  check_temperature(temperature)
  return max_softmax_score(logits_of(apply_fn, variables, x), temperature)


def score_grid(detector: Callable, apply_fn: ApplyFn, variables: Any, x: jax.Array,
               temperatures, **hyper) -> jax.Array:
  """Scores of a detector with a `temperature` keyword (energy, temperature_scaled) over a T grid.

  `jax.vmap` batches only what depends on the mapped temperature, so the network's forward pass,
  which does not, runs once and only the cheap softmax/logsumexp is repeated T times. Jit the
  call (with `detector` and `apply_fn` closed over) to compile it once.

  Args:
    detector: `detector(apply_fn, variables, x, *, temperature, **hyper) -> [B]`.
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperatures: [T] values > 0 (concrete).
    **hyper: further keyword arguments of `detector`.

  Returns:
    [T, B] float32 scores.
  """
  temperatures = check_grid(temperatures, "temperatures", positive=True)
  return jax.vmap(
      lambda t: detector(apply_fn, variables, x, temperature=t, **hyper))(temperatures)
