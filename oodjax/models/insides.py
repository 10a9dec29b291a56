"""What detectors read from inside a network, taken in the same forward pass as the logits.

`forward_with_insides(model, variables, x)` runs an unmodified Flax Linen classifier (ours or
any user-written one) in inference mode under `nn.intercept_methods` and returns the logits with
an `Insides` pytree. The interceptor only looks at module calls; the arrays it picks up travel
out through `sow` into a private collection, so nothing is added to the model and the whole
thing is a pure function of `(variables, x)`: jit it with the model static, vmap it, take
gradients through it.

What is collected, and how each item is defined for an arbitrary model:

* "head": the last `nn.Dense` called is the head if its output *is* the model's output (the
  same array, checked by identity while tracing). `features` [B, D] is that Dense's input (the
  penultimate vector u), `head_kernel` [D, K] and `head_bias` [K] its parameters (zeros for a
  Dense without bias), so logits = features @ head_kernel + head_bias. For a model whose output
  is not a Dense output (softmax on top, a conv head, no Dense at all) these are None, and
  asking for "head" explicitly in `which` raises ValueError; the other items still work.
* "blocks": the outputs of the module calls for which `is_block(module, path)` is true, in
  the order the calls return (so a stage comes after the blocks inside it). The default,
  `is_block_or_stage`, matches class names ending in "Block" or "Stage", the convention of
  `oodjax.models`; `is_stage` keeps only stages (the "blocks" VMDLS pools for ResNets),
  `is_top_level` takes the direct children of the model, `is_pool` the pooling modules (the
  maps a network passes from one resolution to the next), and any predicate of the same
  signature works.
* "bn": for every `nn.BatchNorm` call, in call order, its input z normalised with the layer's
  running statistics, y = (z - mean) / sqrt(var + epsilon), whatever mode the layer runs in.
  `input_bn` is the network input viewed as a pseudo-BatchNorm normalised with the dataset
  mean/std; models here take inputs already normalised that way, so it is `x` itself. A model
  without BatchNorm gives empty tuples.
* "bn_sums": the same inputs reduced inside the forward pass to per-example, per-channel sums
  over the spatial axes, `ChannelSums(total = sum y, total_square = sum y^2, size = H*W)` with
  y as for "bn"; `input_sums` is the same for the input pseudo-layer. Only [B, C] arrays leave
  the layer, so on CPU the statistics cost little more than the plain forward (see
  `channel_sums`), which is what the sample-free BatchNorm indicators need.
* "feature_map": the last rank-4 array [B, h, w, c] returned by any module call other than
  the model itself and pooling modules (`is_pool`). With the zoo's convention (pooling belongs
  to the parent, a final pre-activation BN-ReLU is its own module) that is the input of the
  global pooling or of the last pooling before the classifier: the map Grad-CAM weights. For a user model it is the
  output of its last conv-like submodule. A model without one gives None (an error when
  "feature_map" is asked for explicitly).

Gradients at an intermediate module output: `perturb={name: delta}` adds `delta` to the
output of the module with that name (the names in `Insides`), so `jax.grad` with respect to a
zero `delta` is the gradient at that output. `feature_map_gradient` does this for Grad-CAM.

Names are module paths joined by "/" (e.g. "ResNetStage_1/BasicBlock_0/BatchNorm_2"). A module
called several times (weight sharing) appears once per call, and `perturb` hits every call.
Not supported: models whose modules are wrapped in lifted transforms that stack sown values
(`nn.scan`, `nn.vmap`); the collected tuples would then hold stacked arrays.
"""
from __future__ import annotations

import collections
import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

ALL_INSIDES = ("head", "blocks", "bn", "bn_sums", "feature_map")

# A collection of our own, so the model's own `sow`s into "intermediates" are untouched.
_COLLECTION = "oodjax_insides"

Path = tuple[str, ...]


