"""Efficiency accounting for ENVISE: FLOPs of compiled programs, RFL (Eq. 7) and GiE (Eq. 8).

    flops = model_flops(model, variables, (32, 32, 3))          # one image, inference mode
    rfl = relative_flops(x_tn, y_sn, p_inlier, f_p, o_d, n_tr, n_in)   # Eq. 7
    gie = gain_in_efficiency(x_tn, y_sn, p_inlier, f_p, o_d, n_tr, n_in)  # Eq. 8

FLOP conventions. XLA's cost analysis (`compiled_flops`) counts 2 FLOPs per multiply-accumulate
(MAC) of a dot or convolution and 1 per elementwise operation, and counts a convolution's MACs
over the in-bounds kernel taps only (the taps that land on a SAME padding are not counted). The
paper's figures follow the other usual convention: FLOPs = MACs, counted with the full kernel
at every output position (as thop/ptflops do). The zoo's CIFAR VGG-16 (head 512 -> 100) has
313.2 M such MACs at 32x32x3, which is the paper's "310 MFLOPs" for the RvSN; 2 x MACs would be
626 M. So `model_flops` reports FLOPs = MACs by default (`flops_per_mac=1`), and reports two
totals: "total", built on the compiled program (in-bounds taps, elementwise work included), and
"layer_total", built on the MACs of the Conv/Dense layers counted from their shapes (full kernel,
no elementwise work): the one to put next to the paper's numbers.

Binary layers are counted as in XNOR-Net (Rastegari et al. 2016, Sec. 3.2): with inputs and
weights in {-1, +1}, one 64-bit XNOR followed by a popcount does 64 binary MACs, so a binary
layer costs binary MACs / 64 operations, each counted as one MAC (`flops_per_mac` of them).

RFL and GiE are pure `jnp` functions of arrays, so a sweep over routing rates or priors is a
`jax.vmap` (or plain broadcasting) that compiles once.

References:
  Sharma et al., ENVISE (ICLR 2021 submission), Sec. 4
  "Gain in Efficiency (GiE)", Eqs. 7-8 (pp. 8-9), and Appendix A.3 (pp. 16-17).
  Rastegari et al. 2016, "XNOR-Net", Sec. 3.2 (binary operations per 64-bit word).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Binary MACs done by one 64-bit XNOR + popcount (XNOR-Net, Sec. 3.2).
BINARY_MACS_PER_OP = 64


# --------------------------------------------------------------------------------------------
# FLOPs of compiled programs.


def compiled_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` as XLA counts them in the compiled program.

  Lowers and compiles `jax.jit(fn)` for `args` (concrete arrays or `jax.ShapeDtypeStruct`s, so
  nothing needs to be allocated) and reads `cost_analysis()["flops"]`: 2 per multiply-accumulate
  of a dot or convolution (in-bounds kernel taps only), 1 per elementwise operation. Nothing is
  run. Static arguments go in through `functools.partial`.

  Args:
    fn: a function of arrays (jitted or not).
    *args: its positional arguments, arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    The FLOP count of one call, a Python float.

  Raises:
    ValueError: if the backend's cost analysis has no FLOP count.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  # jax 0.10.2 returns one dict; older versions returned a list with one dict per program.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if len(cost) == 1 else None
  if not isinstance(cost, Mapping) or "flops" not in cost:
    raise ValueError(f"the compiled program's cost analysis has no 'flops' entry ({cost!r}); "
                     f"this backend ({jax.default_backend()}) may not support cost analysis")
  return float(cost["flops"])


def is_binary_layer(module: nn.Module) -> bool:
  """The default binary-layer predicate: the module's class name starts with "Binary"."""
  return type(module).__name__.startswith("Binary")


class _LayerCall(NamedTuple):
  binary: bool
  name: str  # the module's path, for error messages
  out_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  # Binary layers only: (x -> the layer alone, its abstract arguments), to compile the layer by
  # itself and learn what XLA counts for it.
  standalone: tuple[Callable, tuple] | None = None

  @property
  def macs(self) -> int:
    # Every output entry is a dot product over all kernel axes but the last (Dense: D_in;
    # Conv: kh * kw * C_in / groups), whatever the stride.
    return math.prod(self.out_shape) * math.prod(self.kernel_shape[:-1])


