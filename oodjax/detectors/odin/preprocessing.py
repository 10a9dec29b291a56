"""ODIN's detector: temperature scaling (eq. 1) plus input preprocessing (eq. 2).

`odin_score(apply_fn, variables, x, *, temperature, epsilon, std) -> [B]`, higher = more OOD.
`odin_perturbation` is the direction eq. (2) moves an input along; `oodjax.detectors.odin.grid`
reuses it to score a whole (T, ε) grid with T backward passes. Temperature and ε are ordinary
(traceable) array arguments.

References:
  Liang, Li, Srikant. Enhancing the reliability of out-of-distribution image detection in neural
  networks (ODIN). ICLR 2018.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from oodjax.detectors.softmax import (ApplyFn, check_epsilon, check_std, check_temperature,
                                      logits_of, max_softmax_score)


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
  check_temperature(temperature)

  def loss(x):
    logits = logits_of(apply_fn, variables, x)  # [B, K]
    # T > 0 does not change the argmax, so the unscaled logits give the label the paper's
    # argmax_i S_i(x; T) gives, with no ties broken differently by the division.
    labels = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))  # [B]
    return odin_loss(logits, labels, temperature)

  return jax.grad(loss)(x)


def odin_perturbation(apply_fn: ApplyFn, variables: Any, x: jax.Array, *,
                      temperature: float | jax.Array, std) -> jax.Array:
  """The direction ODIN moves a normalised input along: sign(∇_x loss) / std, per channel.

  x̃ = x − ε · `odin_perturbation(...)`. Separated from `odin_score` so that a sweep over ε computes
  it once per temperature (`oodjax.detectors.odin.grid.odin_grid`).

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
  return sign_direction(grad, std)


def odin_loss(logits: jax.Array, labels: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """−Σ_b log S_ŷ(x_b; T): the loss ODIN differentiates, written at the logits [B, K].

  `labels` [B] are ŷ, held fixed. `odin_input_gradient` differentiates it through the network;
  `oodjax.detectors.odin.grid` pulls its logit gradient back through one shared forward pass.
  """
  log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)  # [B, K]
  return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def sign_direction(grad: jax.Array, std: jax.Array) -> jax.Array:
  """sign(grad) / std per channel, with ODIN's sign rule; grad [B, H, W, C], std [C]."""
  # The released code takes the sign as (grad >= 0) mapped to {-1, +1}, so a zero gradient
  # moves the pixel (+1); jnp.sign would leave it (0). We follow the released code.
  sign = jnp.where(grad >= 0, 1.0, -1.0).astype(grad.dtype)
  # Explicit reshape: the inputs are [..., C], and implicit rank promotion is an error in tests.
  return sign / std.reshape((1,) * (grad.ndim - 1) + (-1,))


def odin_score(apply_fn: ApplyFn, variables: Any, x: jax.Array, *, temperature: float | jax.Array,
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
  check_epsilon(epsilon)
  direction = odin_perturbation(apply_fn, variables, x, temperature=temperature, std=std)
  x_tilde = x - epsilon * direction  # [B, H, W, C]
  return max_softmax_score(logits_of(apply_fn, variables, x_tilde), temperature)
