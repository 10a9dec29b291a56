"""Pure train and eval steps, built from a loss function and an optax transformation.

A loss function has the signature

    loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, metrics))

  params: the "params" collection being differentiated.
  batch_stats: the BatchNorm statistics before the step ({} for models without BatchNorm).
  batch: any pytree of arrays, e.g. {"image": [B, H, W, C] float32, "label": [B] int32}.
  rng: a PRNG key for this step only (dropout, sampling); different at every step.
  loss: [] float32, the scalar that is differentiated (already reduced over the batch).
  new_batch_stats: the statistics after the forward pass (return `batch_stats` unchanged when
    the model has none).
  metrics: a dict of [] float32 scalars to log (may be empty). A method with several terms
    (VMDLS: KL + triplet + distancing; ENVISE: distillation) reports each term here.

Anything else a loss needs (a frozen teacher's parameters, class centres) is either closed over
by the loss function or carried in `batch`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from oodjax.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array],
                  tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, PyTree, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch, rng) -> (state, metrics)`.

  The step folds `state.step` into `rng`, so the caller passes the same run-wide key at every
  step and a resumed run draws exactly the keys an uninterrupted one would.

  Args:
    loss_fn: see the module docstring.
    tx: the optax transformation; `tx.update` receives `params` (for weight decay).

  Returns:
    A pure function; metrics holds "loss", "grad_norm" and whatever `loss_fn` reported, all
    [] float32.
  """
  def train_step(state: TrainState, batch: PyTree, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch,
                                                    step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

  return train_step


def _apply(apply_fn, params, batch_stats, images, *, train: bool, rng=None):
  """Calls a Linen apply function with or without BatchNorm statistics.

  Returns:
    (logits [B, K], new_batch_stats)
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  rngs = {"dropout": rng} if rng is not None else None
  if train and batch_stats:
    logits, updates = apply_fn(variables, images, train=True, rngs=rngs,
                               mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return apply_fn(variables, images, train=train, rngs=rngs), batch_stats


def make_classification_loss(apply_fn: Callable) -> LossFn:
  """The standard supervised loss: mean softmax cross-entropy with integer labels.

  Args:
    apply_fn: `model.apply` of a Linen classifier returning logits [B, K].

  Returns:
    A LossFn whose batch is {"image": [B, H, W, C] float32, "label": [B] int32} and whose
    metrics are {"accuracy": [] float32} (the training-mode accuracy of this batch).
  """
  def loss_fn(params, batch_stats, batch, rng):
    logits, new_batch_stats = _apply(apply_fn, params, batch_stats, batch["image"], train=True,
                                     rng=rng)  # [B, K]
    logits = logits.astype(jnp.float32)  # the loss in float32 whatever the model computes in
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])  # [B]
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
    return jnp.mean(per_example), (new_batch_stats, {"accuracy": accuracy})

  return loss_fn


def make_eval_step(apply_fn: Callable) -> Callable[[TrainState, PyTree], dict[str, jax.Array]]:
  """Returns `eval_step(state, batch) -> sums` for a classifier in inference mode.

  Sums rather than means, so batches of any size (and padding) add up exactly: accuracy is
  `correct / count` over the whole set. Examples with a negative label are padding and count
  for nothing, which lets a set be padded to a whole number of equal, shardable batches.

  Args:
    apply_fn: `model.apply` of a Linen classifier returning logits [B, K].

  Returns:
    A pure function of (state, {"image": [B, H, W, C] float32, "label": [B] int32}) returning
    {"loss_sum": [] float32, "correct": [] int32, "count": [] int32}.
  """
  def eval_step(state: TrainState, batch: PyTree) -> dict[str, jax.Array]:
    logits, _ = _apply(apply_fn, state.params, state.batch_stats, batch["image"], train=False)
    labels = batch["label"]  # [B]
    valid = labels >= 0
    # A padding label of -1 would index the last class; clip it and let `valid` zero it out.
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    return {"loss_sum": jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": jnp.sum(correct.astype(jnp.int32)),
            "count": jnp.sum(valid.astype(jnp.int32))}

  return eval_step