def is_block_or_stage(module: nn.Module, path: Path) -> bool:
  """Default block predicate: class names ending in "Block" or "Stage"."""
  del path
  return type(module).__name__.endswith(("Block", "Stage"))


def is_stage(module: nn.Module, path: Path) -> bool:
  """Block predicate keeping only modules whose class name ends in "Stage"."""
  del path
  return type(module).__name__.endswith("Stage")


def is_pool(module: nn.Module, path: Path) -> bool:
  """Block predicate keeping pooling modules (class name ending in "Pool", e.g. `MaxPool`)."""
  del path
  return type(module).__name__.endswith("Pool")


def is_top_level(module: nn.Module, path: Path) -> bool:
  """Block predicate taking the direct submodules of the model."""
  del module
  return len(path) == 1


@struct.dataclass
class ChannelSums:
  """Per-example, per-channel sums of a (normalised) layer input over its spatial axes.

  Attributes:
    total: [B, C] sum over the H*W positions of y.
    total_square: [B, C] sum over the positions of y^2.
    size: H*W, the number of positions summed (1 for a [B, C] input); static.
  """
  total: jax.Array
  total_square: jax.Array
  size: int = struct.field(pytree_node=False, default=1)


def _reduced_axes(ndim: int, feature_axes: set[int]) -> tuple[int, ...]:
  return tuple(a for a in range(1, ndim) if a not in feature_axes)


def channel_sums(y: jax.Array, *, shift: jax.Array | None = None,
                 scale: jax.Array | None = None, feature_axes: Sequence[int] = (-1,)
                 ) -> ChannelSums:
  """Sums over the spatial axes of y = (z - shift) * scale, and of y^2, without forming y.

  The sums are of the centred d = z - shift, scaled afterwards on the [B, C] results:
  sum y = scale * sum d and sum y^2 = scale^2 * sum d^2. On XLA's CPU backend this keeps the
  [B, H, W, C] array out of memory (two reductions of one fused elementwise input), where
  forming y writes a second copy of the layer's input; and centring before squaring avoids the
  cancellation of uncentred sums (sum z^2 - n mean^2) when the running mean is large against
  the spread.

  Args:
    y: [B, ..., C] a layer input z; axes other than the batch and `feature_axes` are summed.
    shift: the per-channel running mean, of the feature axes' shape; None for 0.
    scale: the per-channel 1 / sqrt(running var + epsilon); None for 1.
    feature_axes: the channel axes (Flax's BatchNorm default: the last).

  Returns:
    `ChannelSums` with [B, C] totals (several feature axes are flattened into C).
  """
  features = {a % y.ndim for a in feature_axes}
  axes = _reduced_axes(y.ndim, features)
  size = 1
  for a in axes:
    size *= y.shape[a]
  shape = tuple(y.shape[a] if a in features else 1 for a in range(y.ndim))
  d = y if shift is None else y - jnp.reshape(shift, shape)
  total = jnp.sum(d, axis=axes)
  total_square = jnp.sum(jnp.square(d), axis=axes)
  total = total.reshape(total.shape[0], -1)
  total_square = total_square.reshape(total_square.shape[0], -1)
  if scale is not None:
    scale = jnp.reshape(scale, (1, -1))
    total, total_square = total * scale, total_square * jnp.square(scale)
  return ChannelSums(total, total_square, size)


