"""Sample-free white-box OOD indicators (Begon & Geurts), all but ODIN from one forward pass.

Every indicator is a function of one input's forward pass, HIGHER for MORE out-of-distribution
inputs (the paper designs them that way, Section 1.1, and it is the library's convention):

* probability-based, from the logits z [B, K]: MP (Eq. 7), H (Eq. 8), T1000 (Eq. 11); ODIN
  (Eq. 12) needs a backward pass and lives in its own function, `odin_indicator`.
* latent, from the head's input u [B, D] and kernel W [D, K] (the bias is ignored, as in the
  paper), with k the predicted class: NORM, ANG, PROJ, ACT (Eqs. 14-17), their restrictions to
  the positive subspace of w_k (the components d with W[d, k] > 0): NORM+, ANG++, ACT+, and
  ANG+, which the tables list and the authors' code defines (see `latent_indicators`).
* BatchNorm-based (Eqs. 18-30): DMS, DMS-AOS, DSS, DSS-EXT over every layer of the network,
  the input seen as a pseudo-BatchNorm and every nn.BatchNorm, each on its input standardised
  with its statistics, and IN-DMS, IN-DMS-AOS, IN-DSS, IN-DSS-EXT on the input pseudo-layer
  alone (Section 2.2, "Relevant subsets").

`indicators(model, variables, x)` returns them all as {name: [B]} from the single forward pass
of `oodjax.models.forward_with_insides`; it works on any Flax Linen classifier without editing
it and is jit-able with the model static:

    fn = jax.jit(indicators, static_argnums=0, static_argnames=("which", "alpha"))
    scores = fn(model, variables, x)  # {"MP": [B], ..., "DSS-EXT": [B]}

Choices where the paper leaves room (each is repeated where it is implemented):

* k is the class the network predicts, argmax of the logits including the bias.
* ANG+ is the authors' code's: the positive components of w_k in the numerator only.
* A zero vector has cosine 0 with anything, so ANG = 1 (not NaN) when u = 0 or w_k = 0.
* The set "all the layers" of DMS/DMS-AOS/DSS/DSS-EXT is B, the input pseudo-layer and every
  BatchNorm, in the sum and in the channel count C_S (Section 2.2 drops S from the notation
  when S = B; the authors' code does the same). A network without BatchNorm has no DMS: its B
  is the input alone, and DMS would repeat IN-DMS (likewise DSS when no BatchNorm input has
  spatial size > 1).
* S (Eq. 21) has H*W - 1 in its denominator, as the paper writes it (the authors' code takes
  the standard deviation with H*W, so its DSS and DSS-EXT differ slightly from the paper's and
  from ours). A layer whose input has spatial size 1 (a BatchNorm after a Dense, [B, C], or on
  a 1x1 map) then has no S and no chi-square law: such layers count in DMS and DMS-AOS but are
  left out of DSS and DSS-EXT, numerator and C_S alike.
* Channels are the feature axes of each BatchNorm (Flax's default: the last); every other
  axis but the batch is spatial.

References:
  J.-M. Begon and P. Geurts. Sample-free white-box out-of-distribution detection for deep
  learning. CVPR Workshops 2021. Equation numbers refer to that paper.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from oodjax.detectors.odin.preprocessing import odin_score
from oodjax.detectors.softmax import T1000_TEMPERATURE
from oodjax.models.insides import ChannelSums, forward_with_insides

PROBABILITY_INDICATORS = ("MP", "H", "T1000")
LATENT_INDICATORS = ("NORM", "NORM+", "ANG", "ANG+", "ANG++", "PROJ", "ACT", "ACT+")
BATCHNORM_INDICATORS = ("DMS", "DMS-AOS", "DSS", "DSS-EXT")
INPUT_INDICATORS = ("IN-DMS", "IN-DMS-AOS", "IN-DSS", "IN-DSS-EXT")
# Everything `indicators` can return; ODIN is separate (`odin_indicator`).
ALL_INDICATORS = (PROBABILITY_INDICATORS + LATENT_INDICATORS + BATCHNORM_INDICATORS
                  + INPUT_INDICATORS)

# The paper's sample-free settings (Section 2.1 and Eq. 30); T = 1000 is `T1000_TEMPERATURE`.
ODIN_EPSILON = 8e-4
DSS_EXT_ALPHA = 0.1

# Examples per step of the indicator pass on CPU (see `indicators`).
_DEFAULT_CPU_CHUNK = 64

# Smallest denominator of a cosine; below it the vector is treated as zero.
_TINY = 1e-12


# ---------------------------------------------------------------------------------------------
# Probability-based indicators.


def probability_indicators(logits: jax.Array,
                           temperature: float = T1000_TEMPERATURE) -> dict[str, jax.Array]:
  """MP, H and T1000 from the logits.

  Args:
    logits: [B, K] the network's output z.
    temperature: T of T1000 (the paper fixes 1000).

  Returns:
    {"MP": [B], "H": [B], "T1000": [B]}, in [0, 1 - 1/K], [0, log K], [0, 1 - 1/K]. T1000 is
    close to 1 - 1/K for every input (Eq. 13): only its small variations matter.

  References:
    Begon & Geurts 2021, Eq. 7 (MP), Eq. 8 (H), Eqs. 10-11 (T1000).
  """
  chex.assert_rank(logits, 2)
  log_p = jax.nn.log_softmax(logits, axis=-1)  # [B, K]
  # exp(max log p) rather than max softmax: the same number, without forming p twice.
  mp = 1.0 - jnp.exp(jnp.max(log_p, axis=-1))
  # p log p -> 0 as p -> 0; log_softmax is finite for finite logits, so the product is 0.
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  t1000 = 1.0 - jnp.exp(jnp.max(jax.nn.log_softmax(logits / temperature, axis=-1), axis=-1))
  return {"MP": mp, "H": entropy, "T1000": t1000}


def odin_indicator(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                   x: jax.Array, *, std: Any, temperature: float = T1000_TEMPERATURE,
                   epsilon: float = ODIN_EPSILON) -> jax.Array:
  """ODIN with the paper's fixed sample-free hyperparameters: T1000 of the perturbed input.

  A thin wrapper over `oodjax.detectors.odin.odin_score` (the perturbation needs a backward pass,
  so it is not part of `indicators`). The paper calls eps = 8e-4 "the default value of the
  noise magnitude proposed in the original paper"; the ODIN authors' own code defaults to
  0.0014. We keep the paper's 8e-4 so results compare with its tables. The paper's Eq. 9 reads
  x' = x + eps sign(grad_x E), which would raise the loss; `odin_score` follows ODIN itself and
  steps   against the gradient (lowering the loss of the predicted class), with eps in pixel units.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]` in inference mode.
    variables: the network's variables.
    x: [B, H, W, C] normalised inputs.
    std: [C] the per-channel std used to normalise `x`; `odin_score` divides the pixel-space step
      by it.
    temperature: T (paper: 1000).
    epsilon: perturbation magnitude (paper: 8e-4).

  Returns:
    [B] ODIN scores, higher = more OOD, in (0, 1 - 1/K].

  References:
    Begon & Geurts 2021, Eqs. 9-12; Liang, Li & Srikant 2018 (ODIN).
  """
  return odin_score(apply_fn, variables, x, temperature=temperature, epsilon=epsilon, std=std)


# ---------------------------------------------------------------------------------------------
# Latent indicators.


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine of [B, D] arrays; 0 where either row is zero (the angle is undefined)."""
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)  # [B]
  dot = jnp.sum(a * b, axis=-1)
  return jnp.where(norms > _TINY, dot / jnp.maximum(norms, _TINY), 0.0)


def latent_indicators(features: jax.Array, kernel: jax.Array,
                      logits: jax.Array) -> dict[str, jax.Array]:
  """NORM, ANG, PROJ, ACT and their positive-subspace variants NORM+, ANG+, ANG++, ACT+.

  With u the features, k = argmax(logits) the predicted class and w_k = kernel[:, k]:
  NORM = -|u|, ANG = 1 - cos(u, w_k), PROJ = -w_k.u / |w_k|, ACT = -w_k.u. The bias b_k is
  ignored, as in the paper. The "+" variants keep only the components d with w_k[d] > 0
  (Section 2.1, "Positivity"): NORM+ = -|u+|, ACT+ = -w_k+.u, ANG++ = 1 - cos(u+, w_k+), where
  v+ zeroes the other components.

  ANG+ is listed in the paper's tables but not defined in its text; the definition is the
  authors' released code (jm-begon/ood_samplefree, `features/latent.py`, `compute_ang_p`),
  ANG+ = 1 - (1 - ANG) ACT+ / ACT, which is

      ANG+ = 1 - (sum over d with w_k[d] > 0 of w_k[d] u[d]) / (|w_k| |u|),

  the cosine's numerator restricted to the positive weights, both norms over the full vectors.
  We compute this second form: it needs no division by ACT, which can be 0.

  Each one is negated where needed so that it is low for confident ID inputs (large norm,
  small angle to the winning hyperplane) as the paper states, i.e. higher = more OOD.
  A cosine with a zero vector (u = 0, e.g. all ReLUs off; no positive weight in w_k) is taken
  as 0, so the ANG-type indicators are 1 there instead of NaN.

  Bounds: ANG lies in [0, 2] in general. Table 1's 0 <= ANG <= 1 assumes the winning
  logit's w_k.u >= 0, which the network does not guarantee (every w_j.u may be negative); ANG+
  and ANG++ are in [0, 1] whenever u >= 0 (ReLU features), ANG++'s Table 1 bound.

  Args:
    features: [B, D] penultimate vector u (the head Dense's input).
    kernel: [D, K] the head's kernel W (logits = u @ W + b).
    logits: [B, K] the network output, used only to pick k.

  Returns:
    {name: [B]} for "NORM", "NORM+", "ANG", "ANG+", "ANG++", "PROJ", "ACT", "ACT+".

  References:
    Begon & Geurts 2021, Eqs. 14 (NORM), 15 (ANG), 16 (PROJ), 17 (ACT); Section 2.1
    "Positivity" (NORM+, ANG++, ACT+); Table 2 and the authors' code (ANG+).
  """
  chex.assert_rank([features, kernel, logits], 2)
  chex.assert_equal_shape_prefix([features, logits], 1)
  k = jnp.argmax(logits, axis=-1)  # [B]
  w = jnp.take(kernel.T, k, axis=0)  # [B, D] the winning class's hyperplane w_k per example
  positive = w > 0  # [B, D]
  w_pos = jnp.where(positive, w, 0.0)
  u_pos = jnp.where(positive, features, 0.0)
  dot = jnp.sum(w * features, axis=-1)  # [B] w_k . u
  dot_pos = jnp.sum(w_pos * features, axis=-1)  # [B] w_k+ . u
  w_norm = jnp.linalg.norm(w, axis=-1)
  norms = w_norm * jnp.linalg.norm(features, axis=-1)  # [B] |w_k| |u|
  return {
      "NORM": -jnp.linalg.norm(features, axis=-1),
      "NORM+": -jnp.linalg.norm(u_pos, axis=-1),
      "ANG": 1.0 - _cosine(features, w),
      "ANG+": 1.0 - jnp.where(norms > _TINY, dot_pos / jnp.maximum(norms, _TINY), 0.0),
      "ANG++": 1.0 - _cosine(u_pos, w_pos),
      "PROJ": -dot / jnp.maximum(w_norm, _TINY),
      "ACT": -dot,
      "ACT+": -dot_pos,
  }


# ---------------------------------------------------------------------------------------------
# BatchNorm-based indicators.


def chi2_two_sided_pvalue(v: jax.Array, dof: int) -> jax.Array:
  """Bilateral p-value of `v` under a chi-square law with `dof` degrees of freedom.

  p = 2 min(F(v), 1 - F(v)) with F the CDF; each tail comes from its own regularised
  incomplete gamma function, so a far upper tail does not round 1 - F to 0. (The indicators
  use the equivalent `chi2_extreme`, which compiles much faster than the incomplete gamma.)

  Args:
    v: [...] non-negative statistics.
    dof: degrees of freedom, a Python int >= 1.

  Returns:
    [...] p-values in [0, 1].
  """
  half = 0.5 * dof
  lower = jax.scipy.special.gammainc(half, 0.5 * v)  # F(v)
  upper = jax.scipy.special.gammaincc(half, 0.5 * v)  # 1 - F(v)
  return jnp.minimum(2.0 * jnp.minimum(lower, upper), 1.0)


def chi2_extreme(v: jax.Array, dof: int, alpha: float) -> jax.Array:
  """Whether `v` is extreme for a bilateral chi-square test: p-value < alpha.

  The p-value is below alpha exactly when v lies below the alpha/2 quantile or above the
  1 - alpha/2 quantile, so the test is two comparisons against quantiles computed once, at
  trace time, with scipy (`dof` and `alpha` are static). This avoids tracing the incomplete
  gamma function, whose compilation costs seconds per layer on CPU.

  Args:
    v: [...] non-negative statistics.
    dof: degrees of freedom, a Python int >= 1.
    alpha: significance level, a Python float in (0, 1).

  Returns:
    [...] bool, True where v is extreme.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (trace-time constants only)
  low = float(stats.chi2.ppf(0.5 * alpha, dof))
  high = float(stats.chi2.isf(0.5 * alpha, dof))
  return (v < low) | (v > high)


def channel_statistics(sums: ChannelSums) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example, per-channel M, mean of squares and V of a standardised BatchNorm input.

  From the spatial sums of y and y^2 (`oodjax.models.channel_sums`, taken inside the forward
  pass): M = sum y / n and V = sum y^2 - n M^2. This one-pass formula is accurate here because
  y is already centred and scaled by the running statistics (the "shifted data" algorithm): its
  relative error in V is about (M / S)^2 * 1e-7 in float32, negligible for inputs that are not
  grossly OOD; V is clamped at 0 so rounding cannot make it negative when |M| >> S (inputs
  whose DMS is then huge anyway).

  Args:
    sums: the spatial sums of y, the input of a BatchNorm standardised with its running
      statistics (Eq. 18), over n = `sums.size` positions.

  Returns:
    m: [B, C] spatial mean M_c (Eq. 20).
    mean_square: [B, C] spatial mean of y^2 (the inner average of Eq. 28).
    v: [B, C] V_c = sum over positions of (y - M_c)^2 = (H W - 1) S_c^2 (Eqs. 21-22).
  """
  n = sums.size
  m = sums.total / n
  v = jnp.maximum(sums.total_square - n * jnp.square(m), 0.0)
  return m, sums.total_square / n, v


def spatial_size(y_shape: Sequence[int]) -> int:
  """H * W (the product of the axes between batch and channels) of a BatchNorm input."""
  size = 1
  for d in y_shape[1:-1]:
    size *= d
  return size


def batchnorm_indicators(layers: Sequence[ChannelSums], *, alpha: float = DSS_EXT_ALPHA,
                         prefix: str = "") -> dict[str, jax.Array]:
  """DMS, DMS-AOS, DSS, DSS-EXT over a set S of BatchNorm layers.

  Each is a sum over the layers in S and their channels, divided by C_S, the number of
  channels summed over. Layers of spatial size 1 have no S_c (Eq. 21 divides by H W - 1 = 0):
  they are left out of DSS and DSS-EXT, and of their C_S; DSS and DSS-EXT are absent from the
  result when no layer is left.

  Args:
    layers: the set S, as the spatial sums (`oodjax.models.channel_sums`) of each layer's
      input standardised with its running statistics (Eq. 18), [B, C_l] each. The input
      pseudo-layer is one of them when S is the whole network (Section 2.2).
    alpha: significance level of DSS-EXT's bilateral chi-square test (paper: 0.1).
    prefix: prepended to the names ("IN-" for the input pseudo-layer alone).

  Returns:
    {prefix + name: [B]}; DMS, DMS-AOS, DSS >= 0 and DSS-EXT in [0, 1].

  References:
    Begon & Geurts 2021, Eqs. 18-22 (statistics), 26 (chi-square law of V), 27 (DMS),
    28 (DMS-AOS), 29 (DSS), 30 (DSS-EXT).
  """
  if not layers:
    raise ValueError("batchnorm_indicators needs at least one layer")
  dms = dms_aos = dss = dss_ext = 0.0
  channels = channels_with_spread = 0
  for sums in layers:
    m, mean_square, v = channel_statistics(sums)
    dms = dms + jnp.sum(jnp.square(m), axis=-1)
    dms_aos = dms_aos + jnp.sum(mean_square, axis=-1)
    channels += m.shape[-1]
    n = sums.size
    if n > 1:
      s = jnp.sqrt(v / (n - 1))  # [B, C] Eq. 21
      dss = dss + jnp.sum(jnp.square(s - 1.0), axis=-1)
      extreme = chi2_extreme(v, n - 1, alpha)  # [B, C] Eq. 30: p-value < alpha
      dss_ext = dss_ext + jnp.sum(extreme.astype(v.dtype), axis=-1)
      channels_with_spread += m.shape[-1]
  out = {prefix + "DMS": dms / channels, prefix + "DMS-AOS": dms_aos / channels}
  if channels_with_spread:
    out[prefix + "DSS"] = dss / channels_with_spread
    out[prefix + "DSS-EXT"] = dss_ext / channels_with_spread
  return out


# ---------------------------------------------------------------------------------------------
# Everything from one forward pass.


def _availability(insides) -> dict[str, str]:
  """{indicator: why it cannot be computed} for what this network lacks."""
  missing = {}
  if insides.features is None:
    for name in LATENT_INDICATORS:
      missing[name] = ("needs a linear head: the model's output must be the output of its last "
                       "nn.Dense (features @ kernel + bias)")
  if not insides.bn_sums:
    for name in BATCHNORM_INDICATORS:
      missing[name] = "needs at least one nn.BatchNorm layer, and the model has none"
  elif all(sums.size <= 1 for sums in insides.bn_sums):
    for name in ("DSS", "DSS-EXT"):
      missing[name] = ("needs a BatchNorm whose input has spatial size > 1 (S_c divides by "
                       "H*W - 1); every BatchNorm of this model has spatial size 1")
  if insides.input_sums is not None and insides.input_sums.size <= 1:
    for name in ("IN-DSS", "IN-DSS-EXT"):
      missing[name] = "needs an input with spatial size > 1"
  return missing


def available_indicators(model: nn.Module, variables: Mapping[str, Any],
                         x_shape: Sequence[int]) -> dict[str, str | None]:
  """Which of `ALL_INDICATORS` a model supports, found by an abstract trace (no compute).

  Args:
    model: a Flax Linen classifier.
    variables: its variables.
    x_shape: shape of an input batch, e.g. (B, H, W, C).

  Returns:
    {name: None if available, else the reason it is not}, in `ALL_INDICATORS` order.
  """
  x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
  which = _insides_for(model, variables, x, need_head=True, need_bn=True, strict=False)
  _, insides = jax.eval_shape(
      lambda v, x: forward_with_insides(model, v, x, which=which), variables, x)
  missing = _availability(insides)
  return {name: missing.get(name) for name in ALL_INDICATORS}


def _insides_for(model, variables, x, *, need_head: bool, need_bn: bool,
                 strict: bool) -> tuple[str, ...]:
  """The `forward_with_insides` items to ask for; without `strict`, "head" only if the model
  has a linear head (found by an abstract trace)."""
  if need_head and not strict:
    try:
      jax.eval_shape(lambda v, x: forward_with_insides(model, v, x, which=("head",)),
                     variables, x)
    except ValueError:
      need_head = False
  return (("head",) if need_head else ()) + (("bn_sums",) if need_bn else ())


def _resolve_chunk_size(chunk_size: int | None | str) -> int | None:
  if chunk_size == "auto":
    return _DEFAULT_CPU_CHUNK if jax.default_backend() == "cpu" else None
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
  return chunk_size


def _in_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk: int | None) -> Any:
  """`fn(x)`, run over the batch `chunk` examples at a time (`lax.map`) when it is larger.

  The examples are independent in inference mode, so the result is the same; the remainder
  that does not fill a chunk is one more call of `fn` on its own smaller shape (no padding).
  """
  batch = x.shape[0]
  if chunk is None or batch <= chunk:
    return fn(x)
  full = batch // chunk * chunk
  parts = jax.lax.map(fn, x[:full].reshape((full // chunk, chunk) + x.shape[1:]))
  parts = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), parts)
  if full == batch:
    return parts
  rest = fn(x[full:])
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), parts, rest)


def indicators(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *,
               which: Sequence[str] | None = None,
               alpha: float = DSS_EXT_ALPHA,
               chunk_size: int | None | str = "auto") -> dict[str, jax.Array]:
  """All sample-free indicators but ODIN, from ONE inference-mode forward pass.

  The pass is `oodjax.models.forward_with_insides`, which intercepts the model's nn.BatchNorm
  and final nn.Dense calls: the model is not edited and need not know about this function.
  Each BatchNorm's input leaves the pass only as per-channel spatial sums ([B, C], see
  `oodjax.models.channel_sums`). Jit with the model and options static:
  `jax.jit(indicators, static_argnums=0, static_argnames=("which", "alpha", "chunk_size"))`.

  Args:
    model: a Flax Linen classifier mapping [B, H, W, C] normalised inputs to logits [B, K].
    variables: {"params": ..., "batch_stats": ...}.
    x: [B, H, W, C] inputs normalised with the dataset mean/std (as the model expects).
    which: names from `ALL_INDICATORS` to compute (a tuple, hashable for jit). None computes
      every indicator the model supports and silently leaves out the rest (latent ones without
      a Dense head, BatchNorm ones without BatchNorm); `available_indicators` says why.
    alpha: significance level of DSS-EXT and IN-DSS-EXT (paper: 0.1).
    chunk_size: examples per step of a `lax.map` over the batch (the rest in one more call);
      None for the whole batch at once; "auto" (default) is 64 on CPU and None elsewhere. The
      results do not depend on it. On CPU, small chunks keep each layer's input in cache
      between the convolution and the statistics (measured in `benchmarks/whitebox.py`).

  Returns:
    {name: [B] float}, higher = more OOD, in `ALL_INDICATORS` order.

  Raises:
    ValueError: for an unknown name, or one in `which` the model cannot provide (the message
      says why).

  References:
    Begon & Geurts 2021, Eqs. 7, 8, 11 (`probability_indicators`), 14-17 and Section 2.1
    (`latent_indicators`), 18-30 (`batchnorm_indicators`); Section 2.2 for the sets of layers.
  """
  wanted = ALL_INDICATORS if which is None else tuple(which)
  unknown = [name for name in wanted if name not in ALL_INDICATORS]
  if unknown:
    raise ValueError(f"unknown indicators {unknown}; known: {list(ALL_INDICATORS)} "
                     "(ODIN is `odin_indicator`)")
  need_head = any(name in LATENT_INDICATORS for name in wanted)
  need_bn = any(name not in PROBABILITY_INDICATORS + LATENT_INDICATORS for name in wanted)
  chunk = _resolve_chunk_size(chunk_size)

  def forward(x):
    return forward_with_insides(model, variables, x, which=insides_which)

  # What the model offers, from shapes alone, so errors come before any compute. With
  # which=None this is not strict: what the model lacks comes back empty instead of raising.
  try:
    insides_which = _insides_for(model, variables, x, need_head=need_head, need_bn=need_bn,
                                 strict=which is not None)
    _, shapes = jax.eval_shape(forward, x[:1])
  except ValueError as e:
    latent = [name for name in wanted if name in LATENT_INDICATORS]
    raise ValueError(f"the latent indicators {latent} need a linear head: {e}") from e
  missing = _availability(shapes) if need_bn or need_head else {}
  if which is not None:
    impossible = {name: missing[name] for name in wanted if name in missing}
    if impossible:
      reasons = "; ".join(f"{name} {why}" for name, why in impossible.items())
      raise ValueError(f"{type(model).__name__} cannot give these indicators: {reasons}")

  def scores_of(x):
    logits, insides = forward(x)
    scores = dict(probability_indicators(logits))
    if need_head and insides.features is not None:
      scores.update(latent_indicators(insides.features, insides.head_kernel, logits))
    if need_bn:
      if insides.bn_sums:
        # 𝒮 = B, every layer, the input pseudo-layer included (Section 2.2).
        scores.update(batchnorm_indicators((insides.input_sums,) + insides.bn_sums,
                                           alpha=alpha))
      scores.update(batchnorm_indicators((insides.input_sums,), alpha=alpha, prefix="IN-"))
    # Unused entries cost nothing under jit: XLA drops what is not returned.
    return {name: scores[name] for name in wanted if name in scores and name not in missing}

  return _in_chunks(scores_of, x, chunk)
