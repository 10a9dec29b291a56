"""Detectors computed from the softmax of the logits: MSP, max logit, energy, temperature, ODIN.

Every detector is `score(apply_fn, variables, x, *, hyper...) -> [B]` with HIGHER = MORE
out-of-distribution; `apply_fn(variables, x) -> logits [B, K]` is the network in inference mode
and `x` is a batch of normalised inputs [B, H, W, C] (channel last).

Hyperparameters (`temperature`, `epsilon`) are ordinary array arguments, never static, so
`jax.vmap`/`jax.jit` over a grid of them compiles once. They are validated when they are
concrete (a Python number or a committed array): temperature <= 0 or epsilon < 0 raise
`ValueError`. Under `jit`/`vmap` they are tracers whose values cannot be inspected; nothing is
checked then and a non-positive temperature gives NaN or meaningless scores, so callers that trace
over a grid (`oodjax.sweep`) validate the whole grid before tracing. Shape checks (a scalar
hyperparameter, `std` of length C) are static and always run.

Every formula works in log space (`log_softmax`, `logsumexp`), so T = 1000 and logits of +-1e4
neither overflow nor lose the winning class to rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _check_scalar(value, name: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}; to sweep a grid "
                     "use jax.vmap or oodjax.sweep.")


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_temperature(temperature) -> None:
  _check_scalar(temperature, "temperature")
  if _is_concrete(temperature) and not float(temperature) > 0:  # `not >` also catches NaN
    raise ValueError(f"temperature must be > 0, got {float(temperature)}.")


def _check_epsilon(epsilon) -> None:
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


def _max_softmax_score(logits: jax.Array, temperature) -> jax.Array:
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
  logits = apply_fn(variables, x)  # [B, K]
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
  return -jnp.max(apply_fn(variables, x), axis=-1)


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
  _check_temperature(temperature)
  logits = apply_fn(variables, x)  # [B, K]
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
  _check_temperature(temperature)
  return _max_softmax_score(apply_fn(variables, x), temperature)


def odin_input_gradient(apply_fn: ApplyFn, variables: Any, x: jax.Array, *,
                        temperature: float | jax.Array) -> jax.Array:
  """Gradient w.r.t. the normalised input of the cross-entropy of f(x) / T at the predicted label.

  The loss is −log S_ŷ(x; T) with ŷ = argmax_k f_k(x) taken from the UNSCALED logits and held
  fixed (no gradient flows through the argmax). Per-example losses are summed: with the network in
  inference mode the examples do not interact, so the gradient of the sum is each example's own
  gradient. (A network whose forward mixes examples, e.g. BatchNorm in training mode, would make
  this wrong; `apply_fn` must be the inference-mode forward.)

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperature: [] T > 0; may be traced.

  Returns:
    [B, H, W, C] float32, ∇_x −log S_ŷ(x; T).

  References:
    Liang, Li, Srikant. ODIN. ICLR 2018, eq. (2) and the sentence after it ("back-propagating
    the gradient of the cross-entropy loss w.r.t the input").
  """
  _check_temperature(temperature)

  def loss(x):
    logits = apply_fn(variables, x)  # [B, K]
    # T > 0 does not change the argmax, so the unscaled logits give the label the paper's
    # argmax_i S_i(x; T) gives, with no ties broken differently by the division.
    labels = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))  # [B]
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)  # [B, K]
    return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

  return jax.grad(loss)(x)


def odin_perturbation(apply_fn: ApplyFn, variables: Any, x: jax.Array, *,
                      temperature: float | jax.Array, std) -> jax.Array:
  """The direction ODIN moves a normalised input along: sign(∇_x loss) / std, per channel.

  x̃ = x − ε · `odin_perturbation(...)`. Separated from `odin` so that a sweep over ε computes
  it once per temperature (`oodjax.sweep.odin_grid`).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperature: [] T > 0; may be traced.
    std: [C] the per-channel std the inputs were normalised with (pixels on the [0, 1] scale).

  Returns:
    [B, H, W, C] float32 with entries ±1 / std[c].

  References:
    Liang, Li, Srikant. ODIN. ICLR 2018, eq. (2).
  """
  std = check_std(std, x.shape[-1])
  grad = odin_input_gradient(apply_fn, variables, x, temperature=temperature)
  # The released code takes the sign as (grad >= 0) mapped to {-1, +1}, so a zero gradient
  # moves the pixel (+1); jnp.sign would leave it (0). We follow the released code.
  sign = jnp.where(grad >= 0, 1.0, -1.0).astype(x.dtype)
  # Explicit reshape: the inputs are [..., C], and implicit rank promotion is an error in tests.
  return sign / std.reshape((1,) * (x.ndim - 1) + (-1,))


def odin(apply_fn: ApplyFn, variables: Any, x: jax.Array, *, temperature: float | jax.Array,
         epsilon: float | jax.Array, std) -> jax.Array:
  """ODIN: temperature scaling plus input preprocessing, as in the authors' released procedure.

  Steps, and why each is so:

  1. ŷ = argmax_k f_k(x) on the UNSCALED logits. The paper's ŷ is argmax_i S_i(x; T); dividing
     by T > 0 does not change the argmax, and the released code takes it from the raw outputs.
  2. loss = cross-entropy of f(x) / T against ŷ, i.e. −log S_ŷ(x; T), differentiated w.r.t. the
     normalised input x. Eq. (2) writes x̃ = x − ε sign(−∇_x log S_ŷ(x; T)); −log S_ŷ is exactly
     this loss, and T is inside it (the gradient at T = 1000 differs from the one at T = 1). The
     printed eq. (2) has a subscript ỹ; the text ("without the need for a class label") and the
     released code make it the predicted label ŷ.
  3. sign with "≥ 0 → +1, < 0 → −1", as the released code computes it: a zero gradient still
     moves the pixel by −ε, where jnp.sign would leave it alone.
  4. The sign is divided per channel by the dataset's normalisation std. ε is a step in PIXEL
     space (pixels on the [0, 1] scale, ε ≤ 0.004 ≈ one grey level), but the network takes
     normalised inputs (p − mean) / std, and a pixel step of ε is a step of ε / std[c] in
     normalised space. The released code does exactly this; it is the detail its users keep
     asking about, and omitting it makes the effective ε 1/std times too small (≈ 4x on CIFAR).
     `std` must therefore be the std the inputs were normalised with.
  5. x̃ = x − ε · sign / std in normalised space, without clipping to the valid pixel range
     (the released code does not clip either). Subtracting the sign of the loss gradient
     DEcreases the loss, i.e. raises the softmax score of the predicted class; the paper's point
     is that in-distribution inputs gain more from this than OOD inputs do.
  6. score = 1 − max softmax(f(x̃) / T): the paper's softmax score S(x̃; T) compared with a
     threshold δ (ID when S ≥ δ), with the sign flipped to the library convention.

  The network runs in inference mode for both the gradient and the second forward.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    temperature: [] T > 0; may be traced (validated only when concrete).
    epsilon: [] ε >= 0, the perturbation magnitude in [0, 1]-pixel units; may be traced
      (validated only when concrete).
    std: [C] the per-channel std the inputs were normalised with; its length is always checked.

  Returns:
    [B] float32 scores in [0, 1 − 1/K], higher = more OOD.

  Raises:
    ValueError: a concrete temperature <= 0 or epsilon < 0; a non-scalar temperature/epsilon;
      `std` not of shape [C] or (when concrete) not positive.

  References:
    Liang, Li, Srikant. Enhancing the reliability of out-of-distribution image detection in
    neural networks (ODIN). ICLR 2018, eq. (1) (temperature scaling), eq. (2) (input
    preprocessing) and the detector g(x; δ, T, ε) of section 3.
  """
  _check_epsilon(epsilon)
  direction = odin_perturbation(apply_fn, variables, x, temperature=temperature, std=std)
  x_tilde = x - epsilon * direction  # [B, H, W, C]
  return _max_softmax_score(apply_fn(variables, x_tilde), temperature)
