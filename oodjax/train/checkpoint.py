"""Checkpoints: the one module of oodjax that imports Orbax.

Layout of `directory` (the CheckpointManager's root, e.g. `workdir/checkpoints`):

    <step>/state/     the TrainState pytree (Orbax StandardSave: OCDBT + zarr array files)
    <step>/rng/       the run-wide PRNG key: {"key_data": uint32 array} (StandardSave) and its
                      implementation name in meta["rng_impl"]
    <step>/meta/      metadata.json: {"step", "epoch", "batch_in_epoch", "config_hash", ...}
    <step>/metrics/   {"eval_accuracy": ...} when an eval set exists (ranks the best step)
    <step>/_CHECKPOINT_METADATA   Orbax's own per-step record
    <step>.corrupt/   a step that failed to restore, moved aside (see `restore_latest`)

Every Orbax option lives in `make_checkpoint_manager`, so the policy is read in one place.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
BEST_METRIC = "eval_accuracy"

logger = logging.getLogger(__name__)


class _NoMetricsWarningFilter(logging.Filter):
  """Drops Orbax's "Requested `tracked_metric`; did not provide metrics." warning.

  Orbax logs it on every save without metrics once `best_fn` is set. oodjax saves without
  metrics on purpose (steps between evaluations, ENVISE's online runs): the preservation policy
  keeps such steps by recency (`keep_checkpoints_without_metrics`), so the warning is noise.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


_FILTER = _NoMetricsWarningFilter()


def make_checkpoint_manager(directory: str | os.PathLike, *, every_steps: int, keep: int,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """The CheckpointManager with every option oodjax uses.

  Args:
    directory: root of the checkpoints; created if missing.
    every_steps: the save interval the manager reports through `should_save`. The training
      loop also saves the final step regardless (`save_checkpoint(..., force=True)`).
    keep: how many of the most recent checkpoints survive; the best one by `eval_accuracy`
      (when saved with metrics) survives too, even when older.
    async_save: write in a background thread. The device-to-host copy still happens before
      `save` returns (Orbax's default synchronous transfer), so the training step may donate
      the state's buffers right after.

  Returns:
    An open manager; call `close_checkpoint_manager` before the process exits.
  """
  absl_logger = logging.getLogger("absl")  # Orbax logs through absl
  if _FILTER not in absl_logger.filters:
    absl_logger.addFilter(_FILTER)
  preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      # Steps saved without metrics (no eval set) are left to LatestN.
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
      preservation_policy=preservation,
      # best_fn only switches on metric tracking (metrics are written, best_step() works);
      # deletion is decided by `preservation` alone.
      best_fn=_best_metric,
      best_mode="max",
      keep_checkpoints_without_metrics=True,
      enable_async_checkpointing=async_save,
      # Leftovers of a save that was killed half-way are never a valid step; remove them.
      cleanup_tmp_directories=True,
      create=True,
  )
  # Orbax's array writer rejects relative paths (at the first save, asynchronously), and users
  # pass `--workdir runs/x`.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "rng", "meta"))


def _best_metric(metrics: dict[str, float]) -> float:
  return float(metrics[BEST_METRIC])


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: PyTree, rng: jax.Array,
                    meta: dict[str, Any], *, metrics: dict[str, float] | None = None,
                    force: bool = True) -> bool:
  """Starts saving a checkpoint (returns before an async write has finished).

  Args:
    manager: from `make_checkpoint_manager`.
    step: the step number naming the checkpoint (normally `state.step`).
    state: the TrainState (sharded arrays are fine: each device writes its shard).
    rng: the run-wide PRNG key (a typed key, `jax.random.key`).
    meta: small JSON-serialisable dict (step, epoch, config hash, ...).
    metrics: e.g. {"eval_accuracy": 0.93}; ranks checkpoints for "keep the best".
    force: save even where the manager's interval policy would not (the final step).

  Returns:
    Whether a save was started.
  """
  # The key is stored as its raw uint32 data: Orbax's JaxRandomKeySave works too but logs an
  # OCDBT warning on every save.
  meta = dict(meta, rng_impl=str(jax.random.key_impl(rng)))
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            rng=ocp.args.StandardSave({"key_data": jax.random.key_data(rng)}),
                            meta=ocp.args.JsonSave(meta))
  return manager.save(step, args=args, metrics=metrics, force=force)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree
                       ) -> tuple[PyTree, jax.Array, dict[str, Any]]:
  """Restores one step into `abstract_state`.

  Args:
    manager: from `make_checkpoint_manager`.
    step: which step.
    abstract_state: `jax.eval_shape` of the state with `jax.ShapeDtypeStruct` leaves that
      carry a `sharding`; every array is read straight into that sharding.

  Returns:
    (state, rng, meta).
  """
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      rng=ocp.args.StandardRestore(_abstract_key_data(abstract_state)),
      meta=ocp.args.JsonRestore()))
  meta = dict(restored["meta"])
  rng = jax.random.wrap_key_data(jax.numpy.asarray(restored["rng"]["key_data"]),
                                 impl=meta.pop("rng_impl"))
  return restored["state"], rng, meta


