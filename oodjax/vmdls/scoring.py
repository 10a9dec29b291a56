"""VMDLS at test time: feature ensembles, class Gaussians, reconstruction weighting (Secs. 3.1-3.3).

    state = fit_vmdls(model, variables, train_ds, batch_size=500)          # VMDLS_b
    scores, c_max = score_vmdls_b(model, variables, state, x)               # [B], [B]
    state = fit_vmdls(..., autoencoder=ae, autoencoder_params=ae_params)   # VMDLS
    scores, c_max = score_vmdls(model, variables, state, x, autoencoder=ae)

Scores follow the library's convention, higher = more out-of-distribution:

* VMDLS_b: −l, with l = max_c l_c the best class log-likelihood of the feature ensemble
  (Sec. 3.2). Thresholding −l at λ is the paper's rule "ŷ = c_max if l > −λ, OOD otherwise".
* VMDLS: w · (L − l) (Sec. 3.3), with w = ‖t¹(x) − t¹(x̂)‖² of the autoencoder's
  reconstruction x̂, divided by its maximum over the training set (a constant: it changes no
  ranking). The paper writes l_new = w · l and accepts when l_new > λ; that weighting only does
  what Sec. 3.3 says ("the in-distribution values are vastly reduced") when l < 0, i.e. on the
  negative log-likelihood, and a Gaussian log-density in many dimensions is often positive. The
  authors' code makes it negative with a shift, l − (max l + 1), the max taken over the test
  set (ID and OOD together). Here L = max l + 1 over the TRAINING set, so no test data is used;
  L − l >= 1 on every training image. `shift=False` gives the literal −w · l.

The feature ensemble (Eq. 8) is t(x) = (t¹, t², t³, g(x), μ(g(x))): the first three blocks'
outputs, average-pooled over space, the backbone's penultimate vector g and the embedding μ,
all from ONE forward pass (`oodjax.models.forward_with_insides` with "head" and "blocks"). The
blocks are the maps a network passes from one resolution to the next: for ResNets and DenseNets
the stages' outputs (`is_stage`), as in the paper's Fig. 2; for a network that max-pools between
blocks (the small CNN, VGG, AlexNet) the pooled maps (`is_pool`), i.e. each block's output as the
next block reads it; otherwise the blocks themselves (`is_block_or_stage`). A network with fewer
than three gives fewer members. One anisotropic Gaussian per class is fitted to the whole
concatenated vector, as the paper (and its code) do.

Why the pooled map and not the block's own output where a pool follows: the paper defines the
members for ResNets only, and on XLA:CPU reading a map before its max-pool breaks the fused
conv-BN-ReLU-pool kernel: the small CNN's ensemble forward pass then cost 2.3x its plain forward
pass, against 1.0x for the pooled maps (benchmarks/README.md, "VMDLS").

References:
  Dinari & Freifeld 2022, VMDLS, Eq. 8, Secs. 3.1 (end), 3.2, 3.3.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oodjax.batching import map_padded
from oodjax.data.core import ImageDataset, normalize
from oodjax.models.insides import (forward_with_insides, is_block_or_stage, is_pool,
                                   is_stage)
from oodjax.vmdls import gaussians

# t¹, t², t³ (Eq. 8).
NUM_BLOCK_MEMBERS = 3


# Which module outputs are Eq. 8's block members (`ensemble_blocks`).
MEMBERS = ("pooled", "blocks")


def ensemble_blocks(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
                    members: str = "pooled") -> Callable:
  """The block predicate of Eq. 8 for `model`.

  members="pooled" (the default): its pooling modules if it has any, else its stages if it has
  any, else its blocks (see the module docstring). members="blocks": its stages if it has any,
  else its blocks, so a max-pooling network's members are its blocks' outputs before the pool
  (our definition until the scoring-cost work of issue 9; slower on XLA:CPU, and on the main
  job's small CNN better on the digits set).
  """
  if members not in MEMBERS:
    raise ValueError(f"members must be one of {MEMBERS}, got {members!r}")
  for predicate in (is_pool, is_stage) if members == "pooled" else (is_stage,):
    _, insides = jax.eval_shape(
        lambda v, x, p=predicate: forward_with_insides(model, v, x, which=("blocks",),
                                                       is_block=p),
        variables, x[:1])
    if insides.blocks:
      return predicate
  return is_block_or_stage


def _pool(a: jax.Array) -> jax.Array:
  """Global average pooling of a [B, h, w, c] map to [B, c]; [B, D] is left as it is."""
  return jnp.mean(a, axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a


def ensemble_members(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *,
                     is_block: Callable = is_block_or_stage) -> list[jax.Array]:
  """The members [t¹, t², t³, g, μ] of Eq. 8, each [B, F_i], from one inference-mode forward pass.

  Args:
    model: a `VMDLSEncoder` (or any model whose output is a Dense output: its "head" input is
      g and its output μ).
    variables: its variables.
    x: [B, H, W, C] normalised images.
    is_block: which modules are blocks (`ensemble_blocks` picks it per model).

  Returns:
    The block members (average-pooled; fewer than three if the network has fewer blocks),
    then g and μ.
  """
  mu, insides = forward_with_insides(model, variables, x, which=("head", "blocks"),
                                     is_block=is_block)
  members = [_pool(b) for b in insides.blocks[:NUM_BLOCK_MEMBERS]]
  return members + [insides.features, mu]


def feature_ensemble(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *,
                     is_block: Callable = is_block_or_stage
                     ) -> tuple[jax.Array, jax.Array]:
  """t(x) of Eq. 8 and its first member t¹(x), from one inference-mode forward pass.

  Args: as `ensemble_members`.

  Returns:
    t: [B, F] the concatenation (t¹, t², t³, g, μ), float32.
    t1: [B, F1] t¹ alone (the reconstruction weighting's feature, Sec. 3.3).
  """
  members = ensemble_members(model, variables, x, is_block=is_block)
  return jnp.concatenate(members, axis=-1), members[0]


class _FirstBlockDone(Exception):
  """Carries the first block's output out of a forward pass cut short (`first_member`)."""

  def __init__(self, value: jax.Array):
    super().__init__("first block reached")
    self.value = value


def first_member(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *,
                 is_block: Callable = is_block_or_stage) -> jax.Array:
  """t¹(x) alone, [B, F1], computing the network only up to its first block.

  Equal to `ensemble_members(...)[0]` (g when the network has no block), without the rest of
  the forward pass: the call of the first module `is_block` accepts raises as soon as it
  returns, so nothing after it is traced and XLA never computes it. The reconstruction weighting needs t¹ of the reconstruction x̂
  only (Sec. 3.3); a whole second forward pass would cost about as much as the scoring itself.
  """
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name == "__call__" and module.path and isinstance(out, jax.Array)
        and is_block(module, module.path)):
      raise _FirstBlockDone(out)
    return out

  try:
    with nn.intercept_methods(interceptor):
      model.apply(variables, x, train=False)
  except _FirstBlockDone as done:
    return _pool(done.value)
  # No block: the ensemble's first member is g, which needs the whole forward pass.
  return ensemble_members(model, variables, x, is_block=is_block)[0]


def ensemble_and_first_member(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
                              x_first: jax.Array, *, is_block: Callable = is_block_or_stage
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """t(x), t¹(x) and t¹(x_first) from ONE forward pass (VMDLS needs t¹ of the reconstruction).

  The batch [x; x_first] runs up to the end of the first block; from there on only x's half
  goes on. Equal to `feature_ensemble(x)` with `first_member(x_first)`, but the first block is
  one computation over both halves: two copies of it in one program made XLA:CPU materialise
  the BatchNorm's broadcast operands shared by both and cost 2x the ensemble forward pass
  (benchmarks/README.md, "VMDLS").

  Args: as `ensemble_members`, plus x_first: [B', H, W, C] normalised images.

  Returns:
    t [B, F], t¹(x) [B, F1], t¹(x_first) [B', F1].
  """
  batch = x.shape[0]
  cut = []

  def keep_x_after_first_block(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (not cut and context.method_name == "__call__" and module.path
        and isinstance(out, jax.Array) and is_block(module, module.path)):
      cut.append(module.path)
      return out[:batch]
    return out

  with nn.intercept_methods(keep_x_after_first_block):
    members = ensemble_members(model, variables, jnp.concatenate([x, x_first]),
                               is_block=is_block)
  if not cut:  # no block: t¹ is g, which needs x_first's whole forward pass
    members = ensemble_members(model, variables, x, is_block=is_block)
    t1_first = first_member(model, variables, x_first, is_block=is_block)
  else:  # the first member holds both halves (it was read before the cut)
    members[0], t1_first = members[0][:batch], members[0][batch:]
  return jnp.concatenate(members, axis=-1), members[0], t1_first


@functools.partial(jax.jit, static_argnames=("model", "is_block"))
def _ensemble_jit(variables, x, *, model, is_block):
  return feature_ensemble(model, variables, x, is_block=is_block)


def reconstruction_weight(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
                          autoencoder: nn.Module, autoencoder_params: Any, *,
                          is_block: Callable = is_block_or_stage,
                          t1: jax.Array | None = None) -> jax.Array:
  """w = ‖t¹(x) − t¹(x̂)‖² with x̂ the autoencoder's reconstruction of x (Sec. 3.3): [B].

  `t1` is t¹(x) when the caller already has it (from the same forward pass as t(x)).
  """
  x_hat = autoencoder.apply({"params": autoencoder_params}, x)
  if t1 is None:  # one pass over [x; x̂] (see `ensemble_and_first_member` for why)
    both = first_member(model, variables, jnp.concatenate([x, x_hat]), is_block=is_block)
    t1, t1_hat = both[:x.shape[0]], both[x.shape[0]:]
  else:
    t1_hat = first_member(model, variables, x_hat, is_block=is_block)
  return jnp.sum((t1 - t1_hat) ** 2, axis=-1)


def _best_of(state: Mapping[str, Any], t: jax.Array) -> tuple[jax.Array, jax.Array]:
  fitted = gaussians.ClassGaussians(means=state["means"], whitening=state["whitening"],
                                    log_det=state["log_det"], ridge=state["ridge"])
  return gaussians.best_class(gaussians.log_likelihoods(fitted, t))


def fit_vmdls(model: nn.Module, variables: Mapping[str, Any], train_ds: ImageDataset, *,
              batch_size: int = 500, ridge: float = 1e-6, autoencoder: nn.Module | None = None,
              autoencoder_params: Any = None, shift: bool = True,
              members: str = "pooled") -> dict[str, Any]:
  """Fits the class Gaussians of VMDLS_b (and, given an autoencoder, VMDLS's constants).

  One pass over the training images without augmentation (Sec. 3.1: "with no augmentations"),
  accumulating each class's sums in float64; see `oodjax.vmdls.gaussians` for the covariance
  and its ridge. With an autoencoder, a second pass computes l and w of every training image
  for L = max l + 1 and w's scale (see the module docstring).

  Args:
    model, variables: the trained VMDLS encoder.
    train_ds: the in-distribution training set (labelled), the only data VMDLS sees.
    batch_size: images per compiled call.
    ridge: the covariance ridge, relative to each class's mean variance.
    autoencoder, autoencoder_params: the trained autoencoder (VMDLS); None for VMDLS_b only.
    shift: use L − l (True) or −l (False, the literal Sec. 3.3) in VMDLS's product.
    members: which module outputs are the block members (`ensemble_blocks`); score with the
      same value.

  Returns:
    The state: {"means" [C, F], "whitening" [C, F, F], "log_det" [C], "ridge" [C] (the
    multiple of I each covariance received)} and, with an
    autoencoder, "autoencoder" (its params), "log_lik_max" [] (L) and "w_scale" [].
  """
  if train_ds.labels is None:
    raise ValueError(f"{train_ds.name!r} has no labels: the class Gaussians need them")
  x0 = normalize(train_ds.images[:1], train_ds.mean, train_ds.std)
  is_block = ensemble_blocks(model, variables, x0, members)
  sums = None
  for start in range(0, len(train_ds), batch_size):
    images = normalize(train_ds.images[start:start + batch_size], train_ds.mean, train_ds.std)
    t, _ = jax.device_get(_ensemble_jit(variables, images, model=model, is_block=is_block))
    labels = train_ds.labels[start:start + batch_size]
    if sums is None:
      sums = gaussians.empty_sums(train_ds.num_classes, t.shape[-1])
    sums = gaussians.accumulate(sums, t, labels)
  fitted = gaussians.fit_class_gaussians(sums, ridge=ridge)
  state = {"means": np.asarray(fitted.means, np.float32),
           "whitening": np.asarray(fitted.whitening, np.float32),
           "log_det": np.asarray(fitted.log_det, np.float32),
           "ridge": np.asarray(fitted.ridge, np.float32)}
  if autoencoder is None:
    return state

  def pieces(x):
    log_lik, _, w = _log_lik_and_weight(model, variables, state, x, autoencoder,
                                        autoencoder_params, is_block)
    return log_lik, w

  log_lik, w = map_padded(
      jax.jit(pieces),
      normalize(train_ds.images, train_ds.mean, train_ds.std), batch_size)
  state.update(autoencoder=autoencoder_params,
               log_lik_max=np.float32(np.max(log_lik) + 1.0 if shift else 0.0),
               w_scale=np.float32(max(float(np.max(w)), 1e-30)))
  return state


def best_log_likelihood(model, variables, state, x, *, is_block=None, members: str = "pooled"
                        ) -> tuple[jax.Array, jax.Array]:
  """(l [B], c_max [B]): the best class log-likelihood of t(x) and its class (Sec. 3.2)."""
  if is_block is None:
    is_block = ensemble_blocks(model, variables, x, members)
  t, _ = feature_ensemble(model, variables, x, is_block=is_block)
  return _best_of(state, t)


def score_vmdls_b(model, variables, state, x, *, members: str = "pooled"
                  ) -> tuple[jax.Array, jax.Array]:
  """VMDLS_b: (−l [B], c_max [B]); higher = more OOD."""
  log_lik, c_max = best_log_likelihood(model, variables, state, x, members=members)
  return -log_lik, c_max


def _log_lik_and_weight(model, variables, state, x, autoencoder, autoencoder_params, is_block
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(l [B], c_max [B], w [B]) of Secs. 3.2-3.3, from one forward pass of x and x̂ together."""
  x_hat = autoencoder.apply({"params": autoencoder_params}, x)
  t, t1, t1_hat = ensemble_and_first_member(model, variables, x, x_hat, is_block=is_block)
  log_lik, c_max = _best_of(state, t)
  return log_lik, c_max, jnp.sum((t1 - t1_hat) ** 2, axis=-1)


def score_vmdls(model, variables, state, x, *, autoencoder: nn.Module, members: str = "pooled"
                ) -> tuple[jax.Array, jax.Array]:
  """VMDLS: (w / w_scale · (L − l) [B], c_max [B]); higher = more OOD (Sec. 3.3)."""
  is_block = ensemble_blocks(model, variables, x, members)
  log_lik, c_max, w = _log_lik_and_weight(model, variables, state, x, autoencoder,
                                          state["autoencoder"], is_block)
  return w / state["w_scale"] * (state["log_lik_max"] - log_lik), c_max
