"""Device mesh, shardings, and the jitted, sharded step functions.

Parallelism is expressed once, as shardings on the inputs and outputs of `jax.jit` (what
`pjit` used to be): the batch is split along the "data" axis of the mesh (and the "fsdp" axis
when there is one), and XLA inserts the gradient all-reduce (and the global BatchNorm
statistics) itself. The state is replicated by default; the "fsdp" rule (`param_rule`) shards
every large parameter and its optimizer state along its largest axis divisible by the "fsdp"
mesh axis, and XLA gathers each one inside the step where it is used (fully sharded data
parallelism, as ZeRO-3): per-device state memory falls by the size of that axis. The same code
runs on 1 CPU device, 8 fake CPU devices, a GPU or a TPU slice.
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


FSDP_AXIS = "fsdp"
PARAM_RULES = ("replicated", "fsdp")
# Leaves smaller than this stay replicated under the "fsdp" rule: BatchNorm scales, biases and
# step counters cost nothing to copy, and gathering them would cost a collective each.
FSDP_MIN_SIZE = 2**12


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: the first ("data") axis, and "fsdp" if present
  (FSDP splits the batch over its parameter-sharding axis too, so no device idles)."""
  first = mesh.axis_names[0]
  return (first,) + tuple(a for a in mesh.axis_names[1:] if a == FSDP_AXIS)


def data_axis_size(mesh: Mesh) -> int:
  """The number of batch shards: the product of the sizes of `batch_axes(mesh)`."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension of every batch array along `batch_axes(mesh)`.

  The batch is replicated over any other mesh axis (e.g. "model").
  """
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def fsdp_spec(path, leaf, *, mesh: Mesh, axis: str = FSDP_AXIS,
              min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP rule for one leaf: shard its largest dimension divisible by the `axis` size.

  Ties go to the last such dimension (a conv kernel [kh, kw, C_in, C_out] with C_in = C_out
  shards its output channels). Leaves below `min_size` elements, and leaves with no divisible
  dimension, are replicated. `path` is unused (the rule looks at shapes only); it is there so
  the function fits `state_sharding`'s `spec_fn`.
  """
  del path
  n = mesh.shape[axis]
  shape = tuple(getattr(leaf, "shape", ()))
  if n == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
  if not candidates:
    return P()
  d = max(candidates, key=lambda i: (shape[i], i))
  return P(*([None] * d + [axis]))


def param_rule(name: str, mesh: Mesh) -> Callable[[Any, Any], P] | None:
  """The `spec_fn` of the config's parameter sharding rule `name` (`config.mesh.param_sharding`).

  "replicated": None (every leaf copied to every device). "fsdp": `fsdp_spec`, which needs an
  "fsdp" mesh axis, e.g. `mesh.shape=(-1, 4), mesh.axes=("data", "fsdp")`.
  """
  if name not in PARAM_RULES:
    raise ValueError(f"unknown parameter sharding rule {name!r}; known: {PARAM_RULES}")
  if name == "replicated":
    return None
  if FSDP_AXIS not in mesh.axis_names:
    raise ValueError(f"parameter sharding 'fsdp' needs an {FSDP_AXIS!r} mesh axis, e.g. "
                     f"mesh.axes=('data', 'fsdp'); the mesh has {mesh.axis_names}")
  return lambda path, leaf: fsdp_spec(path, leaf, mesh=mesh)


def per_device_bytes(tree: PyTree) -> int:
  """Bytes one device holds of a tree of sharded arrays (the shards are equal-sized)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def memory_report(compiled, state: PyTree) -> dict[str, int]:
  """Per-device memory of a compiled train step, from XLA's memory analysis.

  Args:
    compiled: `jitted.lower(state, batch, rng).compile()`.
    state: the state it takes (sharded arrays).

  Returns:
    {"state_bytes": the state's bytes on one device (parameters + optimizer state + batch
    statistics), "state_bytes_total": the whole state's bytes, "argument_bytes": the step's
    inputs on one device (state, batch, key), "temp_bytes": its scratch memory on one device
    (activations, gathered parameters, gradients)}.
  """
  analysis = compiled.memory_analysis()
  return {"state_bytes": per_device_bytes(state),
          "state_bytes_total": sum(int(leaf.nbytes) for leaf in jax.tree.leaves(state)),
          "argument_bytes": int(analysis.argument_size_in_bytes),
          "temp_bytes": int(analysis.temp_size_in_bytes)}


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def replicate_key(key: jax.Array, mesh: Mesh) -> jax.Array:
  """A PRNG key (the same on every process) as one array replicated over the whole mesh.

  `jax.device_put` cannot move an array held by one process onto devices of others, so the
  key travels through host memory, as every process's equal copy of it.
  """
  data = np.asarray(jax.random.key_data(key))
  return jax.random.wrap_key_data(jax.device_put(data, replicated(mesh)),
                                  impl=jax.random.key_impl(key))


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