def _own_kernel(module: nn.Module):
  """The module's own "kernel" parameter (not a child's), or None."""
  kernel = module.variables.get("params", {}).get("kernel")
  return kernel if hasattr(kernel, "shape") else None


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _standalone(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Callable, tuple]:
  """A function of (variables, *array arguments) applying an unbound copy of `module` alone.

  Array arguments become `jax.ShapeDtypeStruct`s; everything else (a `train` flag) is closed
  over as it was passed.
  """
  unbound = module.clone(parent=None)
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
  arrays = tuple(_abstract(leaf) for leaf, a in zip(leaves, is_array) if a)
  leaves = [None if a else leaf for leaf, a in zip(leaves, is_array)]  # keep no tracer

  def layer(variables, *arrays):
    it = iter(arrays)
    full = [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
    call_args, call_kwargs = jax.tree.unflatten(treedef, full)
    return unbound.apply(variables, *call_args, **call_kwargs)

  variables = jax.tree.map(_abstract, dict(module.variables))
  return layer, (variables, *arrays)


def _trace_layer_calls(apply: Callable, predicate: Callable[[nn.Module], bool],
                       calls: list[_LayerCall]) -> Callable:
  """Wraps `apply` so that, while it is traced, every binary / nn.Conv / nn.Dense call is logged.

  A call counts if the module owns a "kernel" parameter and either `predicate` accepts it
  (binary) or it is an `nn.Conv` / `nn.Dense` (float). Modules without their own kernel (a
  student network whose class name happens to start with "Binary") are looked through, and
  layers called inside a counted layer are not counted again.
  """
  depth = [0]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or depth[0]:
      return next_fun(*args, **kwargs)
    binary = bool(predicate(module))
    kernel = _own_kernel(module)
    if kernel is None or not (binary or isinstance(module, (nn.Conv, nn.Dense))):
      return next_fun(*args, **kwargs)
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    name = "/".join(module.scope.path) if module.scope is not None else type(module).__name__
    standalone = _standalone(module, args, kwargs) if binary else None
    calls.append(_LayerCall(binary, name, tuple(out.shape), tuple(kernel.shape), standalone))
    return out

  def wrapped(*args):
    with nn.intercept_methods(interceptor):
      return apply(*args)

  return wrapped


def model_flops(model: nn.Module, variables, input_shape: tuple[int, ...], *,
                binary_predicate: Callable[[nn.Module], bool] | None = None,
                flops_per_mac: int = 1, apply_kwargs: Mapping | None = None) -> dict[str, float]:
  """FLOPs of one inference-mode forward pass of one image, binary layers counted as XNOR-Net.

  The forward pass `model.apply(variables, x, **apply_kwargs)` with x [1, H, W, C] is lowered
  and compiled (nothing runs). While it is traced, the calls of binary layers (modules
  `binary_predicate` accepts that own a "kernel" parameter) and of `nn.Conv` / `nn.Dense`
  layers are intercepted, and each layer's MACs are counted from its output and kernel shapes:
  prod(out.shape) * prod(kernel.shape[:-1]), the full kernel at every output position. An
  XNOR-popcount layer computes exactly that many binary MACs: its zero padding becomes +1 after
  the sign (`oodjax.envise.binary.BinaryConv` pads, then binarises, then convolves VALID).

  The binary layers run in float in the compiled program. Their float count is what XLA counts
  for each binary layer compiled alone (its convolution, with XLA's in-bounds-taps rule since
  XLA folds an explicit pad into the convolution, plus its input sign and weight scaling): it
  is taken out of the compiled total and the XNOR count, binary MACs / 64, put in. So the
  binarisation of a binary layer's input is part of its XNOR cost, not of the float part.

  Layers inside `nn.scan` / `nn.remat` and other lifted transforms are seen once per trace,
  not once per execution: such models are not supported.

  Args:
    model: a Flax Linen module.
    variables: its variables; concrete arrays or `jax.ShapeDtypeStruct`s (from
      `jax.eval_shape(model.init, ...)`); nothing is computed with them.
    input_shape: (H, W, C) of one image; a leading batch axis of 1 is accepted.
    binary_predicate: module -> bool, which modules are binary layers; default
      `is_binary_layer` (class name starting with "Binary": `BinaryConv`, `BinaryDense`).
    flops_per_mac: 1 (default, the paper's convention: FLOPs = MACs) or 2 (XLA's convention).
      XLA's counts are scaled by flops_per_mac / 2; one XNOR-popcount of 64 binary MACs is
      counted as flops_per_mac FLOPs.
    apply_kwargs: keyword arguments of `model.apply`; default {"train": False}, the zoo's
      inference mode. Pass {} for a module whose `__call__` takes no `train`.

  Returns:
    A dict of Python floats (FLOPs in `flops_per_mac` units unless said otherwise):
      "compiled": XLA's FLOPs of the whole program as compiled, in XLA units (2 per MAC), with
        the binary layers in float.
      "binary_macs": MACs done by the binary layers.
      "float": the compiled count without the binary layers.
      "binary": the binary layers' XNOR-Net count, binary_macs / 64 * flops_per_mac.
      "total": float + binary.
      "float_layer_macs": MACs of the float nn.Conv / nn.Dense layers from their shapes (full
        kernel at every output position, as thop/ptflops count; no elementwise work).
      "layer_total": float_layer_macs * flops_per_mac + binary, the count the paper's
        figures follow.

  Raises:
    ValueError: on a bad `input_shape` or `flops_per_mac`.
  """
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 4 and shape[0] == 1:
    shape = shape[1:]
  if len(shape) != 3 or min(shape) <= 0:
    raise ValueError(f"input_shape must be (H, W, C) of one image (or (1, H, W, C)), "
                     f"got {tuple(input_shape)}")
  if flops_per_mac not in (1, 2):
    raise ValueError(f"flops_per_mac must be 1 (FLOPs = MACs) or 2 (XLA), got {flops_per_mac}")
  predicate = is_binary_layer if binary_predicate is None else binary_predicate
  kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)

  calls: list[_LayerCall] = []
  apply = _trace_layer_calls(lambda v, x: model.apply(v, x, **kwargs), predicate, calls)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)  # [1, H, W, C]
  compiled = compiled_flops(apply, variables, x)

  binary_calls = [c for c in calls if c.binary]
  binary_in_float = sum(compiled_flops(fn, *args) for fn, args in
                        (c.standalone for c in binary_calls))
  binary_macs = float(sum(c.macs for c in binary_calls))
  float_layer_macs = float(sum(c.macs for c in calls if not c.binary))
  # XLA may fuse across a layer boundary differently in the whole program than in the layer
  # alone; clip so that a rounding-size difference cannot make the float part negative.
  float_flops = max(compiled - binary_in_float, 0.0) * flops_per_mac / 2.0
  binary = binary_macs / BINARY_MACS_PER_OP * flops_per_mac
  return {
      "compiled": compiled,
      "binary_macs": binary_macs,
      "float": float_flops,
      "binary": binary,
      "total": float_flops + binary,
      "float_layer_macs": float_layer_macs,
      "layer_total": float_layer_macs * flops_per_mac + binary,
  }

