"""The margin ablation of ENVISE (Table 3) as one vmapped program over the margins.

    state, metrics = train_margin_variants(
        online_config(), teacher=teacher, teacher_variables=teacher_vars,
        student=get_student("binary_tiny", 20), stream=stream,
        margins=(0.5, 1.0, 1.5, 2.0, 2.5), num_steps=200, inference_steps=100)
    metrics["loss"]                       # [steps, V] L_f of each variant at each step
    metrics["inference"][v]               # routing metrics of variant v (count_metrics + counts)

V students, one per margin delta of the attention triplet loss (Eq. 5), are one state stacked
along a leading axis [V, ...]. `margin_step` is `jax.vmap` of one adaptive step (the same code
as `online.adaptive_step`) over (student state, margin); the teacher's variables and the batch
are shared (not batched), so the teacher's logits and Grad-CAM maps are computed once per step
for all V students. The margin reaches `losses.envise_loss` as a traced array, so the program
is compiled once for all margins, and every variant ends where a run of its own with that
margin ends (`tests/test_envise_ablation.py` checks this with SGD: Adam divides updates by
sqrt(v), which turns rounding differences between the batched and the single program, in
gradients that are truly ~0, into full-size steps; see the VMDLS equality test). The test uses
the real twin (RvSN): with the binary student the two programs agree after one step (3e-8) but
not after two (4e-3), because exact ties among the ±alpha sums (max-pools, signs of values at
0) are broken differently by the two programs' rounding, and a sign is discontinuous.

Kept simple on purpose (our choices; the paper does not describe how its Table 3 was run):
  * One adaptive phase of exactly `num_steps` steps on stream steps [start_step,
    start_step + num_steps): no convergence test, no scenario change inside (a scenario change
    in that range raises). Every variant sees the same batches and starts from the same
    initial weights (`config.seed`, or the given `student_variables`).
  * Then `inference_steps` stream steps, the next ones, each variant routing an image to the
    teacher when its confidence (max softmax) is below its own threshold tau. tau follows
    `config.routing`: rule "quantile" sets it, as `online.run_online` does, from the variant's
    adapted confidences on the last min(adaptive.window, num_steps) adaptive batches
    (`online.confidence_threshold`); rule "fixed" uses `routing.threshold` for all.
  * The deployed students' logits are one vmapped, jitted forward over V per batch; the
    teacher's logits are computed once; `online.routing_counts` is vmapped over (student
    logits, tau). The thresholds (numpy sort) and `online.count_metrics` run in a Python loop
    over V on the host.
  * Only the triplet attention loss has a margin: `config.loss.attention` must be "triplet".
    Student kind "standalone" (never adapted) has nothing to ablate and is refused.

References:
  Sharma et al. 2021 (ICLR submission), ENVISE, Eq. 5 (margin delta) and Table 3 (delta in
    {0.5, 1.0, 1.5, 2.0, 2.5}).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oodjax.envise import online
from oodjax.envise.online import StepSpec, StudentState
from oodjax.envise.stream import ImageStream, batch_at
from oodjax.models.insides import inference_apply

PyTree = Any


def check_margins(margins: Sequence[float]) -> np.ndarray:
  """The margins as a float32 array [V]; raises ValueError for none, or any negative/non-finite.
  """
  if np.ndim(margins) != 1:
    raise ValueError(f"margins must be a flat sequence of numbers, got {margins!r}")
  values = np.asarray(margins, np.float64)
  if values.size == 0:
    raise ValueError("margins is empty: give at least one margin, e.g. (0.5, 1.0, 1.5, 2.0, 2.5)")
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"every margin must be a finite number >= 0, got {list(values)}")
  return values.astype(np.float32)


def _single_step(spec: StepSpec, state: StudentState, margin: jax.Array,
                 teacher_variables: PyTree, x: jax.Array
                 ) -> tuple[StudentState, dict[str, jax.Array]]:
  """`online.adaptive_step` with the margin given as a (traced) array instead of `spec.margin`.

  The spec's margin field is replaced by the traced scalar: `online.adaptive_loss` only passes
  it on to `envise_loss`, whose margin may be traced, so this is the very loss of a single run.
  """
  return online.adaptive_update(dataclasses.replace(spec, margin=margin), state,
                                teacher_variables, x)


@functools.partial(jax.jit, static_argnums=0)
def margin_step(spec: StepSpec, states: StudentState, margins: jax.Array,
                teacher_variables: PyTree, x: jax.Array
                ) -> tuple[StudentState, dict[str, jax.Array]]:
  """One adaptive step of V students, student v with margin margins[v] (Eq. 5's delta).

  Args:
    spec: static; every field but `margin` (ignored) is shared by the V students.
    states: the V student states stacked along a leading axis [V, ...] (`stack_states`).
    margins: [V] float32 margins; traced, so any V margins share one program per V.
    teacher_variables: the frozen teacher's variables (shared).
    x: [B, H, W, C] the batch (shared).

  Returns:
    (new stacked states, {"loss", "distillation", "attention"} [V] float32 batch means of each
    variant, computed before its update).
  """
  return jax.vmap(_single_step, in_axes=(None, 0, 0, None, None))(
      spec, states, margins, teacher_variables, x)


def stack_states(state: StudentState, num_variants: int) -> StudentState:
  """V identical copies of `state`, stacked along a new leading axis [V, ...]."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_variants,) + jnp.shape(a)), state)


def variant(states: PyTree, index: int) -> PyTree:
  """Variant `index` of a stacked pytree."""
  return jax.tree.map(lambda a: a[index], states)


@functools.partial(jax.jit, static_argnums=0)
def _stacked_logits(apply_fn, variables: PyTree, x: jax.Array) -> jax.Array:
  """Inference-mode logits of V stacked students on one shared batch: [V, B, K]."""
  return jax.vmap(apply_fn, in_axes=(0, None))(variables, x)


_vmapped_counts = jax.jit(jax.vmap(online.routing_counts, in_axes=(0, None, None, None, 0)))


def _check(config, stream: ImageStream, num_steps, inference_steps, start_step) -> None:
  online.validate_online_config(config)
  if config.loss.attention != "triplet":
    raise ValueError(f"the margin only enters the triplet loss: config.loss.attention must be "
                     f"'triplet' for a margin ablation, got {config.loss.attention!r}")
  if config.student_kind == "standalone":
    raise ValueError("student kind 'standalone' is never adapted: nothing to ablate; use "
                     "'bsn', 'rvsn' or 'binarised_rvsn'")
  for name, value, low in (("num_steps", num_steps, 1), ("inference_steps", inference_steps, 0),
                           ("start_step", start_step, 0)):
    if not online._is_int(value) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if stream.batch_size != config.batch_size:
    raise ValueError(f"the stream's batch size {stream.batch_size} differs from "
                     f"config.batch_size {config.batch_size}")
  end = start_step + num_steps + inference_steps
  if end > stream.num_steps:
    raise ValueError(f"steps [{start_step}, {end}) do not fit in the stream's "
                     f"{stream.num_steps} steps; lower num_steps / inference_steps")
  if stream.scenario_at(start_step) != stream.scenario_at(end - 1):
    raise ValueError(f"steps [{start_step}, {end}) cross a scenario change; the ablation runs "
                     "one adaptive and one inference phase inside one scenario")


def train_margin_variants(
    config: ml_collections.ConfigDict, *, teacher, teacher_variables: PyTree, student,
    stream: ImageStream, margins: Sequence[float], num_steps: int, inference_steps: int = 0,
    start_step: int = 0, student_variables: PyTree | None = None,
) -> tuple[StudentState, dict[str, Any]]:
  """The adaptive phase of V students, one per margin, as one vmapped program; then routing.

  Args:
    config: an `online.online_config` (its loss, optimizer, seed, batch size, student kind and
      routing are used; `loss.margin` is replaced by each variant's margin).
    teacher: the frozen teacher module.
    teacher_variables: its variables.
    student: a student module (`get_student(...)`; switched to `config.student_kind`).
    stream: the stream; adaptive steps read steps [start_step, start_step + num_steps), the
      inference phase the next `inference_steps` steps (all inside one scenario).
    margins: V >= 1 margins delta >= 0 (Table 3: 0.5, 1.0, 1.5, 2.0, 2.5).
    num_steps: adaptive steps (>= 1).
    inference_steps: inference-phase steps (>= 0; 0 skips routing).
    start_step: the stream step the adaptive phase starts at.
    student_variables: optional initial student variables (default: initialised from
      `config.seed`); every variant starts from them.

  Returns:
    (states, metrics): states stacked [V, ...] (`variant(states, v)` is variant v);
    metrics {"margins": [V], "loss", "distillation", "attention": [num_steps, V] float32
    batch means before each update; "threshold": [V] tau per variant (when
    inference_steps > 0); "inference": V dicts of `online.count_metrics` plus the pooled
    `online.routing_counts` over the inference steps (empty list when inference_steps = 0)}.

  Raises:
    ValueError: no margins, a negative or non-finite margin, an attention loss other than
      "triplet", kind "standalone", bad step counts, steps outside the stream or across a
      scenario change, or a batch size differing from the config's.
  """
  margins = check_margins(margins)
  _check(config, stream, num_steps, inference_steps, start_step)
  trained, deployed = online.student_modules(student, config.student_kind)
  spec = online.step_spec(config, trained, teacher)
  sample = jnp.zeros((1, *stream.images.shape[1:]), jnp.float32)
  init = online.create_student_state(spec, jax.random.key(int(config.seed)), sample,
                                     student_variables)
  states = stack_states(init, len(margins))
  margins_arr = jnp.asarray(margins)

  history: dict[str, list] = {"loss": [], "distillation": [], "attention": []}
  for t in range(start_step, start_step + num_steps):
    states, step_metrics = margin_step(spec, states, margins_arr, teacher_variables,
                                       batch_at(stream, t)["image"])
    for k, values in history.items():
      values.append(step_metrics[k])
  metrics: dict[str, Any] = {"margins": margins}
  metrics.update({k: np.asarray(jnp.stack(v)) for k, v in history.items()})  # [steps, V]

  metrics["inference"] = []
  if inference_steps:
    deployed_apply, teacher_apply = inference_apply(deployed), inference_apply(teacher)
    variables = {"params": states.params}
    if states.batch_stats:
      variables["batch_stats"] = states.batch_stats
    thresholds = _thresholds(config, variables, deployed_apply, stream, start_step, num_steps,
                             len(margins))
    metrics["threshold"] = thresholds
    pooled = None
    for t in range(start_step + num_steps, start_step + num_steps + inference_steps):
      batch = batch_at(stream, t)
      s_logits = _stacked_logits(deployed_apply, variables, batch["image"])  # [V, B, K]
      t_logits = _teacher_logits(teacher_apply, teacher_variables, batch["image"])  # [B, K]
      counts = jax.device_get(_vmapped_counts(s_logits, t_logits, batch["label"],
                                              batch["inlier"], jnp.asarray(thresholds)))
      pooled = counts if pooled is None else {k: pooled[k] + counts[k] for k in pooled}
    for v in range(len(margins)):
      c = {k: int(pooled[k][v]) for k in pooled}
      metrics["inference"].append({**online.count_metrics(c), **c})
  return states, metrics


@functools.partial(jax.jit, static_argnums=0)
def _teacher_logits(apply_fn, variables: PyTree, x: jax.Array) -> jax.Array:
  return apply_fn(variables, x)


def _thresholds(config, variables: PyTree, deployed_apply, stream: ImageStream, start_step: int,
                num_steps: int, num_variants: int) -> np.ndarray:
  """tau per variant [V] float32 (see the module docstring)."""
  if config.routing.rule == "fixed":
    return np.full((num_variants,), config.routing.threshold, np.float32)
  end = start_step + num_steps
  first = max(start_step, end - int(config.adaptive.window))
  confidences = []  # per step [V, B]
  for t in range(first, end):
    logits = _stacked_logits(deployed_apply, variables, batch_at(stream, t)["image"])
    confidences.append(np.asarray(online.confidence(logits)))
  per_variant = np.concatenate(confidences, axis=1)  # [V, n]
  keep = float(config.routing.keep)
  return np.array([online.confidence_threshold(c, keep) for c in per_variant], np.float32)


def margin_table(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per margin: the margin, the last step's loss terms and the inference metrics."""
  rows = []
  for v, margin in enumerate(np.asarray(metrics["margins"])):
    row = {"margin": float(margin), "final_loss": float(metrics["loss"][-1, v]),
           "final_attention": float(metrics["attention"][-1, v])}
    if metrics.get("inference"):
      row.update(metrics["inference"][v], threshold=float(metrics["threshold"][v]))
    rows.append(row)
  return rows

