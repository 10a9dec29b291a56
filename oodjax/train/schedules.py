"""The papers' optimizers and learning-rate schedules, as optax, from a config.

ODIN (Liang et al., 2018, Sec. 4) trains DenseNet-BC-100 for 300 epochs at batch 64 and
Wide-ResNet-28-10 for 200 epochs at batch 128, both with SGD, Nesterov momentum 0.9 and a
learning rate of 0.1 divided by 10 at 50% and 75% of training (the DenseNet recipe of
Huang et al., 2017); weight decay 1e-4 for DenseNet, 5e-4 for WRN (Zagoruyko & Komodakis, 2016).
`paper_train_overrides` holds those numbers.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import optax


def make_schedule(train_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  Reads train_config.{learning_rate, schedule, lr_drop_at, lr_drop_factor}:
    "constant": learning_rate throughout.
    "step": learning_rate multiplied by lr_drop_factor (e.g. 0.1) at each fraction of
      `total_steps` in lr_drop_at (e.g. (0.5, 0.75)).
    "cosine": cosine decay from learning_rate to 0 over `total_steps`.
  """
  lr = float(train_config.learning_rate)
  kind = train_config.schedule
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "step":
    boundaries = {}
    for fraction in train_config.lr_drop_at:
      # Two fractions landing on the same step compound, as two drops would.
      boundary = int(round(float(fraction) * total_steps))
      boundaries[boundary] = boundaries.get(boundary, 1.0) * float(train_config.lr_drop_factor)
    return optax.piecewise_constant_schedule(lr, boundaries)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
  raise ValueError(f"unknown schedule {kind!r}; expected 'step', 'cosine' or 'constant'")


def make_optimizer(train_config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation a config asks for, and its learning-rate schedule.

  Reads train_config.{optimizer, momentum, nesterov, weight_decay} and the schedule keys:
    "sgd": SGD with (Nesterov) momentum; weight decay added to the gradient first, i.e. the
      L2 penalty of the PyTorch recipes the papers used, applied to every parameter
      (BatchNorm scales and biases included, as torch.optim.SGD(weight_decay=...) does).
    "adam": Adam with the same coupled L2 weight decay.
    "adamw": Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

  Args:
    train_config: the `config.train` ConfigDict.
    total_steps: optimizer updates in the whole run, for the schedule's fractions.

  Returns:
    (tx, schedule).
  """
  schedule = make_schedule(train_config, total_steps)
  wd = float(train_config.weight_decay)
  name = train_config.optimizer
  if name == "sgd":
    tx = optax.sgd(schedule, momentum=float(train_config.momentum) or None,
                   nesterov=bool(train_config.nesterov))
  elif name == "adam":
    tx = optax.adam(schedule)
  elif name == "adamw":
    return optax.adamw(schedule, weight_decay=wd), schedule
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd', 'adam' or 'adamw'")
  if wd:
    tx = optax.chain(optax.add_decayed_weights(wd), tx)
  return tx, schedule


def paper_train_overrides(recipe: str) -> dict[str, Any]:
  """`config.train` values of a paper's recipe, for `config.train.update(...)`.

  Args:
    recipe: "densenet_bc_100" (ODIN's DenseNet-BC, L=100, k=12) or "wrn_28_10".
  """
  common = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True,
                schedule="step", lr_drop_at=(0.5, 0.75), lr_drop_factor=0.1, augment=True)
  if recipe == "densenet_bc_100":
    return dict(common, num_epochs=300, batch_size=64, weight_decay=1e-4)
  if recipe == "wrn_28_10":
    return dict(common, num_epochs=200, batch_size=128, weight_decay=5e-4)
  raise ValueError(f"unknown recipe {recipe!r}; expected 'densenet_bc_100' or 'wrn_28_10'")