# --------------------------------------------------------------------------------------------
# Relative FLOPs (Eq. 7) and Gain in Efficiency (Eq. 8).


def _check_range(name: str, value, low: float, high: float = math.inf) -> None:
  """Raises ValueError if a concrete `value` leaves [low, high]; traced values pass unchecked."""
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value, dtype=np.float64)
  if not (np.all(np.isfinite(v)) and np.all(v >= low) and np.all(v <= high)):
    bounds = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
    raise ValueError(f"{name} must be finite and {bounds}, got {value!r}")


def _check_inputs(teacher_flops, student_flops, p_inlier, inlier_routed, outlier_routed,
                  adaptive_length, inference_length) -> None:
  _check_range("teacher_flops (X)", teacher_flops, 0.0)
  if not isinstance(teacher_flops, jax.core.Tracer) and np.any(np.asarray(teacher_flops) == 0):
    raise ValueError("teacher_flops (X) must be > 0: RFL is relative to the teacher's FLOPs")
  _check_range("student_flops (Y)", student_flops, 0.0)
  _check_range("p_inlier (p)", p_inlier, 0.0, 1.0)
  _check_range("inlier_routed (f_p)", inlier_routed, 0.0, 1.0)
  _check_range("outlier_routed (o_d)", outlier_routed, 0.0, 1.0)
  _check_range("adaptive_length (N_tr)", adaptive_length, 0.0)
  _check_range("inference_length (N_in)", inference_length, 0.0)
  lengths = (adaptive_length, inference_length)
  if (not any(isinstance(n, jax.core.Tracer) for n in lengths)
      and np.any(np.asarray(adaptive_length) + np.asarray(inference_length) == 0)):
    raise ValueError("adaptive_length + inference_length (N_T) must be > 0")


