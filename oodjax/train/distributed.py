"""Several processes, one program: JAX's multi-controller runtime, started from config or env.

On a TPU pod slice, a multi-GPU Slurm job or several hosts, every process runs the same
command; `initialize` connects them through `jax.distributed.initialize` before anything
touches a device. After that `jax.devices()` lists the devices of all processes, a mesh spans
them, and the rest of oodjax runs unchanged: each process feeds only its own rows of every
global batch (`oodjax.data.core.batches`), XLA's collectives do the rest, Orbax writes each
process's shards of a checkpoint, and only process 0 writes logs and metrics.

What is started comes from the environment, else from an optional `config.distributed`
section with the same keys:

  OODJAX_DISTRIBUTED=auto          TPU pods, Slurm, Open MPI: JAX detects the rest itself.
  OODJAX_COORDINATOR_ADDRESS=h:p   process 0's host and a free port, the same for all;
  OODJAX_NUM_PROCESSES=N           with N > 1 these three start an explicit cluster,
  OODJAX_PROCESS_ID=i              i in [0, N) differing per process.
  OODJAX_HEARTBEAT_TIMEOUT=s       seconds without a heartbeat after which a process counts as
                                   dead (default 100, JAX's).

Unset (or N = 1), nothing is started and a run is the single-process run it always was.

If one process dies, JAX's coordination service notices the missing heartbeats and terminates
every other process with "Terminating process because the JAX distributed service detected
fatal errors", within the heartbeat timeout: no survivor hangs in a collective. Rerunning the
same command on every process resumes from the last checkpoint. On CPU the collectives go
through gloo (`jax_cpu_collectives_implementation`), which is how the tests run two processes
on one machine.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax

logger = logging.getLogger(__name__)

ENV = {"mode": "OODJAX_DISTRIBUTED", "coordinator_address": "OODJAX_COORDINATOR_ADDRESS",
       "num_processes": "OODJAX_NUM_PROCESSES", "process_id": "OODJAX_PROCESS_ID",
       "heartbeat_timeout_seconds": "OODJAX_HEARTBEAT_TIMEOUT"}
_INTS = ("num_processes", "process_id", "heartbeat_timeout_seconds")
DEFAULT_HEARTBEAT_TIMEOUT = 100


def settings(config: Any = None, environ: Mapping[str, str] | None = None
             ) -> dict[str, Any] | None:
  """What `initialize` would start: None for a single process, else the arguments.

  Args:
    config: a config with an optional `distributed` section (keys as in `ENV`); None: none.
    environ: the environment (default `os.environ`); its OODJAX_* variables override the
      config.

  Returns:
    None, or {"mode": "auto" | "explicit", "coordinator_address", "num_processes",
    "process_id", "heartbeat_timeout_seconds"} (None where auto-detected).

  Raises:
    ValueError: a malformed or incomplete setting, naming the variable.
  """
  environ = os.environ if environ is None else environ
  section = dict(config.get("distributed") or {}) if config is not None else {}
  unknown = set(section) - set(ENV)
  if unknown:
    raise ValueError(f"config.distributed has unknown keys {sorted(unknown)}; known: "
                     f"{sorted(ENV)}")
  found = {k: v for k, v in section.items() if v not in (None, "")}
  found.update({k: environ[var] for k, var in ENV.items() if environ.get(var, "") != ""})
  for key in _INTS:
    if key in found:
      try:
        found[key] = int(found[key])
      except (TypeError, ValueError):
        raise ValueError(f"{ENV[key]} (distributed.{key}) must be an integer, got "
                         f"{found[key]!r}") from None
  timeout = found.get("heartbeat_timeout_seconds", DEFAULT_HEARTBEAT_TIMEOUT)
  if timeout < 1:
    raise ValueError(f"{ENV['heartbeat_timeout_seconds']} must be >= 1 second, got {timeout}")
  mode = str(found.get("mode", "explicit")).lower()
  if mode not in ("auto", "explicit"):
    raise ValueError(f"{ENV['mode']} must be 'auto' (TPU pods, Slurm, Open MPI) or unset, got "
                     f"{found['mode']!r}")
  result = {"mode": mode, "coordinator_address": found.get("coordinator_address"),
            "num_processes": found.get("num_processes"), "process_id": found.get("process_id"),
            "heartbeat_timeout_seconds": timeout}
  if mode == "auto":
    return result
  n = found.get("num_processes", 1)
  if n < 1:
    raise ValueError(f"{ENV['num_processes']} must be >= 1, got {n}")
  if n == 1:
    return None
  missing = [ENV[k] for k in ("coordinator_address", "process_id") if k not in found]
  if missing:
    raise ValueError(f"{ENV['num_processes']}={n} also needs {' and '.join(missing)} (process "
                     "0's host:port, and this process's index in [0, N))")
  if not 0 <= found["process_id"] < n:
    raise ValueError(f"{ENV['process_id']}={found['process_id']} is outside [0, {n})")
  if ":" not in str(found["coordinator_address"]):
    raise ValueError(f"{ENV['coordinator_address']} must be host:port, got "
                     f"{found['coordinator_address']!r}")
  return result


def initialize(config: Any = None, environ: Mapping[str, str] | None = None) -> bool:
  """Starts the multi-controller runtime if the environment or config asks for it.

  Call it once per process, before anything touches a device (the CLI does, right after
  loading the config). Calling it again in a process already connected is a no-op.

  Args:
    config, environ: as in `settings`.

  Returns:
    Whether the process is part of a multi-process run.

  Raises:
    ValueError: a bad setting (see `settings`).
    RuntimeError: JAX's own, when a device was used before, or when the other processes do
      not connect within its initialization timeout (300 s).
  """
  wanted = settings(config, environ)
  if wanted is None or jax.distributed.is_initialized():
    return jax.distributed.is_initialized()
  # CPU devices talk through gloo across processes (XLA's default CPU collectives are
  # in-process only); GPU and TPU ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"heartbeat_timeout_seconds": wanted["heartbeat_timeout_seconds"]}
  if wanted["mode"] == "explicit":
    kwargs.update(coordinator_address=wanted["coordinator_address"],
                  num_processes=wanted["num_processes"], process_id=wanted["process_id"])
  # Raises if a device was used already, and when the coordinator is not reached in time.
  jax.distributed.initialize(**kwargs)
  logger.info("process %d of %d: %d local devices of %d", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """Whether this process writes logs, metrics and results (process 0)."""
  return jax.process_index() == 0
