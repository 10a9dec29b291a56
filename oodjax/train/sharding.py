"""Device mesh, shardings, and the jitted, sharded step functions.

Data parallelism is expressed once, as shardings on the inputs and outputs of `jax.jit`
(what `pjit` used to be): the batch is split along the "data" axis of the mesh, the state is
replicated, and XLA inserts the gradient all-reduce (and the global BatchNorm statistics)
itself. The same code runs on 1 CPU device, 8 fake CPU devices, a GPU or a TPU slice.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def make_mesh(shape: Sequence[int] = (-1,), axes: Sequence[str] = ("data",), *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from a config-style shape.

  Args:
    shape: devices along each axis; one entry may be -1 for "all the remaining devices",
      e.g. (-1,) is pure data parallelism over every device and (-1, 2) a (data, model) grid.
      A shape using fewer devices than exist takes the first ones (e.g. (1,) for a
      single-device reference run on a multi-device host).
    axes: axis names, the first of which is the data axis, e.g. ("data",) or ("data", "model").
    devices: the devices to use; default `jax.devices()`.

  Returns:
    A mesh with Auto axis types (sharding propagated by the compiler, as pjit did).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} and axes {tuple(axes)} differ in length")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh dimension may be -1, got {tuple(shape)}")
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh shape {tuple(shape)} does not fit {len(devices)} devices")
  shape = [len(devices) // known if s == -1 else s for s in shape]
  if math.prod(shape) > len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs more than the {len(devices)} devices")
  # `jax.make_mesh` defaults to Explicit axes, which would make every sharding part of the
  # array types; Auto keeps the classic "annotate inputs and outputs, let XLA propagate".
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices[:math.prod(shape)])


def data_axis_size(mesh: Mesh) -> int:
  """The number of batch shards: the size of the mesh's first ("data") axis."""
  return mesh.shape[mesh.axis_names[0]]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension of every batch array along the data axis.

  The batch is replicated over any other mesh axis (e.g. "model").
  """
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def state_sharding(abstract_state: PyTree, mesh: Mesh,
                   spec_fn: Callable[[Any, jax.ShapeDtypeStruct], P] | None = None) -> PyTree:
  """Shardings for every leaf of a state.

  Args:
    abstract_state: the state or its `jax.eval_shape`.
    mesh: the device mesh.
    spec_fn: `(key_path, leaf) -> PartitionSpec` to shard some leaves (e.g. wide Dense kernels
      along "model"); None replicates everything, which is right for the small CNNs here.

  Returns:
    A pytree of NamedSharding with the structure of `abstract_state`.
  """
  if spec_fn is None:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_fn(path, leaf)), abstract_state)


def with_shardings(abstract_state: PyTree, shardings: PyTree) -> PyTree:
  """Attaches shardings to the ShapeDtypeStruct leaves of an abstract state (for restoring)."""
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      abstract_state, shardings)


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings: PyTree) -> Callable:
  """Jits `train_step(state, batch, rng) -> (state, metrics)` over the mesh.

  The incoming state is donated: its buffers are reused for the new state, so training holds
  one copy of the parameters and optimizer state, not two. The caller must not touch the old
  state after the call.
  """
  rep = replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh), rep),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def jit_eval_step(eval_step: Callable, mesh: Mesh, state_shardings: PyTree) -> Callable:
  """Jits `eval_step(state, batch) -> sums` over the mesh (nothing donated)."""
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def pad_to_batches(num_examples: int, batch_size: int) -> np.ndarray:
  """Indices [M] that repeat example 0 until `num_examples` is a multiple of `batch_size`.

  The repeats are meant to be relabelled -1 (padding) so `make_eval_step` ignores them.
  """
  pad = -num_examples % batch_size
  return np.concatenate([np.arange(num_examples), np.zeros(pad, np.int64)])
