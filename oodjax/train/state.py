"""The train state: a plain pytree of arrays, nothing else.

It holds no `apply_fn` and no optimizer object, only the numbers, so it can be passed through
`jax.jit`, sharded leaf by leaf, abstracted with `jax.eval_shape` and written by Orbax as is.
The functions that act on it (`apply_fn`, the optax transformation) travel separately, closed
over by the step functions of `oodjax.train.step`.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: [] int32, the number of optimizer updates applied so far.
    params: the model's "params" collection.
    batch_stats: the model's "batch_stats" collection (BatchNorm running statistics); an empty
      dict for models without BatchNorm.
    opt_state: the optax state of `tx` for `params`.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       sample_input: jax.Array) -> TrainState:
  """Initialises the model's variables and the optimizer state.

  Pure, so it can be wrapped in `jax.jit(..., out_shardings=...)` to create the state directly
  on a mesh, or in `jax.eval_shape` to get the abstract state a checkpoint is restored into.

  Args:
    model: a Flax Linen module called as `model.apply(variables, x, train=...)`.
    tx: the optax transformation that will update `params`.
    rng: a PRNG key for parameter initialisation (also used as the init-time dropout key).
    sample_input: [B, H, W, C] float32; only its shape and dtype matter.

  Returns:
    A TrainState at step 0.
  """
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, sample_input,
                         train=False)
  params = variables["params"]
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