def phase_flops(teacher_flops, student_flops, inlier_routed, outlier_routed):
  """FLOPs per image in each phase (Sec. 4, "Gain in Efficiency", p. 8).

    FL_tr = X + Y          adaptive phase: both networks see every image;
    FL_in = Y + f_p X      an inlier image, sent to the teacher with probability f_p;
    FL_o  = Y + o_d X      an outlier image, sent to the teacher with probability o_d.

  Args:
    teacher_flops: X, FLOPs of the teacher per image.
    student_flops: Y, FLOPs of the student per image.
    inlier_routed: f_p, the fraction of inlier images the student routes to the teacher
      (1 - TPR at the gate's threshold in oodjax's ID-positive convention; not the FPR@95
      metric, which is the fraction of outliers *kept* when 95% of inliers are kept).
    outlier_routed: o_d, the fraction of outlier images routed to the teacher (detected).

  All arguments broadcast against each other.

  Returns:
    (FL_tr, FL_in, FL_o), arrays of the broadcast shape.
  """
  x = jnp.asarray(teacher_flops, jnp.float32)
  y = jnp.asarray(student_flops, jnp.float32)
  f_p = jnp.asarray(inlier_routed, jnp.float32)
  o_d = jnp.asarray(outlier_routed, jnp.float32)
  fl_tr = x + y
  fl_in = y + f_p * x
  fl_o = y + o_d * x
  return jnp.broadcast_arrays(fl_tr, fl_in, fl_o)


def relative_flops(teacher_flops, student_flops, p_inlier, inlier_routed, outlier_routed,
                   adaptive_length, inference_length) -> jax.Array:
  """RFL, the FLOPs of ENVISE relative to the teacher alone (Eq. 7):

    RFL = N_tr / N_T * FL_tr / X + N_in / N_T * (p FL_in + q FL_o) / X,   N_T = N_tr + N_in,

  with FL_tr, FL_in, FL_o from `phase_flops`. Lower is cheaper; 1 is the teacher's cost.

  Choices where the paper is implicit: q = 1 - p (the stream holds inliers and outliers only);
  N_tr and N_in are phase lengths in any common unit (the paper counts epochs). Every argument
  is an array or scalar and they broadcast, so a vmap or an outer product over (p, f_p, o_d, N)
  grids works; concrete arguments are range-checked, traced ones are not.

  Args:
    teacher_flops: X > 0, the teacher's FLOPs per image.
    student_flops: Y >= 0, the student's FLOPs per image.
    p_inlier: p in [0, 1], the prior of inlier (frequent) classes in the stream.
    inlier_routed: f_p in [0, 1], the fraction of inlier images routed to the teacher.
    outlier_routed: o_d in [0, 1], the fraction of outlier images routed to the teacher.
    adaptive_length: N_tr >= 0, length of the adaptive (training) phase.
    inference_length: N_in >= 0, length of the inference phase; N_tr + N_in > 0.

  Returns:
    RFL, a float32 array of the broadcast shape.

  Raises:
    ValueError: if a concrete argument is out of range.

  References:
    Sharma et al., ENVISE, Eq. 7 (p. 9).
  """
  _check_inputs(teacher_flops, student_flops, p_inlier, inlier_routed, outlier_routed,
                adaptive_length, inference_length)
  fl_tr, fl_in, fl_o = phase_flops(teacher_flops, student_flops, inlier_routed, outlier_routed)
  x = jnp.asarray(teacher_flops, jnp.float32)
  n_tr = jnp.asarray(adaptive_length, jnp.float32)
  n_in = jnp.asarray(inference_length, jnp.float32)
  n_t = n_tr + n_in
  p = jnp.asarray(p_inlier, jnp.float32)
  q = 1.0 - p
  return n_tr / n_t * fl_tr / x + n_in / n_t * (p * fl_in + q * fl_o) / x


def min_relative_flops(teacher_flops, student_flops, p_inlier) -> jax.Array:
  """RFL_min = (Y + q X) / X, the inference-phase RFL of a perfect gate (f_p = 0, o_d = 1).

  Sec. 4, p. 9. (With f_p = 0 and o_d = 1, p FL_in + q FL_o = Y + q X since p + q = 1.)

  Args:
    teacher_flops: X > 0. student_flops: Y >= 0. p_inlier: p in [0, 1]; q = 1 - p.

  Returns:
    RFL_min, a float32 array of the broadcast shape.
  """
  x = jnp.asarray(teacher_flops, jnp.float32)
  y = jnp.asarray(student_flops, jnp.float32)
  q = 1.0 - jnp.asarray(p_inlier, jnp.float32)
  return (y + q * x) / x