@struct.dataclass
class Insides:
  """Arrays from inside one forward pass; items not requested in `which` are None or ().

  Attributes:
    features: [B, D] input of the head Dense (penultimate features u).
    head_kernel: [D, K] kernel of the head Dense.
    head_bias: [K] bias of the head Dense (zeros if it has none).
    blocks: outputs of the block modules, e.g. [B, H_i, W_i, C_i] each, in return order.
    bn_inputs: inputs of every BatchNorm normalised with its running statistics, same shape
      as the layer's input ([B, H, W, C] or [B, C]), in call order.
    input_bn: [B, H, W, C] the network input as a pseudo-BatchNorm layer: `x` itself, since
      models take inputs normalised with the dataset mean/std.
    bn_sums: a `ChannelSums` of every BatchNorm's normalised input, in call order.
    input_sums: the `ChannelSums` of `input_bn`.
    feature_map: [B, h, w, c] the last rank-4 module output (see the module docstring).
    head_name, block_names, bn_names, feature_map_name: module paths (static, not leaves).
  """
  features: jax.Array | None = None
  head_kernel: jax.Array | None = None
  head_bias: jax.Array | None = None
  blocks: tuple[jax.Array, ...] = ()
  bn_inputs: tuple[jax.Array, ...] = ()
  input_bn: jax.Array | None = None
  bn_sums: tuple[ChannelSums, ...] = ()
  input_sums: ChannelSums | None = None
  feature_map: jax.Array | None = None
  head_name: str | None = struct.field(pytree_node=False, default=None)
  block_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
  bn_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
  feature_map_name: str | None = struct.field(pytree_node=False, default=None)


def _name(path: Path) -> str:
  return "/".join(path)


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
  return args[0] if args else kwargs[name]


def normalize_with_running_stats(bn: nn.BatchNorm, z: jax.Array) -> jax.Array:
  """(z - running mean) / sqrt(running var + epsilon) for a bound BatchNorm module.

  Args:
    bn: a BatchNorm module bound to its variables (as seen by an interceptor).
    z: the layer's input, e.g. [B, H, W, C].

  Returns:
    The normalised input, the shape of `z`, before the layer's scale and bias.
  """
  mean, var, feature_axes = _running_stats(bn, z.ndim)
  # The statistics have the shape of the feature axes; give them z's rank so nothing relies
  # on rank promotion.
  shape = tuple(z.shape[a] if a in feature_axes else 1 for a in range(z.ndim))
  return (z - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + bn.epsilon)


def _running_stats(bn: nn.BatchNorm, ndim: int) -> tuple[jax.Array, jax.Array, set[int]]:
  """(running mean, running var, feature axes) of a bound BatchNorm."""
  if not bn.has_variable("batch_stats", "mean"):
    raise ValueError(f"BatchNorm {_name(bn.path)!r} has no running statistics: pass "
                     "variables holding 'batch_stats'")
  axes = bn.axis if isinstance(bn.axis, (tuple, list)) else (bn.axis,)
  mean = bn.get_variable("batch_stats", "mean")
  var = bn.get_variable("batch_stats", "var")
  return mean, var, {a % ndim for a in axes}


def _accepts_train(model: nn.Module) -> bool:
  return "train" in inspect.signature(type(model).__call__).parameters


