"""Training: a pytree train state, pure sharded steps, Orbax checkpoints, a classifier loop.

Only `oodjax.train.checkpoint` imports Orbax.
"""
from oodjax.train.classifier import config_hash, default_train_config, train_classifier
from oodjax.train.schedules import make_optimizer, make_schedule, paper_train_overrides
from oodjax.train.sharding import (batch_sharding, jit_eval_step, jit_train_step, make_mesh,
                                   replicated, state_sharding, with_shardings)
from oodjax.train.state import TrainState, create_train_state
from oodjax.train.step import (make_classification_loss, make_eval_step, make_train_step)