def _abstract_key_data(abstract_state: PyTree) -> dict[str, jax.ShapeDtypeStruct]:
  """The target the saved key data is read into: replicated over the state's mesh.

  Without a target Orbax would restore it onto the devices that saved it, which fails
  ("Topology mismatch") when a run resumes on another number of processes or devices.
  """
  shardings = [leaf.sharding for leaf in jax.tree.leaves(abstract_state)
               if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)]
  sharding = (jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec())
              if shardings else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  return {"key_data": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=sharding)}


def restore_latest(manager: ocp.CheckpointManager, abstract_state: PyTree
                   ) -> tuple[PyTree, jax.Array, dict[str, Any]] | None:
  """Restores the newest checkpoint that can be read, or returns None if there is none.

  A step that fails to restore (a file truncated or deleted, e.g. by a disk filling up or a
  copy interrupted outside Orbax) is logged as a warning naming the step, and the next older
  step is tried. Once an older step restores, the newer unreadable ones are moved aside to
  `<step>.corrupt`: kept for inspection, and the resumed run can save those step numbers again.

  Raises:
    ValueError: when steps exist but none restores. That is rarely corruption of them all and
      more often a state that no longer matches (another model or optimizer in the same
      workdir); the checkpoints are left untouched and the first error is named.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore_checkpoint(manager, step, abstract_state)
    except Exception as error:  # Orbax raises many types for unreadable files.
      # Tensorstore errors embed a kilobyte of JSON spec; the head names the file.
      logger.warning("checkpoint step %d in %s is unreadable (%s: %.300s); trying the "
                     "previous checkpoint", step, manager.directory, type(error).__name__,
                     str(error))
      failed.append((step, error))
      continue
    for bad_step, _ in failed:
      _move_aside(manager, bad_step)
    return restored
  if failed:
    step, error = failed[0]
    raise ValueError(
        f"none of the checkpoints {[s for s, _ in failed]} in {manager.directory} restores into "
        f"this run's state; the newest, step {step}, fails with {type(error).__name__}: "
        f"{str(error):.300}. Was the workdir written by another model or optimizer? The "
        "checkpoints were left as they are") from error
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  step_dir = manager.directory / str(step)
  target = manager.directory / f"{step}.corrupt"
  suffix = 0
  while target.exists():
    suffix += 1
    target = manager.directory / f"{step}.corrupt{suffix}"
  if jax.process_index() == 0:
    step_dir.rename(target)
  if jax.process_count() > 1:  # every process sees the step gone before reloading
    ocp.multihost.sync_global_processes(f"oodjax_move_aside_{step}")
  manager.reload()


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest saved step (without checking that it is readable)."""
  return manager.latest_step()


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step with the highest eval accuracy among those kept (the latest if none has one)."""
  return manager.best_step()


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until every started save is fully written (and old steps are pruned)."""
  manager.wait_until_finished()


def close_checkpoint_manager(manager: ocp.CheckpointManager) -> None:
  """Waits for pending asynchronous saves to be fully written, then releases the manager.

  Without this a process that exits right after its last `save_checkpoint` could lose that
  checkpoint (it would be left as a temporary directory).
  """
  manager.wait_until_finished()
  manager.close()