@struct.dataclass
class InferenceApply:
  """`model.apply(variables, x, train=False)` as a callable that hashes by the model's value.

  jit keys a static callable by its hash: a fresh `functools.partial(model.apply, train=False)`
  per call hashes by identity, so every call recompiles and the compile cache keeps the partial
  (and its model) alive. Two `InferenceApply`s of equal Linen modules are equal, so they share
  one compiled program. Models without a `train` argument are called without it.
  """
  model: nn.Module = struct.field(pytree_node=False)

  def __call__(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    kwargs = {"train": False} if _accepts_train(self.model) else {}
    return self.model.apply(variables, x, **kwargs)


def inference_apply(model: nn.Module) -> InferenceApply:
  """The network's inference-mode forward `(variables, x) -> logits`, hashable by value."""
  return InferenceApply(model)


def forward_with_insides(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    *,
    which: Sequence[str] | None = None,
    is_block: Callable[[nn.Module, Path], bool] = is_block_or_stage,
    perturb: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, Insides]:
  """Runs `model` in inference mode and returns its logits with what `which` asks for.

  The model is called as `model.apply(variables, x, train=False)` (without `train` if its
  `__call__` has no such argument). Jit with the model and options static, e.g.
  `jax.jit(forward_with_insides, static_argnums=0, static_argnames=("which", "is_block"))`.

  Args:
    model: a Flax Linen classifier; need not know about this function.
    variables: {"params": ..., "batch_stats": ...} ("batch_stats" only where it has BN).
    x: [B, H, W, C] normalised inputs.
    which: any of "head", "blocks", "bn", "feature_map"; what is not asked for costs nothing
      and an item asked for that the model lacks raises. None (the default) collects all
      four and leaves what the model lacks as None.
    is_block: predicate `(module, path) -> bool` choosing the block outputs.
    perturb: {module name: array} added to the output of those modules (for gradients at an
      intermediate output; a zero array leaves the result unchanged).

  Returns:
    logits: [B, K] equal to `model.apply(variables, x, train=False)`.
    insides: an `Insides`; see the module docstring for each field's definition.

  Raises:
    ValueError: for an unknown `which`; for "head" asked of a model whose output is not that
      of its last `nn.Dense`; for "feature_map" asked of a model without rank-4 outputs.
  """
  strict = which is not None
  which = ALL_INSIDES if which is None else tuple(which)
  unknown = set(which) - set(ALL_INSIDES)
  if unknown:
    raise ValueError(f"unknown insides {sorted(unknown)}; known: {list(ALL_INSIDES)}")
  perturb = perturb or {}

  # Static facts about the calls, in order, filled while the model is traced: (tag, path,
  # index among the sows of that tag by that module). The arrays go through `sow`.
  records: list[tuple[str, Path, int]] = []
  counts: collections.Counter = collections.Counter()
  last_dense = []  # [(path, index, output)] of the latest nn.Dense call
  sizes = []  # spatial size of each BatchNorm input, in call order ("bn_sums")
  perturbed = set()

  def save(module: nn.Module, tag: str, value: jax.Array) -> int:
    index = counts[module.path, tag]
    counts[module.path, tag] += 1
    records.append((tag, module.path, index))
    module.sow(_COLLECTION, tag, value)
    return index

  def interceptor(next_fun, args, kwargs, context):
    module, path = context.module, context.module.path
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if path and _name(path) in perturb:
      out = out + perturb[_name(path)]
      perturbed.add(_name(path))
    if "bn" in which and isinstance(module, nn.BatchNorm):
      z = _first_arg(args, kwargs, "x")
      save(module, "_bn_input", normalize_with_running_stats(module, z))
    if "bn_sums" in which and isinstance(module, nn.BatchNorm):
      z = _first_arg(args, kwargs, "x")
      mean, var, features = _running_stats(module, z.ndim)
      sums = channel_sums(z, shift=mean, scale=jax.lax.rsqrt(var + module.epsilon),
                          feature_axes=tuple(features))
      save(module, "_bn_total", sums.total)
      save(module, "_bn_total_square", sums.total_square)
      sizes.append(sums.size)
    if "head" in which and isinstance(module, nn.Dense):
      index = save(module, "_dense_input", _first_arg(args, kwargs, "inputs"))
      last_dense[:] = [(path, index, out)]
    # The model itself (empty path) is neither a block nor the feature map.
    if path and isinstance(out, jax.Array):
      if "blocks" in which and is_block(module, path):
        save(module, "_block", out)
      if "feature_map" in which and out.ndim == 4 and not is_pool(module, path):
        save(module, "_map", out)
    return out

  call_kwargs = {"train": False} if _accepts_train(model) else {}
  with nn.intercept_methods(interceptor):
    logits, state = model.apply(variables, x, mutable=[_COLLECTION], **call_kwargs)
  sown = state.get(_COLLECTION, {})
  if set(perturb) - perturbed:
    raise ValueError(f"perturb names no module called: {sorted(set(perturb) - perturbed)}")

  def fetch(tag: str, path: Path, index: int) -> jax.Array:
    node = sown
    for key in path:
      node = node[key]
    return node[tag][index]

  def all_of(tag: str) -> tuple[tuple[jax.Array, ...], tuple[str, ...]]:
    hits = [(fetch(t, p, i), _name(p)) for t, p, i in records if t == tag]
    return tuple(a for a, _ in hits), tuple(n for _, n in hits)

  fields = {}
  if "head" in which:
    try:
      fields.update(_head(model, variables, logits, last_dense, fetch))
    except ValueError:
      if strict:
        raise
  if "blocks" in which:
    fields["blocks"], fields["block_names"] = all_of("_block")
  if "bn" in which:
    fields["bn_inputs"], fields["bn_names"] = all_of("_bn_input")
    fields["input_bn"] = x  # already normalised with the dataset mean/std
  if "bn_sums" in which:
    totals, _ = all_of("_bn_total")
    squares, names = all_of("_bn_total_square")
    fields["bn_sums"] = tuple(ChannelSums(t, q, n) for t, q, n in zip(totals, squares, sizes))
    fields["bn_names"] = names
    fields["input_sums"] = channel_sums(x)
  if "feature_map" in which:
    maps, names = all_of("_map")
    if maps:
      fields["feature_map"], fields["feature_map_name"] = maps[-1], names[-1]
    elif strict:
      raise ValueError(f"{type(model).__name__} has no submodule returning a rank-4 map")
  return logits, Insides(**fields)


def _head(model, variables, logits, last_dense, fetch) -> dict[str, Any]:
  """features / head_kernel / head_bias of the Dense whose output is the logits."""
  if not last_dense:
    raise ValueError(f"{type(model).__name__} calls no nn.Dense, so it has no linear head "
                     "to take features from; ask `which` for other insides")
  path, index, out = last_dense[0]
  if out is not logits:
    raise ValueError(f"the output of {type(model).__name__} is not the output of its last "
                     f"nn.Dense ({_name(path)!r}), so features @ kernel + bias would not be "
                     "its logits; ask `which` for other insides")
  params = nn.meta.unbox(variables["params"])
  for key in path:
    params = params[key]
  kernel = params["kernel"]  # [D, K]
  bias = params.get("bias", jnp.zeros(kernel.shape[-1], kernel.dtype))  # [K]
  return dict(features=fetch("_dense_input", path, index), head_kernel=kernel,
              head_bias=bias, head_name=_name(path))


def feature_map_gradient(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    class_index: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The feature map and the gradient of one logit per example with respect to it (Grad-CAM).

  Finds the feature map's module with an abstract trace (`jax.eval_shape`, no compute), then
  differentiates the chosen logits with respect to a zero perturbation of that module's
  output. In inference mode the examples do not interact, so the gradient of the sum over the
  batch is each example's own gradient. Where the map feeds a max-pool with tied inputs (the
  zeros of a ReLU), the logit is not differentiable and this is the subgradient JAX picks.

  Args:
    model: a Flax Linen classifier.
    variables: its variables.
    x: [B, H, W, C] normalised inputs.
    class_index: [B] int, the class whose logit is explained for each example.

  Returns:
    logits: [B, K].
    feature_map: [B, h, w, c] as in `Insides.feature_map`.
    grad: [B, h, w, c] d logits[b, class_index[b]] / d feature_map[b].

  References:
    Selvaraju et al. 2017, Grad-CAM, Eq. 1 (the weights are the spatial mean of `grad`).
  """
  which = ("feature_map",)
  _, shapes = jax.eval_shape(
      lambda v, x: forward_with_insides(model, v, x, which=which), variables, x)
  name = shapes.feature_map_name

  def chosen_logit_sum(delta):
    logits, insides = forward_with_insides(model, variables, x, which=which,
                                           perturb={name: delta})
    chosen = jnp.take_along_axis(logits, class_index[:, None], axis=1)  # [B, 1]
    return jnp.sum(chosen), (logits, insides.feature_map)

  zeros = jnp.zeros(shapes.feature_map.shape, shapes.feature_map.dtype)
  grad, (logits, feature_map) = jax.grad(chosen_logit_sum, has_aux=True)(zeros)
  return logits, feature_map, grad