def gain_in_efficiency(teacher_flops, student_flops, p_inlier, inlier_routed, outlier_routed,
                       adaptive_length, inference_length) -> jax.Array:
  """GiE = RFL_min / RFL (Eq. 8):

    GiE = (Y + q X) / [N_tr / N_T * FL_tr + N_in / N_T * (p FL_in + q FL_o)].

  Implemented as written. Remarks on reading it (no change to the formula):
    * RFL_min is the minimum of the inference phase only, while RFL includes the adaptive phase,
      so GiE < 1 even for a perfect gate whenever N_tr > 0; a gate that routes fewer outliers
      than it should (o_d < 1) lowers RFL and can push GiE above 1.
    * Higher GiE is cheaper. The paper's Appendix A.2 ("mean GiE for the BSN is 0.53 while
      that of the RvSN is 0.78 ... 47.2% gain in efficiency with the BSN") reads lower as
      better, and its worked example (App. A.3: p = 0.9, f_p = 0.26, o_d = 0.15, X = 9048e6,
      Y = 6e6, N_tr = 10, N_in = 30 -> "GiE = 0.79") does not follow from Eq. 8, which gives
      910.8 / 3957.714 = 0.2301 (RFL = 0.4374) for those numbers.
  Arguments, broadcasting and range checks are those of `relative_flops`.

  Returns:
    GiE, a float32 array of the broadcast shape.

  References:
    Sharma et al., ENVISE, Eq. 8 (p. 9); Appendix A.3 (pp. 16-17).
  """
  rfl = relative_flops(teacher_flops, student_flops, p_inlier, inlier_routed, outlier_routed,
                       adaptive_length, inference_length)
  return min_relative_flops(teacher_flops, student_flops, p_inlier) / rfl


# --------------------------------------------------------------------------------------------
# The paper's figures, for printing next to ours.


class PaperFigure(NamedTuple):
  """One network's cost as the paper reports it."""
  role: str          # TN, RvSN or BSN
  architecture: str
  mflops: float      # per CIFAR-100 image, the paper's "MFLOPs" (FLOPs = MACs, see above)
  latency_ms: float  # per image; hardware not stated
  source: str


PAPER_FIGURES: tuple[PaperFigure, ...] = (
    PaperFigure("TN", "DenseNet-201", 9048.0, 28.5, "Sec. 4, 'Gain in Efficiency (GiE)', p. 8"),
    PaperFigure("RvSN", "VGG-16", 310.0, 3.04, "Sec. 4, 'Gain in Efficiency (GiE)', p. 8"),
    PaperFigure("BSN", "binary VGG-16 (first and last layers real)", 6.0, 0.57,
                "Sec. 4, 'Gain in Efficiency (GiE)', p. 8; architecture: Sec. 4, p. 6"),
)

# The setting of Figure 5's GiE values (Sec. 4, p. 9): X = TN, Y = BSN, N_tr = 10, N_in = 30,
# p and q from Table 1's test counts.
PAPER_GIE_SETTING = {"teacher_flops": 9048e6, "student_flops": 6e6, "adaptive_length": 10.0,
                     "inference_length": 30.0}

# Appendix A.3 (pp. 16-17), C5 with 2500 inlier and 300 outlier images. The paper calls 0.15
# the "detection error (od)" but Eq. 7 uses o_d as the fraction of outliers detected; we plug
# it in literally. `paper_gie` is what the paper prints; Eq. 8 gives 0.2301.
PAPER_WORKED_EXAMPLE = {"teacher_flops": 9048e6, "student_flops": 6e6, "p_inlier": 0.9,
                        "inlier_routed": 0.26, "outlier_routed": 0.15, "adaptive_length": 10.0,
                        "inference_length": 30.0, "paper_gie": 0.79, "paper_gain": 0.362}


def flops_table(ours: Mapping[str, float]) -> str:
  """The paper's per-image MFLOPs next to ours, as a plain-text table.

  Args:
    ours: role ("TN", "RvSN", "BSN") -> our FLOPs per image (absolute, not millions); roles
      missing from it are shown as "-".

  Returns:
    A multi-line string, one row per paper figure.
  """
  unknown = set(ours) - {f.role for f in PAPER_FIGURES}
  if unknown:
    raise ValueError(f"unknown roles {sorted(unknown)}; known: "
                     f"{[f.role for f in PAPER_FIGURES]}")
  lines = [f"{'role':<5} {'architecture':<44} {'paper MFLOPs':>12} {'ours MFLOPs':>12}  source"]
  for f in PAPER_FIGURES:
    mine = f"{ours[f.role] / 1e6:12.1f}" if f.role in ours else f"{'-':>12}"
    lines.append(f"{f.role:<5} {f.architecture:<44} {f.mflops:12.1f} {mine}  {f.source}")
  return "\n".join(lines)
