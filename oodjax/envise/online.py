"""The ENVISE online distillation loop: adaptive phase, inference phase with routing, logs.

    config = online_config(adaptive=dict(max_steps=200, window=20))
    teacher, teacher_vars = train_teacher(train_config, "runs/tn", model=tn, train_ds=train)
    stream = make_stream(train, [EMBEDDED_SCENARIOS["zoo"], EMBEDDED_SCENARIOS["shop"]],
                         images_per_scenario=4000)
    summary = run_online(config, "runs/bsn", teacher=teacher, teacher_variables=teacher_vars,
                         student=get_student("binary_tiny", 20), stream=stream)
    plot_online({"BSN": "runs/bsn/online.jsonl", "RvSN": "runs/rvsn/online.jsonl"}, "fig3.png")

What happens (Sec. 3 and 4 of the paper, Figures 1a and 3). The stream plays its scenarios one
after the other. Each scenario begins with an ADAPTIVE phase: the frozen teacher (TN) labels
every image and gives its Grad-CAM map; the student takes one Adam step on L_f = lambda1 L_d +
lambda2 L_at (Eq. 6, `oodjax.envise.losses.envise_loss`) per batch; during it every image is
classified by the teacher (the student is still learning). The phase ends when the student has
converged (below) or after `adaptive.max_steps` steps. Then the INFERENCE phase runs until the
scenario ends: the student classifies each image, and an image whose student confidence (max
softmax, Hendrycks & Gimpel, as the paper's Sec. 4 says) is below the threshold tau is routed to
the teacher; the combined prediction is the teacher's where routed, the student's elsewhere. A
scenario change starts a new adaptive phase from the current student weights.

Choices where the paper is silent (all in `online_config`):

  * Convergence. The paper stops "once its accuracy converges to that of the TN". Deployed,
    there are no labels, so we measure the student's AGREEMENT with the teacher's labels, which
    is 1 exactly when the student's predictions (hence its accuracy) equal the teacher's. It is
    measured prequentially: each batch is classified by the student BEFORE the update on it, so
    it is always a held-out estimate. Agreement is pooled over non-overlapping windows of
    `adaptive.window` steps counted from the phase's start. At the end of each window the phase
    has converged when (a) the window's agreement >= `adaptive.target_agreement` ("target"), or
    (b) the best window agreement of the phase has not improved by more than
    `adaptive.min_delta` for `adaptive.patience` windows in a row ("plateau"). Otherwise it ends
    at `adaptive.max_steps` ("max_steps"; the paper's 10 epochs: `max_epochs` x `epoch_size`
    images) or at the end of the scenario ("scenario_end", then there is no inference phase).
  * Threshold (rule "quantile", default). tau is set once per scenario at the end of its
    adaptive phase, from the adapted student's confidences on the images of the phase's last
    window (the last min(window, phase length) batches, re-read from the stream: the threshold
    is a function of the stream and the final weights). With the n confidences sorted
    ascending, c_(0) <= ... <= c_(n-1), and m = floor(n (1 - keep)), tau = c_(m), and an
    image is routed when its confidence is < tau: at most m of those n images (exactly m
    without ties) go to the teacher, at least `keep` (95%) stay with the student. No label is
    read, so outlier labels can never leak into tau. Rule "fixed" uses `routing.threshold`.
  * Which images the adaptive phase sees. The paper trains on inlier classes only (Table 1's
    "# OL train" = 0). Pass `adaptive_stream=make_stream(ds, [inliers_only(s) for s in ...],
    <same lengths and batch size>)` for that: adaptive steps read their batch from it, inference
    steps from `stream` (both indexed by the same global step). Without it the adaptive phase
    trains on the mixed stream, the issue's reading ("the student trains on the stream").
  * Optimiser. Adam (lr 1e-4, the paper's) whose moments are reset at each scenario start
    (`adaptive.reset_optimizer`): a new scenario is a new training run from the current weights.
  * BatchNorm. `loss.batchnorm="train"` (default): batch statistics in the loss's logits and
    running averages updated (momentum 0.9), Grad-CAM maps from the running statistics (see
    `envise_loss`); "inference": running statistics everywhere and never updated.
  * Student kinds (Figure 3): "bsn" trains and deploys the binary student; "rvsn" its real twin;
    "binarised_rvsn" trains the real twin and deploys it directly binarised
    (`students.binary_twin`, the "quantized BSN"); "standalone" is a binary student never
    adapted (its "adaptive phase" only logs). All start from the same initial weights for a
    given seed (twins share their parameter tree).

Bookkeeping. Every step logs one JSON line to `workdir/online.jsonl` (see `RECORD_FIELDS`);
accuracies are measured against the stream's true labels, which the system itself never sees.
The teacher classifies every image for the log's teacher accuracy, although deployed it would see
only the routed ones. `summarize` turns the log into the per-scenario summary `run_online`
returns, whose routed fractions of inliers and outliers feed `efficiency.gain_in_efficiency`.

Snapshots. At the end of every scenario the student's variables (those deployed in it) are
written to `workdir/students/scenario_<i>.msgpack` (`load_snapshot`), for the gates'
evaluation (`oodjax.envise.pipeline`).

Resuming. The batch at step t is a pure function of (stream, t); the student state and the
loop's counters are checkpointed with Orbax (`oodjax.train.checkpoint`) every
`checkpoint.every_steps` steps and at the end of every phase. Rerunning `run_online` in the same
workdir restores the newest checkpoint, drops the log lines written after it and continues: the
log is identical to that of an uninterrupted run.

References:
  Sharma et al. 2021 (ICLR submission), ENVISE, Sec. 3 (framework, Figure 1a), Sec. 4 (Adam,
    lr 1e-4, batch 10, 10 adaptive epochs, max-softmax confidence, Figure 3).
  Hendrycks & Gimpel 2017, A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples (max softmax).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from oodjax.envise import gradcam as gradcam_lib
from oodjax.envise import losses as losses_lib
from oodjax.envise import students as students_lib
from oodjax.envise.stream import ImageStream, batch_at
from oodjax.models.insides import inference_apply
from oodjax.train import checkpoint as ckpt
from oodjax.train.classifier import train_classifier
from oodjax.train.state import TrainState, create_train_state

PyTree = Any

logger = logging.getLogger(__name__)

LOG_NAME = "online.jsonl"
STUDENT_KINDS = ("bsn", "rvsn", "binarised_rvsn", "standalone")
OPTIMIZERS = ("adam", "sgd")
BATCHNORM_MODES = ("train", "inference")
ROUTING_RULES = ("quantile", "fixed")
ADAPTIVE_ENDS = ("target", "plateau", "max_steps", "scenario_end")

# Fields of every log line; adaptive lines add "loss", "distillation", "attention" and, at the
# end of a window, "window_agreement"; the last line of a phase adds "phase_end" (a reason of
# ADAPTIVE_ENDS for the adaptive phase, "scenario_end" for the inference phase).
RECORD_FIELDS = (
    "phase", "scenario", "scenario_name", "step", "phase_step", "student_kind", "threshold",
    "student_accuracy", "teacher_accuracy", "combined_accuracy", "agreement",
    "routed_fraction", "routed_fraction_inliers", "routed_fraction_outliers",
    "n", "n_inliers", "n_outliers", "student_correct", "teacher_correct", "combined_correct",
    "agree", "routed", "routed_inliers", "routed_outliers")

# The student is a TrainState: step, params, batch_stats, opt_state (a plain pytree).
StudentState = TrainState


# ---------------------------------------------------------------------------------------------
# Config


def online_config(**overrides) -> ml_collections.ConfigDict:
  """The paper's defaults (Sec. 4) and ours, locked, with `overrides` applied and validated.

  Keys (groups take a dict of their keys as an override, e.g. `adaptive=dict(window=20)`):

    seed                       student initialisation.
    student_kind               one of STUDENT_KINDS ("bsn").
    batch_size                 10 (paper); must equal the stream's.
    optimizer.name             "adam" (paper) or "sgd".
    optimizer.learning_rate    1e-4 (paper).
    loss.lambda_d, lambda_at   lambda1 = 1, lambda2 = 0.2 (Eq. 6).
    loss.margin                delta = 1.5 (Eq. 5).
    loss.attention             "triplet" (L_at, Eq. 5), "l2" (L_a, Eq. 21), "none" (L_d only).
    loss.negative              "incorrect" or "second" (see `losses.hard_negative_classes`).
    loss.temperature           None: hard pseudo-labels (paper); T > 0: the soft L_d option.
    loss.batchnorm             "train" or "inference" (see the module docstring).
    loss.pixel_mean            True: L_at scaled by 1/(N K) as Eq. 5 prints; False: summed over
                               the K pixels (see `losses.attention_triplet_loss`).
    loss.cam_target            "logit" (Grad-CAM, the paper) or "centred" (y^c - mean_k y^k;
                               see `oodjax.envise.gradcam`, "Dead maps").
    adaptive.max_epochs        10 (paper); with adaptive.epoch_size (images per epoch) gives
                               the cap ceil(max_epochs * epoch_size / batch_size) steps.
    adaptive.epoch_size        None: no epoch-based cap.
    adaptive.max_steps         None, or a cap in steps (wins over the epoch-based one). With
                               neither, only convergence or the scenario's end stop the phase.
    adaptive.window            W, steps per convergence window (50 = 500 images).
    adaptive.target_agreement  0.95: converged when a window's agreement reaches it.
    adaptive.min_delta         0.005: a smaller gain over the phase's best is no improvement.
    adaptive.patience          3 windows without improvement: converged ("plateau").
    adaptive.reset_optimizer   True: fresh Adam moments at each scenario's start.
    routing.rule               "quantile" (default) or "fixed".
    routing.keep               0.95: share of the last window's images kept by the student.
    routing.threshold          tau for rule "fixed", in [0, 1].
    checkpoint.every_steps     save every N stream steps (and at each phase's end).
    checkpoint.keep            newest checkpoints kept.
    checkpoint.async_save      write in a background thread.

  Raises:
    ValueError: an unknown key or an invalid value (see `validate_online_config`).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.student_kind = "bsn"
  config.batch_size = 10
  config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-4})
  config.loss = ml_collections.ConfigDict({
      "lambda_d": 1.0, "lambda_at": 0.2, "margin": 1.5, "attention": "triplet",
      "negative": "incorrect", "temperature": None, "batchnorm": "train", "pixel_mean": True,
      "cam_target": "logit"})
  config.adaptive = ml_collections.ConfigDict({
      "max_epochs": 10, "epoch_size": None, "max_steps": None, "window": 50,
      "target_agreement": 0.95, "min_delta": 0.005, "patience": 3, "reset_optimizer": True})
  config.routing = ml_collections.ConfigDict({"rule": "quantile", "keep": 0.95, "threshold": 0.5})
  config.checkpoint = ml_collections.ConfigDict({"every_steps": 100, "keep": 2, "async_save": True})
  config.lock()
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"unknown online config key {key!r}; known: {sorted(config)}")
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f"override of group {key!r} must be a dict of its keys "  # noqa: TRY004
                         f"{sorted(config[key])}, got {value!r}")
      for sub, sub_value in value.items():
        if sub not in config[key]:
          raise ValueError(f"unknown key {key}.{sub}; known: {sorted(config[key])}")
        config[key][sub] = sub_value
    else:
      config[key] = value
  validate_online_config(config)
  return config


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_online_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the key, for any invalid entry of an `online_config`."""
  def need(ok: bool, key: str, what: str):
    if not ok:
      value = config
      for part in key.split("."):
        value = value[part]
      raise ValueError(f"config.{key} must be {what}, got {value!r}")

  need(_is_int(config.seed), "seed", "an integer")
  need(config.student_kind in STUDENT_KINDS, "student_kind", f"one of {STUDENT_KINDS}")
  need(_is_int(config.batch_size) and config.batch_size >= 1, "batch_size", "an integer >= 1")
  need(config.optimizer.name in OPTIMIZERS, "optimizer.name", f"one of {OPTIMIZERS}")
  lr = config.optimizer.learning_rate
  need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
       "optimizer.learning_rate", "a finite number > 0")
  lc = config.loss
  for name in ("lambda_d", "lambda_at", "margin"):
    value = lc[name]
    need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
         f"loss.{name}", "a finite number >= 0")
  need(lc.attention in losses_lib.ATTENTION_LOSSES, "loss.attention",
       f"one of {losses_lib.ATTENTION_LOSSES}")
  need(lc.negative in losses_lib.NEGATIVES, "loss.negative", f"one of {losses_lib.NEGATIVES}")
  need(lc.temperature is None or (isinstance(lc.temperature, (int, float))
                                  and lc.temperature > 0),
       "loss.temperature", "None (hard labels) or a number > 0")
  need(lc.batchnorm in BATCHNORM_MODES, "loss.batchnorm", f"one of {BATCHNORM_MODES}")
  need(isinstance(lc.pixel_mean, bool), "loss.pixel_mean", "a bool")
  need(lc.cam_target in gradcam_lib.TARGETS, "loss.cam_target", f"one of {gradcam_lib.TARGETS}")
  ac = config.adaptive
  need(_is_int(ac.max_epochs) and ac.max_epochs >= 1, "adaptive.max_epochs", "an integer >= 1")
  need(ac.epoch_size is None or (_is_int(ac.epoch_size) and ac.epoch_size >= 1),
       "adaptive.epoch_size", "None or an integer >= 1 (images per epoch)")
  need(ac.max_steps is None or (_is_int(ac.max_steps) and ac.max_steps >= 1),
       "adaptive.max_steps", "None or an integer >= 1")
  need(_is_int(ac.window) and ac.window >= 1, "adaptive.window", "an integer >= 1")
  need(isinstance(ac.target_agreement, (int, float)) and 0 < ac.target_agreement <= 1,
       "adaptive.target_agreement", "in (0, 1]")
  need(isinstance(ac.min_delta, (int, float)) and ac.min_delta >= 0, "adaptive.min_delta",
       "a number >= 0")
  need(_is_int(ac.patience) and ac.patience >= 1, "adaptive.patience", "an integer >= 1")
  need(isinstance(ac.reset_optimizer, bool), "adaptive.reset_optimizer", "a bool")
  rc = config.routing
  need(rc.rule in ROUTING_RULES, "routing.rule", f"one of {ROUTING_RULES}")
  need(isinstance(rc.keep, (int, float)) and 0 < rc.keep <= 1, "routing.keep", "in (0, 1]")
  need(isinstance(rc.threshold, (int, float)) and 0 <= rc.threshold <= 1, "routing.threshold",
       "in [0, 1] (a max-softmax confidence)")
  cc = config.checkpoint
  need(_is_int(cc.every_steps) and cc.every_steps >= 1, "checkpoint.every_steps",
       "an integer >= 1")
  need(_is_int(cc.keep) and cc.keep >= 1, "checkpoint.keep", "an integer >= 1")
  need(isinstance(cc.async_save, bool), "checkpoint.async_save", "a bool")


def max_adaptive_steps(config: ml_collections.ConfigDict) -> int | None:
  """The cap on an adaptive phase in steps: `max_steps`, else ceil(max_epochs * epoch_size / B),
  else None (no cap)."""
  ac = config.adaptive
  if ac.max_steps is not None:
    return int(ac.max_steps)
  if ac.epoch_size is not None:
    return -(-int(ac.max_epochs) * int(ac.epoch_size) // int(config.batch_size))
  return None


# ---------------------------------------------------------------------------------------------
# Teacher


def train_teacher(train_config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                  model: nn.Module, train_ds, eval_ds=None, progress: bool | None = None
                  ) -> tuple[nn.Module, dict[str, PyTree]]:
  """The frozen teacher (TN): `model` trained by the foundation trainer on all of `train_ds`'s
  classes (`oodjax.train.classifier.train_classifier`, resumable; a finished run is restored).

  Args:
    train_config: a `default_train_config()`-style config (seed, train, mesh, checkpoint).
    workdir: the teacher's own directory (checkpoints, metrics.jsonl).
    model: a zoo classifier with K = train_ds.num_classes outputs.
    train_ds: the labelled training set (all classes the streams may show).
    eval_ds: optional evaluation set.
    progress: tqdm progress bar (None: when stderr is a terminal).

  Returns:
    (model, variables) with variables {"params": ...[, "batch_stats": ...]}, for `run_online`.
  """
  state, _ = train_classifier(train_config, workdir, model=model, train_ds=train_ds,
                              eval_ds=eval_ds, progress=progress)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return model, variables


# ---------------------------------------------------------------------------------------------
# Student state and the adaptive step


def student_modules(student: nn.Module, kind: str) -> tuple[nn.Module, nn.Module]:
  """(module trained, module deployed) for a student kind (see the module docstring).

  Students from `get_student` are switched to the kind's twin; a module without a `binary`
  attribute is used as given for "bsn", "rvsn" and "standalone".
  """
  if kind not in STUDENT_KINDS:
    raise ValueError(f"student kind must be one of {STUDENT_KINDS}, got {kind!r}")
  has_twin = hasattr(student, "binary")
  if kind == "binarised_rvsn":
    if not has_twin:
      raise ValueError(f"student kind 'binarised_rvsn' needs a student with binary twins "
                       f"(from get_student), got {type(student).__name__}")
    return students_lib.binary_twin(student, False), students_lib.binary_twin(student, True)
  if not has_twin:
    return student, student
  module = students_lib.binary_twin(student, kind != "rvsn")
  return module, module


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about the adaptive step; hashable, so equal specs share one program.

  Attributes:
    student: the module trained (see `student_modules`).
    teacher: the teacher module.
    optimizer: "adam" or "sgd".
    learning_rate: the step size.
    margin, lambda_d, lambda_at, attention, negative, temperature, pixel_mean, cam_target:
      `envise_loss` options.
    batchnorm: "train" or "inference".
  """
  student: nn.Module
  teacher: nn.Module
  optimizer: str = "adam"
  learning_rate: float = 1e-4
  margin: float = 1.5
  lambda_d: float = 1.0
  lambda_at: float = 0.2
  attention: str = "triplet"
  negative: str = "incorrect"
  temperature: float | None = None
  batchnorm: str = "train"
  pixel_mean: bool = True
  cam_target: str = "logit"

  def tx(self) -> optax.GradientTransformation:
    if self.optimizer == "adam":
      return optax.adam(self.learning_rate)
    return optax.sgd(self.learning_rate)


