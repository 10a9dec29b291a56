"""The training loop every oodjax trainer shares: resume, step, log, evaluate, checkpoint.

A trainer (the classifier's softmax cross-entropy, VMDLS's metric and KL losses, the
autoencoder's reconstruction loss) supplies only what differs between methods, as a `Job`:

    job = Job(init_fn=..., train_step=..., epoch_batches=..., steps_per_epoch=...,
              num_epochs=..., batch_size=..., schedule=..., evaluate=...)
    state, summary = run_job(job, config, workdir, mesh=mesh, digest=config_hash(config))

and `run_job` does the rest the same way for all of them: it resumes from the newest readable
checkpoint in `workdir/checkpoints` (the data order of `epoch_batches` depends only on (seed,
epoch) and the step key only on (seed, step), so a resumed run ends with the parameters an
uninterrupted one would), makes the next batches in a thread while the device steps
(`device_input.prefetch`), writes `metrics.jsonl`, shows a progress bar, and saves every
`config.checkpoint.every_steps` steps and at the end. In a multi-process run
(`oodjax.train.distributed`) every process runs this same loop on its rows of each batch; only
process 0 writes metrics and shows progress. Everything a method keeps between steps
(VMDLS's running class means) lives in its train state, so it is checkpointed with it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from oodjax.data.device_input import prefetch
from oodjax.train import checkpoint as ckpt
from oodjax.train import distributed
from oodjax.train import sharding as shd

logger = logging.getLogger(__name__)

PyTree = Any
PREFETCH = 2  # batches made ahead of the step that consumes them


@dataclasses.dataclass(frozen=True)
class Job:
  """What a trainer hands to `run_job`.

  Attributes:
    init_fn: `rng -> state`, pure (jitted with the state's shardings; `jax.eval_shape`d to
      restore a checkpoint into).
    train_step: `(state, batch, rng) -> (state, metrics)`, not yet jitted; metrics are []
      float32 scalars, averaged over the steps between two log lines.
    epoch_batches: `(epoch, start_batch, sharding) -> iterator of batches` for one epoch,
      starting at batch `start_batch` of it; at least `steps_per_epoch` batches.
    steps_per_epoch: optimizer steps in one epoch.
    num_epochs: epochs to train.
    batch_size: images per step (the images/s figure in the log).
    schedule: the learning-rate schedule, logged beside the metrics (None: not logged).
    evaluate: `state -> {name: float}`, run at every checkpoint (None: no evaluation). An
      "eval_accuracy" entry ranks checkpoints so the best one is kept.
    state_shardings: `abstract_state -> shardings` (None: everything replicated).
    data_state: `step -> JSON dict`, the state of the data iterator after `step` steps
      (`streaming.state_at`), saved with every checkpoint; a run resumed from one whose saved
      state differs (other records, seed or batch size) stops with an error. None: not saved.
  """
  init_fn: Callable[[jax.Array], PyTree]
  train_step: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict[str, jax.Array]]]
  epoch_batches: Callable[[int, int, Any], Iterator[PyTree]]
  steps_per_epoch: int
  num_epochs: int
  batch_size: int
  schedule: Callable[[int], Any] | None = None
  evaluate: Callable[[PyTree], dict[str, float]] | None = None
  state_shardings: Callable[[PyTree], PyTree] | None = None
  data_state: Callable[[int], dict[str, Any]] | None = None

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops metric lines logged after `last_step` by a run that was killed before saving them
  in a checkpoint: the resumed run logs those steps again."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _print_memory(memory: dict[str, int], mesh: jax.sharding.Mesh, bar: bool) -> None:
  mb = {k: v / 2**20 for k, v in memory.items()}
  line = (f"per device ({dict(mesh.shape)} mesh): state {mb['state_bytes']:.1f} MiB of "
          f"{mb['state_bytes_total']:.1f} MiB, step inputs {mb['argument_bytes']:.1f} MiB, "
          f"scratch {mb['temp_bytes']:.1f} MiB (XLA memory analysis)")
  logger.info(line)
  if bar:
    tqdm.tqdm.write(line)


def _check_data_state(saved: dict[str, Any], now: dict[str, Any], workdir: str) -> None:
  """Raises ValueError when a checkpoint's data iterator state is not this run's."""
  differ = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
            if saved.get(k) != now.get(k)}
  if differ:
    raise ValueError(f"the checkpoint in {workdir} was written reading other data "
                     f"(saved vs now: {differ}); resuming would train on other batches. Use "
                     "another workdir, or the data it was trained on")


def _append_metrics(file, record: dict[str, Any]) -> None:
  file.write(json.dumps(record) + "\n")
  file.flush()


def run_job(job: Job, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
            mesh: jax.sharding.Mesh, digest: str, seed: int, progress: bool | None = None,
            restore_only: bool = False) -> tuple[PyTree, dict[str, Any]]:
  """Trains `job` in `workdir`, resuming if it can; see the module docstring.

  Args:
    job: the method's pieces.
    config: read for `checkpoint.every_steps`, `checkpoint.keep`, `checkpoint.async_save` and
      `train.log_every_steps`.
    workdir: directory for checkpoints and metrics.jsonl (created if missing).
    mesh: the device mesh; batches are split over its first ("data") axis.
    digest: a hash of the training config, stored with each checkpoint; resuming under a
      different one logs a warning.
    seed: the run's seed: the init key and the run-wide step key derive from it.
    progress: show a tqdm progress bar; None shows it when stderr is a terminal.
    restore_only: only restore a finished run; a workdir without one is a ValueError.

  Returns:
    (state, summary): the final state (sharded over the mesh as the job says) and {"step",
    "total_steps", "steps_per_epoch", "resumed_from" (step or None), "already_finished",
    "eval" (last eval dict or None), "best_step", "train_seconds", and "memory" when steps
    ran: `sharding.memory_report` of the compiled step, also printed with the progress bar}.
  """
  workdir = os.fspath(workdir)
  total_steps = job.total_steps
  init_rng, train_rng = jax.random.split(jax.random.key(int(seed)))
  init_rng = shd.replicate_key(init_rng, mesh)
  abstract_state = jax.eval_shape(job.init_fn, init_rng)
  state_shardings = (job.state_shardings(abstract_state) if job.state_shardings is not None
                     else shd.state_sharding(abstract_state, mesh))
  data_sharding = shd.batch_sharding(mesh)

  os.makedirs(workdir, exist_ok=True)
  epoch_iter = None
  manager = ckpt.make_checkpoint_manager(
      os.path.join(workdir, "checkpoints"), every_steps=int(config.checkpoint.every_steps),
      keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save))
  try:
    restored = ckpt.restore_latest(manager,
                                   shd.with_shardings(abstract_state, state_shardings))
    if restored is None:
      state = jax.jit(job.init_fn, out_shardings=state_shardings)(init_rng)
      resumed_from, last_eval = None, None
    else:
      state, train_rng, meta = restored
      resumed_from, last_eval = int(meta["step"]), meta.get("eval")
      if job.data_state is not None and "data" in meta:
        _check_data_state(meta["data"], job.data_state(resumed_from), workdir)
      if meta.get("config_hash") != digest:
        logger.warning("resuming step %d of a run whose config differed (hash %s, now %s)",
                       resumed_from, meta.get("config_hash"), digest)
      logger.info("resuming from step %d in %s", resumed_from, workdir)
    train_rng = shd.replicate_key(train_rng, mesh)
    # A state stacked over variants (a vmapped ablation) holds one equal step per variant.
    start_step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
    summary = {"step": start_step, "total_steps": total_steps,
               "steps_per_epoch": job.steps_per_epoch, "resumed_from": resumed_from,
               "already_finished": start_step >= total_steps, "eval": last_eval,
               "best_step": ckpt.best_step(manager), "train_seconds": 0.0}
    if start_step >= total_steps:
      return state, summary
    if restore_only:
      raise ValueError(
          f"{workdir} holds no finished training run (at step {start_step} of {total_steps});"
          " run `oodjax train` or `oodjax run` with the same config first")

    # Every process runs every step; only process 0 logs and writes metrics.
    main = distributed.is_main_process()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if main:
      truncate_metrics(metrics_path, start_step)
    train_step = shd.jit_train_step(job.train_step, mesh, state_shardings)
    log_every = int(config.train.log_every_steps)
    every = int(config.checkpoint.every_steps)
    show = (sys.stderr.isatty() if progress is None else progress) and main
    start_time = time.perf_counter()
    with (open(metrics_path, "a") if main else open(os.devnull, "w")) as metrics_file, \
        tqdm.tqdm(total=total_steps, initial=start_step, disable=not show, unit="step",
                  dynamic_ncols=True) as bar:
      step = start_step
      # images/s counts training only: time spent evaluating and saving is taken out.
      window, window_start, window_steps, paused = None, time.perf_counter(), 0, 0.0
      for epoch in range(start_step // job.steps_per_epoch, job.num_epochs):
        start_batch = step - epoch * job.steps_per_epoch
        # The next batches are gathered and transferred in a thread while the device steps.
        epoch_iter = prefetch(job.epoch_batches(epoch, start_batch, data_sharding),
                              size=PREFETCH)
        for _, batch in zip(range(job.steps_per_epoch - start_batch), epoch_iter):
          if "memory" not in summary:  # compiled once, ahead of time, to read its memory
            train_step = train_step.lower(state, batch, train_rng).compile()
            summary["memory"] = shd.memory_report(train_step, state)
            if main:
              _print_memory(summary["memory"], mesh, show)
          state, metrics = train_step(state, batch, train_rng)
          step += 1
          # Summed on device, fetched only at log time, so logging does not stall the step.
          window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
          window_steps += 1
          bar.update(1)
          if step % log_every == 0 or step == total_steps:
            means = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
            elapsed = time.perf_counter() - window_start - paused
            record = {"kind": "train", "step": step, "epoch": epoch, **means,
                      "images_per_s": window_steps * job.batch_size / max(elapsed, 1e-9)}
            if job.schedule is not None:
              record["learning_rate"] = float(job.schedule(step - 1))
            _append_metrics(metrics_file, record)
            bar.set_postfix(loss=f"{means['loss']:.4f}",
                            img_s=f"{record['images_per_s']:.0f}")
            window, window_start, window_steps, paused = None, time.perf_counter(), 0, 0.0
          if step % every == 0 or step == total_steps:
            pause_start = time.perf_counter()
            eval_metrics = None
            if job.evaluate is not None:
              eval_metrics = job.evaluate(state)
              _append_metrics(metrics_file,
                              {"kind": "eval", "step": step, "epoch": epoch, **eval_metrics})
              last_eval = eval_metrics
            meta = {"step": step, "epoch": epoch,
                    "batch_in_epoch": step - epoch * job.steps_per_epoch,
                    "config_hash": digest, "eval": eval_metrics}
            if job.data_state is not None:
              meta["data"] = job.data_state(step)
            best = ({ckpt.BEST_METRIC: eval_metrics[ckpt.BEST_METRIC]}
                    if eval_metrics and ckpt.BEST_METRIC in eval_metrics else None)
            ckpt.save_checkpoint(manager, step, state, train_rng, meta, metrics=best)
            paused += time.perf_counter() - pause_start
        epoch_iter.close()  # stops the prefetch thread (an epoch may have spare batches)
        epoch_iter = None
    ckpt.wait_until_finished(manager)
    summary.update(step=step, eval=last_eval, already_finished=False,
                   best_step=ckpt.best_step(manager),
                   train_seconds=time.perf_counter() - start_time)
  finally:
    if epoch_iter is not None:  # an exception mid-epoch: stop the prefetch thread
      epoch_iter.close()
    # Also on an exception: a save already started is completed rather than left half-written.
    ckpt.close_checkpoint_manager(manager)
  return state, summary
