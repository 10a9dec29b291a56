"""Hyperparameter grids for the softmax detectors, each in one compiled program.

`odin_grid` scores a dataset under every (T, ε) pair of ODIN's grid. The input gradient depends on
T but not on ε, so it is computed once per temperature, then the T·E perturbed forward passes
reuse it:

    logits, pullback = vjp(f, x)                          # ONE forward pass, shared by every T
    directions[t] = sign(pullback(∂loss_t/∂logits)) / std  # T backward passes   [T, B, H, W, C]
    scores[t, e]  = 1 − max softmax(f(x − ε_e · directions[t]) / T_t)             [T, E, B]

with loss_t = −log S_ŷ(x; T_t) as in `odin_perturbation`. Two exact savings over running
`odin_perturbation` and a forward per config: the forward pass under the T gradients is one
pass (ŷ and f(x) do not depend on T), and ε = 0 leaves x unperturbed, so its T scores come from
that pass's logits (a `lax.cond` per config; the paper's grid starts at ε = 0). What remains is
T backward passes and T·(E − 1) forwards, plus one.

How the forwards (and the T backwards) are batched is the `forward_batch` knob:

* an int n: a loop over groups of n configs, each group a `vmap` (n = 1: a plain `lax.map`).
  On CPU, n = 1 is the fast choice, see `_DEFAULT_CPU_FORWARD_BATCH`.
* None: one `vmap` over every config, the accelerator choice (the device is wide enough and the
  loop overhead would dominate); memory grows with T·E · `chunk_size`.
* "auto" (default): None on an accelerator, 1 on CPU, decided when called.

Data is processed `chunk_size` images at a time: a Python loop over a jitted function whose last
chunk is padded (with copies of the last image) to the same shape, so the program is traced and
compiled once for a (model, chunk shape, T, E) and reused for every chunk and every later call with
other T or ε VALUES. The jitted function takes `apply_fn` as a static argument: pass one that
hashes by value (`oodjax.models.inference_apply(model)`), not a fresh `functools.partial`.

Measured on CPU (2-core Intel Xeon, jax 0.10.2, small CNN on 1,000 Fashion-MNIST images, paper's
10 x 21 grid, interleaved repeats; `benchmarks/odin_grid.py` has the side-by-side numbers):

* This layout (shared forward, ε = 0 from it, plain `lax.map`) takes 10.7 s where the previous
  one (a forward inside each of the T gradients, a forward for every config, `lax.map` with
  `batch_size=1`) took 11.8 s, with identical scores. Most of the gain is the plain `lax.map`:
  `batch_size=1` wraps each step in a size-1 `vmap`, which cost ~10% in the forwards and turned
  the ε = 0 `cond` into a select that runs the skipped forward anyway. XLA already hoisted the
  T-invariant forward out of the old gradient loop, so sharing it gains little on its own.
* Of the 10.7 s, the 200 perturbed forwards take ~7.1 s, i.e. one plain jitted forward over the
  same images each (~36 ms per 1,000 images: ~240 GFLOP/s by the network's multiply-adds, the
  order of two AVX-512 cores' float32 peak), and the 10 backward passes ~3.4 s (~9 forwards
  each): XLA:CPU's input gradient is slow, above all the select-and-scatter of max-pool's
  gradient (a pool written with a cheaper gradient made the grid ~7% faster; that is a change
  to the model, not to this file).
* `chunk_size` does not matter for speed between 125 and 1,000 (forward throughput is flat in
  the batch size; all within 3%, the noise), nor does the number of host round trips (4 calls of
  250 vs 1 of 1,000: within noise). The default stays 256, for memory: a chunk holds the T
  directions, the forward's residuals and one forward's activations (small for this CNN, GBs
  for a ResNet at 1,000 images). Padding the last chunk wastes at most `chunk_size` − 1 images
  (24 of 1,000 at 256: 2.4%); compiling a separate program for the remainder would cost ~1 s
  per distinct dataset size instead, so the padding stays.
* `forward_batch` 2 is 5x slower than 1 (57 s vs 11 s): XLA:CPU runs a `vmap`ped network much
  more slowly than the same images as one batch (2.3x per image for the forward alone) and a
  `vmap`ped max-pool gradient slower still.

`oodjax.metrics.metrics_grid` turns the [T, E, N] and [T, E, M] grids into [T, E] tables.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from oodjax.batching import map_padded
from oodjax.detectors.odin.preprocessing import odin_loss, sign_direction
from oodjax.detectors.softmax import (ApplyFn, check_grid, check_std, logits_of,
                                      max_softmax_score)

# On CPU, one configuration per lax.map step is fastest: grouping configs makes XLA run a vmapped
# network, measured 3x slower for groups of 4 to 16 on 2 cores (500 images, 10 x 21 grid: 10.9 s
# at 1, 33 s at 4, 35 s at 16, 42 s fully vmapped) and 5x slower for groups of 2 with the shared
# forward (1,000 images: 57 s vs 11 s).
_DEFAULT_CPU_FORWARD_BATCH = 1


def _resolve_forward_batch(forward_batch: int | None | str) -> int | None:
  if forward_batch == "auto":
    return _DEFAULT_CPU_FORWARD_BATCH if jax.default_backend() == "cpu" else None
  if forward_batch is None:
    return None
  if isinstance(forward_batch, bool) or not isinstance(forward_batch, int) or forward_batch < 1:
    raise ValueError("forward_batch must be a positive int, None or 'auto', "
                     f"got {forward_batch!r}.")
  return forward_batch


def _map(fn: Callable, xs: Any, batch: int | None) -> Any:
  """`vmap(fn)(xs)` when batch is None, else a loop over groups of `batch` (`lax.map`)."""
  if batch is None:
    return jax.vmap(fn)(xs)
  if batch == 1:
    # lax.map(batch_size=1) would still vmap fn over groups of one, turning lax.cond into
    # select (both branches run); a plain lax.map keeps the cond a real branch.
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=batch)


def _odin_directions(apply_fn: ApplyFn, variables: Any, x: jax.Array, temperatures: jax.Array,
                     std: jax.Array, forward_batch: int | None) -> tuple[jax.Array, jax.Array]:
  """`odin_perturbation` at every temperature from ONE forward pass, and that pass's logits.

  `odin_input_gradient`'s loss −log S_ŷ(x; T) depends on x only through the logits f(x), and ŷ
  does not depend on T, so ∇_x loss = J_f(x)ᵀ · ∂loss/∂logits: the forward pass (and the
  residuals its backward pass needs) is shared by all T, and each temperature costs one
  backward pass from its own cotangent. The loss and the sign rule are `odin_perturbation`'s
  own (`odin_loss`, `sign_direction`).

  Args:
    apply_fn, variables: the network, as in `odin_grid`.
    x: [B, H, W, C] normalised inputs.
    temperatures: [T] values > 0.
    std: [C] the per-channel normalisation std.
    forward_batch: temperatures per step of the backward passes (`_map`).

  Returns:
    directions: [T, B, H, W, C] entries ±1 / std[c], `odin_perturbation` at each T.
    logits: [B, K] f(x), the unperturbed logits.
  """
  logits, pullback = jax.vjp(lambda inputs: logits_of(apply_fn, variables, inputs), x)  # [B, K]
  labels = jnp.argmax(logits, axis=-1)  # [B], ŷ from the unscaled logits, as in odin_score

  def direction(temperature):
    (grad,) = pullback(jax.grad(odin_loss)(logits, labels, temperature))  # [B, H, W, C]
    return sign_direction(grad, std)

  return _map(direction, temperatures, forward_batch), logits


def _odin_grid_chunk(apply_fn: ApplyFn, variables: Any, x: jax.Array, temperatures: jax.Array,
                     epsilons: jax.Array, std: jax.Array, forward_batch: int | None
                     ) -> jax.Array:
  """[B, H, W, C] -> [T, E, B] ODIN scores; see the module docstring."""
  num_t, num_e = temperatures.shape[0], epsilons.shape[0]
  directions, logits = _odin_directions(apply_fn, variables, x, temperatures, std,
                                        forward_batch)  # [T, B, H, W, C], [B, K]
  # Configs in row-major (t, e) order, so the [T * E] results reshape straight to [T, E].
  t_index = jnp.repeat(jnp.arange(num_t), num_e)  # [T * E]
  e_index = jnp.tile(jnp.arange(num_e), num_t)  # [T * E]

  def forward(config):
    t, e = config
    epsilon = epsilons[e]
    # ε = 0 leaves x unperturbed at every T: its logits are the shared forward pass's, so the
    # cond skips T forwards (the paper's grid starts at 0). Under vmap (forward_batch None or
    # > 1) the cond becomes a select and both branches run: no saving there, no harm.
    logits_e = jax.lax.cond(
        epsilon == 0, lambda: logits,
        lambda: logits_of(apply_fn, variables, x - epsilon * directions[t]))  # [B, K]
    return max_softmax_score(logits_e, temperatures[t])  # [B]

  scores = _map(forward, (t_index, e_index), forward_batch)  # [T * E, B]
  return scores.reshape(num_t, num_e, x.shape[0])


_odin_grid_chunk_jit = jax.jit(_odin_grid_chunk, static_argnames=("apply_fn", "forward_batch"))


def odin_grid(apply_fn: ApplyFn, variables: Any, x, temperatures, epsilons, *, std,
              chunk_size: int = 256, forward_batch: int | None | str = "auto") -> np.ndarray:
  """ODIN scores of every image under every (temperature, epsilon) pair.

  `odin_grid(...)[t, e]` equals `odin_score(apply_fn, variables, x, temperature=temperatures[t],
  epsilon=epsilons[e], std=std)` up to float32 rounding, at the cost of one forward, T backward
  and T·E forward passes (T·(E − 1) when ε = 0 is in the grid) rather than T·E backward and
  2·T·E forward passes.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode. Static
      for `jit`, so it must hash by value to reuse the compiled program across calls: a
      module-level function, or `oodjax.models.inference_apply(model)` for a Linen model
      (equal models give equal callables, where a fresh `functools.partial` would recompile).
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs (numpy or jax); sliced on the host into chunks.
    temperatures: [T] values > 0 (concrete).
    epsilons: [E] values >= 0 (concrete), in [0, 1]-pixel units as in `odin_score`.
    std: [C] the per-channel std the inputs were normalised with.
    chunk_size: images per compiled call; the last chunk is padded to this size
      (`oodjax.batching.map_padded`). Peak memory is about T · chunk_size directions, the
      residuals of one forward pass over chunk_size images (what its backward pass needs) and
      the activations of `forward_batch` · chunk_size images (T · E · chunk_size with
      `forward_batch=None`). On CPU the speed barely depends on it (see the module docstring),
      so pick it for memory.
    forward_batch: configs per step of the T backward and T·E forward passes: an int for
      `lax.map` groups (1 on CPU), None for one full `vmap` (accelerators), "auto" to pick by
      backend.

  Returns:
    [T, E, B] float32 numpy array of scores, higher = more OOD.

  Raises:
    ValueError: an empty or out-of-range grid, `std` not of shape [C], a bad `chunk_size` or
      `forward_batch`.

  References:
    Liang, Li, Srikant. ODIN. ICLR 2018, eq. (1), (2); the grid of section 4.4 is
    `tuning.PAPER_TEMPERATURES` x `tuning.PAPER_EPSILONS` (`oodjax.detectors.odin.tuning`).
  """
  temperatures = check_grid(temperatures, "temperatures", positive=True)
  epsilons = check_grid(epsilons, "epsilons", positive=False)
  x = np.asarray(x)
  std = check_std(std, x.shape[-1])
  batch = _resolve_forward_batch(forward_batch)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if x.shape[0] == 0:
    return np.zeros((temperatures.shape[0], epsilons.shape[0], 0), np.float32)
  return map_padded(
      lambda chunk: _odin_grid_chunk_jit(apply_fn, variables, chunk, temperatures, epsilons, std,
                                         forward_batch=batch), x, chunk_size, out_axis=-1)