def step_spec(config: ml_collections.ConfigDict, student: nn.Module, teacher: nn.Module
              ) -> StepSpec:
  """The StepSpec of a validated config for the module `student` trains."""
  lc = config.loss
  return StepSpec(student=student, teacher=teacher, optimizer=config.optimizer.name,
                  learning_rate=float(config.optimizer.learning_rate),
                  margin=float(lc.margin), lambda_d=float(lc.lambda_d),
                  lambda_at=float(lc.lambda_at), attention=lc.attention, negative=lc.negative,
                  temperature=None if lc.temperature is None else float(lc.temperature),
                  batchnorm=lc.batchnorm, pixel_mean=bool(lc.pixel_mean),
                  cam_target=lc.cam_target)


def create_student_state(spec: StepSpec, rng: jax.Array, sample_input: jax.Array,
                         variables: Mapping[str, PyTree] | None = None) -> StudentState:
  """A fresh StudentState (step 0, optimizer state of `spec`), initialised from `rng` or from
  given `variables` ({"params", "batch_stats"}).

  Args:
    spec: the adaptive step's spec (its student and optimizer).
    rng: key for the initialisation (unused when `variables` is given).
    sample_input: [1, H, W, C] float32; only its shape matters.
    variables: optional pretrained student variables.
  """
  if variables is None:
    return _init_state(spec, rng, jnp.zeros(sample_input.shape, sample_input.dtype))
  params = variables["params"]
  return StudentState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=spec.tx().init(params))


