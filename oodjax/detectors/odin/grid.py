"""Hyperparameter grids for the softmax detectors, each in one compiled program.

`odin_grid` scores a dataset under every (T, ε) pair of ODIN's grid. The input gradient depends on
T but not on ε, so it is computed once per temperature (T backward passes), then the T·E perturbed
forward passes reuse it:

    directions[t] = sign(∇_x loss(x; T_t)) / std         # T backward passes   [T, B, H, W, C]
    scores[t, e]  = 1 − max softmax(f(x − ε_e · directions[t]) / T_t)            [T, E, B]

How the T·E forwards (and the T backwards) are batched is the `forward_batch` knob:

* an int n: `lax.map(..., batch_size=n)`, i.e. a loop over groups of n configs, each group a
  `vmap`. On CPU this is the fast choice: one giant batch is slower than a loop of moderate ones
  and its activations for T·E copies of the chunk nearly fill RAM.
* None: one `vmap` over every config, the accelerator choice (the device is wide enough and the
  loop overhead would dominate); memory grows with T·E · `chunk_size`.
* "auto" (default): None on an accelerator, 16 on CPU, decided when called.

Data is processed `chunk_size` images at a time: a Python loop over a jitted function whose last
chunk is padded (with copies of the last image) to the same shape, so the program is traced and
compiled once for a (model, chunk shape, T, E) and reused for every chunk and every later call with
other T or ε VALUES. The jitted function takes `apply_fn` as a static argument: pass one that
hashes by value (`oodjax.models.inference_apply(model)`), not a fresh `functools.partial`.

`oodjax.metrics.metrics_grid` turns the [T, E, N] and [T, E, M] grids into [T, E] tables.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from oodjax.batching import map_padded
from oodjax.detectors.odin.preprocessing import odin_perturbation
from oodjax.detectors.softmax import (ApplyFn, check_grid, check_std, logits_of,
                                      max_softmax_score)

# On CPU, one configuration per lax.map step is fastest: grouping configs makes XLA run the
# network on a batch of (group x chunk) images, measured 3x slower for groups of 4 to 16 on
# 2 cores (500 images, 10 x 21 grid: 10.9 s at 1, 33 s at 4, 35 s at 16, 42 s fully vmapped).
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
  return jax.lax.map(fn, xs, batch_size=batch)


def _odin_grid_chunk(apply_fn: ApplyFn, variables: Any, x: jax.Array, temperatures: jax.Array,
                     epsilons: jax.Array, std: jax.Array, forward_batch: int | None
                     ) -> jax.Array:
  """[B, H, W, C] -> [T, E, B] ODIN scores; see the module docstring."""
  num_t, num_e = temperatures.shape[0], epsilons.shape[0]
  directions = _map(  # [T, B, H, W, C], one backward pass per temperature
      lambda t: odin_perturbation(apply_fn, variables, x, temperature=t, std=std),
      temperatures, forward_batch)
  # Configs in row-major (t, e) order, so the [T * E] results reshape straight to [T, E].
  t_index = jnp.repeat(jnp.arange(num_t), num_e)  # [T * E]
  e_index = jnp.tile(jnp.arange(num_e), num_t)  # [T * E]

  def forward(config):
    t, e = config
    x_tilde = x - epsilons[e] * directions[t]  # [B, H, W, C]
    return max_softmax_score(logits_of(apply_fn, variables, x_tilde), temperatures[t])  # [B]

  scores = _map(forward, (t_index, e_index), forward_batch)  # [T * E, B]
  return scores.reshape(num_t, num_e, x.shape[0])


_odin_grid_chunk_jit = jax.jit(_odin_grid_chunk, static_argnames=("apply_fn", "forward_batch"))


def odin_grid(apply_fn: ApplyFn, variables: Any, x, temperatures, epsilons, *, std,
              chunk_size: int = 256, forward_batch: int | None | str = "auto") -> np.ndarray:
  """ODIN scores of every image under every (temperature, epsilon) pair.

  `odin_grid(...)[t, e]` equals `odin_score(apply_fn, variables, x, temperature=temperatures[t],
  epsilon=epsilons[e], std=std)` up to float32 rounding, at the cost of T backward and T·E
  forward passes rather than T·E of each.

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
      (`oodjax.batching.map_padded`). Peak memory is about T · chunk_size input gradients
      plus the activations of `forward_batch` · chunk_size images (T · E · chunk_size with
      `forward_batch=None`).
    forward_batch: configs per step of the T backward and T·E forward passes: an int for
      `lax.map` groups (CPU), None for one full `vmap` (accelerators), "auto" to pick by backend.

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
