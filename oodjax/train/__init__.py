"""Training: a pytree train state, pure sharded steps, Orbax checkpoints, one shared loop.

`oodjax.train.loop.run_job` resumes, steps, logs and checkpoints any method's `Job`; the
classifier (`train_classifier`), VMDLS and its autoencoder (`oodjax.vmdls.train`) are Jobs.
Only `oodjax.train.checkpoint` imports Orbax.
"""
from oodjax.train.classifier import config_hash, default_train_config, train_classifier
from oodjax.train.loop import Job, run_job
from oodjax.train.schedules import make_optimizer, make_schedule, paper_train_overrides
from oodjax.train.sharding import (batch_sharding, jit_eval_step, jit_train_step, make_mesh,
                                   replicated, state_sharding, with_shardings)
from oodjax.train.state import TrainState, create_train_state
from oodjax.train.step import (make_classification_loss, make_eval_step, make_train_step)

__all__ = [
    "Job", "TrainState", "batch_sharding", "config_hash", "create_train_state",
    "default_train_config", "jit_eval_step", "jit_train_step", "make_classification_loss",
    "make_eval_step", "make_mesh", "make_optimizer", "make_schedule", "make_train_step",
    "paper_train_overrides", "replicated", "run_job", "state_sharding", "train_classifier",
    "with_shardings",
]