# Jitted (op by op, initialising even a tiny network takes seconds on CPU), keyed on the
# hashable spec so every run with an equal spec reuses the program.
@functools.partial(jax.jit, static_argnums=0)
def _init_state(spec: StepSpec, rng: jax.Array, sample_input: jax.Array) -> StudentState:
  return create_train_state(spec.student, spec.tx(), rng, sample_input)


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def adaptive_loss(spec: StepSpec, params: PyTree, batch_stats: PyTree,
                  teacher_variables: PyTree, x: jax.Array
                  ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]:
  """L_f (Eq. 6) of the student on one batch, and the updated BatchNorm statistics.

  Args:
    spec: the step's spec.
    params: the student's latent (real-valued) parameters, differentiated.
    batch_stats: its BatchNorm running statistics.
    teacher_variables: the frozen teacher's variables.
    x: [B, H, W, C] normalised images.

  Returns:
    (loss [] = mean of the per-example L_f, (new batch_stats, aux of `envise_loss`)).
  """
  variables = _variables(params, batch_stats)
  train_logits = None
  new_stats = batch_stats
  if spec.batchnorm == "train" and batch_stats:
    train_logits, updates = spec.student.apply(variables, x, train=True,
                                               mutable=["batch_stats"])
    new_stats = updates["batch_stats"]
  per_example, aux = losses_lib.envise_loss(
      spec.student, variables, spec.teacher, teacher_variables, x, margin=spec.margin,
      lambda_d=spec.lambda_d, lambda_at=spec.lambda_at, attention=spec.attention,
      temperature=spec.temperature, negative=spec.negative, student_logits=train_logits,
      pixel_mean=spec.pixel_mean, cam_target=spec.cam_target)
  return per_example.mean(), (new_stats, aux)


def adaptive_update(spec: StepSpec, state: StudentState, teacher_variables: PyTree,
                    x: jax.Array) -> tuple[StudentState, dict[str, jax.Array]]:
  """One adaptive update: teacher labels and maps -> L_f -> optimizer step on the latent weights.

  Not jitted (`adaptive_step` is its jitted form), so a caller can trace it with a spec whose
  margin is an array (`oodjax.envise.ablation` vmaps it over margins).

  Args:
    spec: static; see `StepSpec`.
    state: the student's state.
    teacher_variables: the frozen teacher's variables (never updated).
    x: [B, H, W, C] normalised images.

  Returns:
    (new state, {"loss", "distillation", "attention"} [] float32 means over the batch, computed
    before the update).
  """
  grad_fn = jax.value_and_grad(adaptive_loss, argnums=1, has_aux=True)
  (loss, (new_stats, aux)), grads = grad_fn(spec, state.params, state.batch_stats,
                                            teacher_variables, x)
  updates, opt_state = spec.tx().update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state)
  return new_state, {"loss": loss, "distillation": aux["distillation"].mean(),
                     "attention": aux["attention"].mean()}


adaptive_step = jax.jit(adaptive_update, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def predict(student, teacher, student_variables: PyTree, teacher_variables: PyTree,
            x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inference-mode logits of the deployed student and of the teacher: two [B, K] arrays.

  `student` and `teacher` are `inference_apply(module)` (static, hashable by value)."""
  return student(student_variables, x), teacher(teacher_variables, x)


# ---------------------------------------------------------------------------------------------
# Routing


def confidence(logits: jax.Array) -> jax.Array:
  """Max softmax probability (Hendrycks & Gimpel): [B, K] -> [B]."""
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def confidence_threshold(confidences, keep: float = 0.95) -> np.float32:
  """tau of the "quantile" rule: with c sorted ascending and m = floor(n (1 - keep)), c_(m).

  Routing `confidence < tau` then sends at most m of these n images (exactly m without ties) to
  the teacher, so at least `keep` of them stay with the student.

  Args:
    confidences: [n] max-softmax confidences of in-distribution (adaptive-phase) images.
    keep: share kept by the student, in (0, 1].

  Returns:
    tau as float32 (the dtype the confidences are compared in).
  """
  c = np.sort(np.asarray(confidences, np.float32).reshape(-1))
  if c.size == 0:
    raise ValueError("need at least one confidence to set a threshold")
  if not 0 < keep <= 1:
    raise ValueError(f"keep must be in (0, 1], got {keep}")
  m = math.floor(c.size * (1.0 - keep) + 1e-9)
  return np.float32(c[min(m, c.size - 1)])


@jax.jit
def routing_counts(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                   inlier: jax.Array, threshold: jax.Array) -> dict[str, jax.Array]:
  """Routing and accuracy counts of one batch.

  An image is routed to the teacher when the student's max softmax < threshold; the combined
  prediction is the teacher's where routed, the student's elsewhere.

  Args:
    student_logits: [B, K] of the deployed student.
    teacher_logits: [B, K].
    labels: [B] true classes (for the log only).
    inlier: [B] bool, the image's class is an inlier of the scenario (for the log only).
    threshold: [] tau; +inf routes everything (the adaptive phase), -inf nothing.

  Returns:
    [] int32 counts: "n", "n_inliers", "n_outliers", "student_correct", "teacher_correct",
    "combined_correct", "agree" (student and teacher predict the same class), "routed",
    "routed_inliers", "routed_outliers".
  """
  s_pred = jnp.argmax(student_logits, axis=-1)  # [B]
  t_pred = jnp.argmax(teacher_logits, axis=-1)  # [B]
  routed = confidence(student_logits) < threshold  # [B]
  combined = jnp.where(routed, t_pred, s_pred)  # [B]
  inlier = inlier.astype(bool)

  def count(mask):
    return jnp.sum(mask, dtype=jnp.int32)

  return {"n": jnp.int32(labels.shape[0]), "n_inliers": count(inlier),
          "n_outliers": count(~inlier), "student_correct": count(s_pred == labels),
          "teacher_correct": count(t_pred == labels), "combined_correct": count(combined == labels),
          "agree": count(s_pred == t_pred), "routed": count(routed),
          "routed_inliers": count(routed & inlier), "routed_outliers": count(routed & ~inlier)}


def _ratio(num: int, den: int) -> float | None:
  return num / den if den else None


def count_metrics(counts: Mapping[str, int]) -> dict[str, float | None]:
  """Accuracies and routed fractions from `routing_counts`-style counts (None for 0 / 0)."""
  c = counts
  return {"student_accuracy": _ratio(c["student_correct"], c["n"]),
          "teacher_accuracy": _ratio(c["teacher_correct"], c["n"]),
          "combined_accuracy": _ratio(c["combined_correct"], c["n"]),
          "agreement": _ratio(c["agree"], c["n"]),
          "routed_fraction": _ratio(c["routed"], c["n"]),
          "routed_fraction_inliers": _ratio(c["routed_inliers"], c["n_inliers"]),
          "routed_fraction_outliers": _ratio(c["routed_outliers"], c["n_outliers"])}


# ---------------------------------------------------------------------------------------------
# The loop


def _check_inputs(config, teacher, teacher_variables, stream: ImageStream,
                  adaptive_stream: ImageStream | None, spec: StepSpec, deployed: nn.Module,
                  state: StudentState) -> None:
  """Errors before anything runs: batch sizes, stream compatibility, class counts, Grad-CAM."""
  if stream.batch_size != config.batch_size:
    raise ValueError(f"the stream's batch size {stream.batch_size} differs from "
                     f"config.batch_size {config.batch_size}; build the stream with "
                     f"batch_size={config.batch_size}")
  if adaptive_stream is not None:
    same = (adaptive_stream.steps_per_scenario == stream.steps_per_scenario
            and adaptive_stream.batch_size == stream.batch_size
            and adaptive_stream.class_names == stream.class_names
            and adaptive_stream.images.shape[1:] == stream.images.shape[1:])
    if not same:
      raise ValueError("adaptive_stream must match stream in steps per scenario "
                       f"({adaptive_stream.steps_per_scenario} vs {stream.steps_per_scenario}), "
                       "batch size, class names and image shape")
  x = jax.ShapeDtypeStruct((stream.batch_size, *stream.images.shape[1:]), jnp.float32)
  num_classes = len(stream.class_names)
  s_logits, t_logits = jax.eval_shape(
      lambda sv, tv, x: predict(inference_apply(deployed), inference_apply(teacher), sv, tv, x),
      _variables(state.params, state.batch_stats), teacher_variables, x)
  for who, logits in (("student", s_logits), ("teacher", t_logits)):
    if logits.shape != (stream.batch_size, num_classes):
      raise ValueError(f"the {who} maps a batch to logits {logits.shape}, expected "
                       f"({stream.batch_size}, {num_classes}) for the stream's classes")
  if config.student_kind != "standalone":
    # Traces the whole step (second-order Grad-CAM included): a student or teacher without a
    # feature map fails here, before any training.
    jax.eval_shape(lambda s, tv, x: adaptive_step(spec, s, tv, x), state, teacher_variables, x)


def _new_scenario(index: int, step: int) -> dict[str, Any]:
  """The loop's counters at the start of scenario `index` (all JSON-serialisable)."""
  return {"scenario": index, "phase": "adaptive", "phase_start": step, "window_agree": 0,
          "window_n": 0, "best_agreement": -1.0, "stale_windows": 0, "threshold": None}


def _truncate_log(path: str, next_step: int) -> None:
  """Keeps the log lines of steps < next_step (those a checkpoint covers)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] < next_step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _threshold(config, loop, state, step: int, source: ImageStream, deployed_apply,
               teacher_apply, teacher_variables) -> np.float32:
  """tau at the end of an adaptive phase that ended at `step` (see the module docstring)."""
  if config.routing.rule == "fixed":
    return np.float32(config.routing.threshold)
  first = max(loop["phase_start"], step + 1 - int(config.adaptive.window))
  variables = _variables(state.params, state.batch_stats)
  confidences = []
  for t in range(first, step + 1):
    s_logits, _ = predict(deployed_apply, teacher_apply, variables, teacher_variables,
                          batch_at(source, t)["image"])
    confidences.append(np.asarray(confidence(s_logits)))
  return confidence_threshold(np.concatenate(confidences), float(config.routing.keep))


def _window_end(config, loop) -> tuple[float, str | None]:
  """Closes a convergence window: (its agreement, "target" / "plateau" / None)."""
  ac = config.adaptive
  agreement = loop["window_agree"] / loop["window_n"]
  loop["window_agree"], loop["window_n"] = 0, 0
  if agreement >= ac.target_agreement:
    return agreement, "target"
  if agreement > loop["best_agreement"] + ac.min_delta:
    loop["best_agreement"], loop["stale_windows"] = agreement, 0
  else:
    loop["stale_windows"] += 1
  return agreement, "plateau" if loop["stale_windows"] >= ac.patience else None


def run_online(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               teacher: nn.Module, teacher_variables: PyTree, student: nn.Module,
               stream: ImageStream, adaptive_stream: ImageStream | None = None,
               student_variables: PyTree | None = None, progress: bool | None = None,
               stop_at: int | None = None) -> dict[str, Any]:
  """Runs the online distillation over `stream` in `workdir`, resuming if it can.

  Args:
    config: from `online_config`.
    workdir: directory for `online.jsonl` and `checkpoints/` (created if missing).
    teacher: the frozen teacher module (e.g. from `train_teacher`).
    teacher_variables: its variables.
    student: a student module (`get_student(...)`; switched to the config's kind).
    stream: the deployment stream; its batch size must be `config.batch_size`.
    adaptive_stream: optional stream the adaptive steps read (e.g. inliers only); same steps
      per scenario, batch size, classes and image shape as `stream`.
    student_variables: optional initial student variables (default: initialised from seed).
    progress: tqdm progress bar; None shows it when stderr is a terminal.
    stop_at: stop before this global step without a final checkpoint, as if the process had
      been killed there (for tests of resuming).

  Returns:
    `summarize(log)` plus "resumed_from" (the step a checkpoint was restored at, or None),
    "student_kind" and "log_path".

  Raises:
    ValueError: for an invalid config, incompatible streams, or networks whose logits do not
      match the stream's classes or that lack the feature map Grad-CAM needs; all before any
      step runs.
  """
  validate_online_config(config)
  trained, deployed = student_modules(student, config.student_kind)
  spec = step_spec(config, trained, teacher)
  sample = jnp.zeros((1, *stream.images.shape[1:]), jnp.float32)
  init_state = create_student_state(spec, jax.random.key(int(config.seed)), sample,
                                    student_variables)
  _check_inputs(config, teacher, teacher_variables, stream, adaptive_stream, spec, deployed,
                init_state)
  deployed_apply, teacher_apply = inference_apply(deployed), inference_apply(teacher)
  max_steps = max_adaptive_steps(config)
  adaptive_source = stream if adaptive_stream is None else adaptive_stream
  tx = spec.tx()
  rng = jax.random.key(int(config.seed))  # stored with checkpoints; the loop draws nothing

  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, LOG_NAME)
  cc = config.checkpoint
  manager = ckpt.make_checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                         every_steps=int(cc.every_steps), keep=int(cc.keep),
                                         async_save=bool(cc.async_save))
  try:
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), init_state)
    restored = ckpt.restore_latest(manager, abstract)
    if restored is None:
      state, loop, start, resumed_from = init_state, None, 0, None
    else:
      state, _, meta = restored
      if meta.get("config") != config.to_json():
        logger.warning("resuming %s under a config that differs from the one it was saved with; "
                       "the log will not match an uninterrupted run of either", workdir)
      # Restored arrays are committed to a device, fresh ones are not, and jit keys its cache on
      # that: without this copy every resumed run would recompile the adaptive step.
      state = jax.tree.map(jnp.asarray, jax.device_get(state))
      loop, start, resumed_from = meta["loop"], int(meta["step"]), int(meta["step"])
    _truncate_log(log_path, start)
    stop = stream.num_steps if stop_at is None else min(int(stop_at), stream.num_steps)
    show = progress if progress is not None else os.isatty(2)
    with open(log_path, "a") as log, \
        tqdm.tqdm(total=stream.num_steps, initial=start, disable=not show, unit="step",
                  dynamic_ncols=True) as bar:
      for t in range(start, stop):
        scenario = stream.scenario_at(t)
        if loop is None or loop["scenario"] != scenario:
          loop = _new_scenario(scenario, t)
          if config.adaptive.reset_optimizer:
            state = state.replace(opt_state=tx.init(state.params))
        adaptive = loop["phase"] == "adaptive"
        batch = batch_at(adaptive_source if adaptive else stream, t)
        s_logits, t_logits = predict(deployed_apply, teacher_apply,
                                     _variables(state.params, state.batch_stats),
                                     teacher_variables, batch["image"])
        threshold = np.float32(np.inf) if adaptive else np.float32(loop["threshold"])
        counts = {k: int(v) for k, v in jax.device_get(routing_counts(
            s_logits, t_logits, batch["label"], batch["inlier"], threshold)).items()}
        phase_step = t - loop["phase_start"]
        record = {"phase": loop["phase"], "scenario": scenario,
                  "scenario_name": stream.scenarios[scenario].name, "step": t,
                  "phase_step": phase_step, "student_kind": config.student_kind,
                  "threshold": None if adaptive else float(loop["threshold"]),
                  **count_metrics(counts), **counts}
        last_of_scenario = t + 1 == stream.first_step(scenario) + \
            stream.steps_per_scenario[scenario]
        phase_end = None
        if adaptive:
          if config.student_kind != "standalone":
            state, metrics = adaptive_step(spec, state, teacher_variables, batch["image"])
            record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
          loop["window_agree"] += counts["agree"]
          loop["window_n"] += counts["n"]
          if (phase_step + 1) % int(config.adaptive.window) == 0:
            record["window_agreement"], phase_end = _window_end(config, loop)
          if phase_end is None and max_steps is not None and phase_step + 1 >= max_steps:
            phase_end = "max_steps"
          if phase_end is None and last_of_scenario:
            phase_end = "scenario_end"
          if phase_end is not None and not last_of_scenario:
            loop["threshold"] = float(_threshold(config, loop, state, t, adaptive_source,
                                                 deployed_apply, teacher_apply,
                                                 teacher_variables))
            loop.update(phase="inference", phase_start=t + 1)
        elif last_of_scenario:
          phase_end = "scenario_end"
        if phase_end is not None:
          record["phase_end"] = phase_end
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(phase=record["phase"][:5], agree=f"{record['agreement']:.2f}")
        if last_of_scenario:  # what was deployed in this scenario, for its evaluation
          save_snapshot(workdir, scenario, _variables(state.params, state.batch_stats))
        if phase_end is not None or (t + 1) % int(cc.every_steps) == 0:
          ckpt.save_checkpoint(manager, t + 1, state, rng,
                               {"step": t + 1, "loop": dict(loop), "config": config.to_json()},
                               force=True)
    ckpt.wait_until_finished(manager)
  finally:
    ckpt.close_checkpoint_manager(manager)
  summary = summarize(read_log(log_path))
  summary.update(resumed_from=resumed_from, student_kind=config.student_kind,
                 log_path=log_path)
  return summary


# ---------------------------------------------------------------------------------------------
# Snapshots of the deployed student


SNAPSHOT_DIR = "students"


def snapshot_path(workdir: str | os.PathLike, scenario: int) -> str:
  """Where `run_online` keeps the student variables deployed in scenario `scenario`."""
  return os.path.join(workdir, SNAPSHOT_DIR, f"scenario_{scenario}.msgpack")


def save_snapshot(workdir: str | os.PathLike, scenario: int, variables: PyTree) -> None:
  """Writes the student's variables at the end of a scenario (atomically: temp file, rename).

  The student's weights do not change during an inference phase, so these are the weights
  that classified and routed the scenario's inference images.
  """
  path = snapshot_path(workdir, scenario)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  os.replace(path + ".tmp", path)


def load_snapshot(workdir: str | os.PathLike, scenario: int) -> dict[str, PyTree]:
  """The student variables `run_online` saved at the end of scenario `scenario`.

  Raises:
    FileNotFoundError: that scenario has not ended in this workdir's run.
  """
  path = snapshot_path(workdir, scenario)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no student snapshot for scenario {scenario} in {workdir}: has "
                            "run_online played that scenario to its end?")
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


# ---------------------------------------------------------------------------------------------
# Log reading, summary, plot


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of an `online.jsonl`, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-scenario summary of a log (pooled counts, so accuracies are over images).

  Returns:
    {"steps": number of records, "scenarios": [one dict per scenario, in order: "scenario",
    "name", "adaptive_steps", "adaptive_end" (one of ADAPTIVE_ENDS, or None while running),
    "final_window_agreement" (the last full window's, or None), "adaptive_agreement" (over the
    whole phase), "threshold", "inference_steps", "inference_images", "student_accuracy",
    "teacher_accuracy", "combined_accuracy", "agreement", "routed_fraction",
    "inlier_routed", "outlier_routed" (routed fractions of inliers / outliers: the
    `efficiency.gain_in_efficiency` inputs) and "inlier_share" (observed share of inliers)]}.
    For one scenario entry e: `gain_in_efficiency(teacher_flops, student_flops,
    e["inlier_share"], e["inlier_routed"], e["outlier_routed"], e["adaptive_steps"],
    e["inference_steps"])`.
  """
  keys = ("n", "n_inliers", "n_outliers", "student_correct", "teacher_correct",
          "combined_correct", "agree", "routed", "routed_inliers", "routed_outliers")
  by_scenario: dict[int, list] = {}
  for r in records:
    by_scenario.setdefault(r["scenario"], []).append(r)
  scenarios = []
  for index, recs in sorted(by_scenario.items()):
    adaptive = [r for r in recs if r["phase"] == "adaptive"]
    inference = [r for r in recs if r["phase"] == "inference"]
    windows = [r["window_agreement"] for r in adaptive if "window_agreement" in r]
    ends = [r["phase_end"] for r in adaptive if "phase_end" in r]
    a_counts = {k: sum(r[k] for r in adaptive) for k in keys}
    counts = {k: sum(r[k] for r in inference) for k in keys}
    metrics = count_metrics(counts) if inference else {}
    scenarios.append({
        "scenario": index, "name": recs[0]["scenario_name"], "adaptive_steps": len(adaptive),
        "adaptive_end": ends[-1] if ends else None,
        "final_window_agreement": windows[-1] if windows else None,
        "adaptive_agreement": _ratio(a_counts["agree"], a_counts["n"]),
        "threshold": inference[0]["threshold"] if inference else None,
        "inference_steps": len(inference), "inference_images": counts["n"],
        "student_accuracy": metrics.get("student_accuracy"),
        "teacher_accuracy": metrics.get("teacher_accuracy"),
        "combined_accuracy": metrics.get("combined_accuracy"),
        "agreement": metrics.get("agreement"),
        "routed_fraction": metrics.get("routed_fraction"),
        "inlier_routed": metrics.get("routed_fraction_inliers"),
        "outlier_routed": metrics.get("routed_fraction_outliers"),
        "inlier_share": _ratio(counts["n_inliers"], counts["n"])})
  return {"steps": len(records), "scenarios": scenarios}


def _records(log) -> list[dict[str, Any]]:
  if isinstance(log, (str, os.PathLike)):
    return read_log(log)
  return list(log)


def _smooth(values: np.ndarray, segments: np.ndarray, width: int) -> np.ndarray:
  """Trailing running mean over `width` steps, restarted at every segment (scenario) change."""
  out = np.empty_like(values)
  start = 0
  for i in range(len(values)):
    if i and segments[i] != segments[i - 1]:
      start = i
    out[i] = np.nanmean(values[max(start, i - width + 1):i + 1])
  return out


def plot_online(logs, out_png: str | os.PathLike, *, smooth: int = 10,
                title: str = "Online distillation") -> None:
  """The Figure 3 analogue: accuracy vs stream step, one line per student kind.

  Plotted per log: the deployed student's accuracy on the true labels (solid), the combined
  system's (dotted, inference phases only); the teacher's accuracy (black) from the first log.
  Each value is a trailing mean over `smooth` steps inside a scenario. The first log's adaptive
  phases are shaded red, as in the paper; scenario changes are dashed vertical lines.

  Args:
    logs: a log path or list of records, or a mapping {label: path or records} (e.g.
      {"BSN": ..., "RvSN": ..., "binarised RvSN": ..., "standalone BSN": ...}).
    out_png: the PNG written.
    smooth: running-mean width in steps (1: raw per-batch accuracies).
    title: the axes' title.
  """
  from oodjax.plots import _pyplot  # matplotlib with the Agg backend, loaded lazily
  plt = _pyplot()
  if isinstance(logs, Mapping):
    runs = {label: _records(log) for label, log in logs.items()}
  else:
    records = _records(logs)
    runs = {records[0]["student_kind"] if records else "student": records}
  if not runs or not all(runs.values()):
    raise ValueError("plot_online needs at least one non-empty log")
  fig, ax = plt.subplots(figsize=(9.5, 3.6))
  first = next(iter(runs.values()))
  steps = np.array([r["step"] for r in first])
  scen = np.array([r["scenario"] for r in first])
  adaptive = np.array([r["phase"] == "adaptive" for r in first])
  # Red spans over runs of adaptive steps.
  edges = np.flatnonzero(np.diff(np.r_[0, adaptive.astype(int), 0]))
  for a, b in zip(edges[::2], edges[1::2]):
    ax.axvspan(steps[a] - 0.5, steps[b - 1] + 0.5, color="tab:red", alpha=0.12, lw=0)
  for i in np.flatnonzero(np.diff(scen)) + 1:
    ax.axvline(steps[i] - 0.5, color="0.4", ls="--", lw=0.8)
  teacher = np.array([r["teacher_accuracy"] for r in first], float)
  ax.plot(steps, _smooth(teacher, scen, smooth), color="k", lw=1.5, label="teacher (TN)")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for (label, recs), color in zip(runs.items(), colors):
    x = np.array([r["step"] for r in recs])
    seg = np.array([r["scenario"] for r in recs])
    student = np.array([r["student_accuracy"] for r in recs], float)
    ax.plot(x, _smooth(student, seg, smooth), color=color, lw=1.2, label=label)
    combined = np.array([r["combined_accuracy"] if r["phase"] == "inference" else np.nan
                         for r in recs], float)
    if np.isfinite(combined).any():
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of the adaptive spans' NaNs
        ax.plot(x, _smooth(combined, seg, smooth), color=color, lw=1.0, ls=":",
                label=f"{label} + TN (combined)")
  ax.set(xlabel="stream step (batch)", ylabel="accuracy", ylim=(-0.02, 1.02), title=title)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
