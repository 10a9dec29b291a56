"""White-box indicators against a float64 numpy forward pass written out by hand."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from oodjax.detectors.sample_free import whitebox
from oodjax.models import channel_sums, get_model

K = 4

# Eager op-by-op dispatch is far slower than one compiled call on CPU.
indicators = jax.jit(whitebox.indicators, static_argnums=0, static_argnames=("which", "alpha"))


class TinyBN(nn.Module):
  """conv 3x3 VALID -> BN -> ReLU -> flatten -> Dense -> BN ([B, C], spatial size 1) -> ReLU
  -> Dense head: a 2-D BatchNorm that DSS must skip and a 1-D one it must not."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(3, (3, 3), padding="VALID", use_bias=False)(x)  # [B, 3, 3, 3]
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
    h = h.reshape(h.shape[0], -1)  # [B, 27]
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(h)))  # [B, 6]
    return nn.Dense(K)(h)


def _tiny_variables(seed=0):
  model = TinyBN()
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 5, 5, 2)))
  rng = np.random.default_rng(seed)

  def randomise(tree, low, high):
    return jax.tree.map(lambda a: jnp.asarray(rng.uniform(low, high, a.shape), a.dtype), tree)

  # Running statistics and affine parameters away from 0/1, so a formula that forgot them fails.
  stats_ = variables["batch_stats"]
  batch_stats = {name: {"mean": randomise(s["mean"], -0.5, 0.5),
                        "var": randomise(s["var"], 0.3, 2.0)} for name, s in stats_.items()}
  params = dict(variables["params"])
  # The second BN's bias leans positive so that most features u survive the ReLU.
  for name, (low, high) in (("BatchNorm_0", (-0.3, 0.3)), ("BatchNorm_1", (0.0, 0.8))):
    params[name] = {"scale": randomise(params[name]["scale"], 0.5, 1.5),
                    "bias": randomise(params[name]["bias"], low, high)}
  params["Dense_1"] = {"kernel": randomise(params["Dense_1"]["kernel"], -1.0, 1.0),
                       "bias": randomise(params["Dense_1"]["bias"], -0.5, 0.5)}
  return model, {"params": params, "batch_stats": batch_stats}


def _inputs(seed=1, batch=6):
  rng = np.random.default_rng(seed)
  # Per-example scales and shifts, so DSS-EXT sees both ordinary and extreme channels.
  scale = rng.uniform(0.3, 2.5, (batch, 1, 1, 1))
  shift = rng.uniform(-1.0, 1.0, (batch, 1, 1, 1))
  return (rng.normal(size=(batch, 5, 5, 2)) * scale + shift).astype(np.float32)


def _numpy_forward(variables, x):
  """Returns logits, u, [y_conv_bn, y_dense_bn] in float64, computed from the weights."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  x = np.asarray(x, np.float64)
  kernel = p["Conv_0"]["kernel"]  # [3, 3, 2, 3]
  b = x.shape[0]
  conv = np.zeros((b, 3, 3, 3))
  for i in range(3):
    for j in range(3):
      for o in range(3):
        conv[:, i, j, o] = np.sum(x[:, i:i + 3, j:j + 3, :] * kernel[:, :, :, o], axis=(1, 2, 3))
  eps = 1e-5  # nn.BatchNorm's default
  y1 = (conv - s["BatchNorm_0"]["mean"]) / np.sqrt(s["BatchNorm_0"]["var"] + eps)
  h = np.maximum(y1 * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"], 0.0)
  h = h.reshape(b, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  y2 = (h - s["BatchNorm_1"]["mean"]) / np.sqrt(s["BatchNorm_1"]["var"] + eps)
  u = np.maximum(y2 * p["BatchNorm_1"]["scale"] + p["BatchNorm_1"]["bias"], 0.0)
  logits = u @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  return logits, u, [y1, y2]


def _reference(variables, x, alpha=0.1):
  """Every indicator, one example at a time, straight from the paper's equations."""
  logits, u_all, (y1, y2) = _numpy_forward(variables, x)
  w_all = np.asarray(variables["params"]["Dense_1"]["kernel"], np.float64)  # [D, K]
  x = np.asarray(x, np.float64)
  out = {name: [] for name in whitebox.ALL_INDICATORS}

  def cos(a, b):  # the module's convention: a zero vector has cosine 0 with anything
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return 0.0 if norms == 0 else a @ b / norms

  def bn_terms(y):  # y: [H, W, C] or [C] of one example -> per-channel M, AOS, S, ext
    flat = y.reshape(-1, y.shape[-1])
    n = flat.shape[0]
    m = flat.mean(axis=0)  # Eq. 20
    aos = (flat ** 2).mean(axis=0)
    if n == 1:
      return m, aos, None, None
    s = np.sqrt(((flat - m) ** 2).sum(axis=0) / (n - 1))  # Eq. 21
    v = (n - 1) * s ** 2  # Eq. 22
    p = 2 * np.minimum(stats.chi2.cdf(v, n - 1), stats.chi2.sf(v, n - 1))
    return m, aos, s, (p < alpha).astype(float)

  for i in range(x.shape[0]):
    z = logits[i]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    pt = np.exp((z - z.max()) / 1000) / np.exp((z - z.max()) / 1000).sum()
    out["MP"].append(1 - p.max())
    out["H"].append(-np.sum(p * np.log(p)))
    out["T1000"].append(1 - pt.max())
    u, w = u_all[i], w_all[:, np.argmax(z)]
    pos = w > 0
    out["NORM"].append(-np.linalg.norm(u))
    out["NORM+"].append(-np.linalg.norm(u[pos]))
    out["ANG"].append(1 - cos(w, u))
    # ANG+ as the authors' code computes it: 1 - (1 - ANG) ACT+ / ACT.
    out["ANG+"].append(1 - (1 - out["ANG"][-1]) * (w[pos] @ u[pos]) / (w @ u))
    out["ANG++"].append(1 - cos(w[pos], u[pos]))
    out["PROJ"].append(-w @ u / np.linalg.norm(w))
    out["ACT"].append(-w @ u)
    out["ACT+"].append(-w[pos] @ u[pos])
    m1, aos1, s1, ext1 = bn_terms(y1[i])
    m2, aos2, _, _ = bn_terms(y2[i])
    mi, aosi, si, exti = bn_terms(x[i])
    # S = B: the 2-channel input pseudo-layer and both BatchNorms, C_S = 2 + 3 + 6.
    out["DMS"].append((np.sum(mi ** 2) + np.sum(m1 ** 2) + np.sum(m2 ** 2)) / 11)  # Eq. 27
    out["DMS-AOS"].append((np.sum(aosi) + np.sum(aos1) + np.sum(aos2)) / 11)  # Eq. 28
    # The [B, 6] layer has no S (H W - 1 = 0): DSS and DSS-EXT use the input and the conv BN,
    # C_S = 2 + 3.
    out["DSS"].append((np.sum((si - 1) ** 2) + np.sum((s1 - 1) ** 2)) / 5)  # Eq. 29
    out["DSS-EXT"].append((np.sum(exti) + np.sum(ext1)) / 5)  # Eq. 30
    out["IN-DMS"].append(np.sum(mi ** 2) / 2)
    out["IN-DMS-AOS"].append(np.sum(aosi) / 2)
    out["IN-DSS"].append(np.sum((si - 1) ** 2) / 2)
    out["IN-DSS-EXT"].append(np.sum(exti) / 2)
  out = {name: np.array(v) for name, v in out.items()}
  # Most examples are away from the zero-vector convention, so the cosine itself is tested.
  assert np.sum(out["ANG++"] != 1) >= 4
  return out


@pytest.fixture(scope="module")
def tiny():
  model, variables = _tiny_variables()
  x = _inputs()
  return model, variables, x, indicators(model, variables, jnp.asarray(x))


def test_numpy_forward_matches_the_model(tiny):
  model, variables, x, _ = tiny
  logits, _, _ = _numpy_forward(variables, x)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_allclose(apply(variables, x), logits, rtol=1e-4, atol=1e-5)


def test_every_indicator_matches_the_hand_written_reference(tiny):
  _, variables, x, scores = tiny
  ref = _reference(variables, x)
  assert set(scores) == set(whitebox.ALL_INDICATORS)
  for name in whitebox.ALL_INDICATORS:
    np.testing.assert_allclose(scores[name], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)
  # The data exercise both sides of DSS-EXT's test, so a wrong law or tail would show.
  assert 0 < ref["DSS-EXT"].mean() < 1 and 0 < ref["IN-DSS-EXT"].mean() < 1


def test_which_selects_in_its_order(tiny):
  model, variables, x, scores = tiny
  which = ("ANG++", "DSS-EXT", "MP")
  some = indicators(model, variables, jnp.asarray(x), which=which)
  assert tuple(some) == which
  for name in which:
    np.testing.assert_allclose(some[name], scores[name], rtol=1e-5, atol=1e-6)
  latent = indicators(model, variables, jnp.asarray(x), which=("ACT", "NORM"))
  assert tuple(latent) == ("ACT", "NORM")
  with pytest.raises(ValueError, match="unknown"):
    indicators(model, variables, x, which=("ODIN",))


def test_chi2_pvalue_and_extreme_test_match_scipy():
  pvalue = jax.jit(whitebox.chi2_two_sided_pvalue)  # dof traced: one compilation
  for dof in (1, 8, 24, 783):
    v = np.concatenate([np.linspace(1e-3, 3 * dof + 30, 200),
                        stats.chi2.ppf([1e-6, 0.05, 0.5, 0.95, 1 - 1e-6], dof)])
    expected = np.minimum(2 * np.minimum(stats.chi2.cdf(v, dof), stats.chi2.sf(v, dof)), 1)
    got = pvalue(jnp.asarray(v, jnp.float32), jnp.float32(dof))
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-6, err_msg=f"dof={dof}")
    for alpha in (0.1, 0.01):
      # Away from the two quantiles themselves, where float32 may round either way.
      v_far = v[np.abs(expected - alpha) > 1e-4]
      np.testing.assert_array_equal(
          whitebox.chi2_extreme(jnp.asarray(v_far, jnp.float32), dof, alpha),
          np.minimum(2 * np.minimum(stats.chi2.cdf(v_far, dof), stats.chi2.sf(v_far, dof)),
                     1) < alpha, err_msg=f"dof={dof}, alpha={alpha}")


def test_channel_statistics_of_a_hand_worked_map():
  y = jnp.asarray([1.0, 3.0, 2.0, 6.0]).reshape(1, 2, 2, 1)  # one channel, 4 positions
  m, mean_square, v = whitebox.channel_statistics(channel_sums(y))
  # M = 3, mean of squares = (1 + 9 + 4 + 36) / 4, V = 4 + 0 + 1 + 9.
  np.testing.assert_allclose([m[0, 0], mean_square[0, 0], v[0, 0]], [3.0, 12.5, 14.0])


@pytest.mark.parametrize("name", [
    "small_cnn_tiny", pytest.param("resnet_tiny", marks=pytest.mark.slow)])
def test_table1_bounds_on_random_inputs(name):
  model = get_model(name, K)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  key1, key2 = jax.random.split(jax.random.key(3))
  x = jnp.concatenate([jax.random.normal(key1, (8, 8, 8, 1)),
                       20.0 * jax.random.uniform(key2, (8, 8, 8, 1)) - 5.0])
  s = indicators(model, variables, x)
  s = {k: np.asarray(v, np.float64) for k, v in s.items()}
  tol = 1e-5
  assert np.all(np.isfinite(np.stack(list(s.values()))))
  assert np.all((s["MP"] >= -tol) & (s["MP"] <= 1 - 1 / K + tol))
  assert np.all((s["H"] >= -tol) & (s["H"] <= np.log(K) + tol))
  assert np.all((s["T1000"] > 0) & (s["T1000"] <= 1 - 1 / K + tol))
  # Table 1's 0 <= ANG <= 1 needs w_k.u >= 0; in general the cosine distance is in [0, 2].
  assert np.all((s["ANG"] >= -tol) & (s["ANG"] <= 2 + tol))
  for ang in ("ANG+", "ANG++"):  # ReLU features: u >= 0
    assert np.all((s[ang] >= -tol) & (s[ang] <= 1 + tol))
  for bn in ("DMS", "DMS-AOS", "DSS"):
    assert np.all(s[bn] >= 0) and np.all(s["IN-" + bn] >= 0)
  for ext in ("DSS-EXT", "IN-DSS-EXT"):
    assert np.all((s[ext] >= 0) & (s[ext] <= 1))
  # Restricting to the positive subspace can only lower the norm.
  assert np.all(s["NORM+"] >= s["NORM"] - tol)


def test_ang_exceeds_one_when_the_winning_logit_is_negative():
  # Every class scores negatively: the winner's angle is obtuse, ANG > 1 (Table 1 says <= 1).
  kernel = jnp.asarray([[-1.0, -2.0], [0.5, -1.0]])  # [D=2, K=2]
  u = jnp.asarray([[1.0, 0.5]])
  logits = u @ kernel
  s = whitebox.latent_indicators(u, kernel, logits)
  cos = (-1 * 1 + 0.5 * 0.5) / (np.hypot(1, 0.5) * np.hypot(1, 0.5))
  np.testing.assert_allclose(s["ANG"], [1 - cos], rtol=1e-6)
  assert float(s["ANG"][0]) > 1
  # Positive subspace of w_0 = (-1, 0.5) is component 1: u+ = (0, 0.5), cos = 1.
  np.testing.assert_allclose(s["ANG++"], [0.0], atol=1e-6)
  np.testing.assert_allclose(s["ACT+"], [-0.25], rtol=1e-6)
  np.testing.assert_allclose(s["NORM+"], [-0.5], rtol=1e-6)


def test_zero_features_give_angle_one_not_nan():
  kernel = jnp.asarray([[1.0, -1.0], [2.0, 1.0]])
  u = jnp.zeros((1, 2))
  s = whitebox.latent_indicators(u, kernel, u @ kernel)
  for name in ("ANG", "ANG+", "ANG++"):
    np.testing.assert_allclose(s[name], [1.0])
  assert np.all(np.isfinite(np.stack(list(s.values()))))


class NoBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3))(x)).reshape(x.shape[0], -1)
    return nn.Dense(K)(h)


class SoftmaxHead(nn.Module):
  """Output is not a Dense output, so there is no linear head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x))
    return jax.nn.softmax(nn.Dense(K)(h.reshape(x.shape[0], -1)))


class DenseOnlyBN(nn.Module):
  """Its only BatchNorm sees [B, C]: DMS exists, DSS does not."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(K)(nn.relu(h))


def _init(model):
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
  return jax.jit(model.init)(jax.random.key(1), x), x


def test_model_without_batchnorm_gets_the_rest_and_a_clear_error():
  model = NoBN()
  variables, x = _init(model)
  s = indicators(model, variables, x)
  assert not set(whitebox.BATCHNORM_INDICATORS) & set(s)
  assert set(whitebox.LATENT_INDICATORS + whitebox.INPUT_INDICATORS) <= set(s)
  with pytest.raises(ValueError, match="BatchNorm"):
    indicators(model, variables, x, which=("MP", "DMS"))
  reasons = whitebox.available_indicators(model, variables, x.shape)
  assert reasons["MP"] is None and "BatchNorm" in reasons["DSS"]


def test_head_that_is_not_dense_gets_a_clear_error_for_latent_indicators():
  model = SoftmaxHead()
  variables, x = _init(model)
  s = indicators(model, variables, x)
  assert not set(whitebox.LATENT_INDICATORS) & set(s)
  assert "DSS" in s and "MP" in s
  with pytest.raises(ValueError, match="linear head"):
    indicators(model, variables, x, which=("ANG",))


def test_batchnorm_of_spatial_size_one_is_left_out_of_dss_without_nan():
  model = DenseOnlyBN()
  variables, x = _init(model)
  s = indicators(model, variables, x)
  assert "DMS" in s and "DSS" not in s and "DSS-EXT" not in s
  assert np.all(np.isfinite(np.stack(list(s.values()))))
  with pytest.raises(ValueError, match="spatial size"):
    indicators(model, variables, x, which=("DSS",))


def test_odin_indicator_forwards_the_papers_settings(monkeypatch):
  calls = {}

  def fake_odin(apply_fn, variables, x, *, temperature, epsilon, std):
    calls.update(temperature=temperature, epsilon=epsilon, std=std)
    return jnp.zeros(x.shape[0])

  monkeypatch.setattr(whitebox, "odin_score", fake_odin)
  out = whitebox.odin_indicator(lambda v, x: x, {}, jnp.zeros((2, 3)), std=0.3)
  assert out.shape == (2,)
  assert calls == {"temperature": 1000.0, "epsilon": 8e-4, "std": 0.3}


def test_odin_indicator_without_perturbation_is_t1000(tiny):
  model, variables, x, scores = tiny
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  odin0 = jax.jit(lambda v, x: whitebox.odin_indicator(apply_fn, v, x, std=jnp.ones(2),
                                                       epsilon=0.0))(variables, x)
  np.testing.assert_allclose(odin0, scores["T1000"], rtol=1e-6, atol=1e-7)


class HandWorked(nn.Module):
  """A 3-channel 2x1 input -> BN -> ReLU -> per-pixel Dense(2) -> BN -> ReLU -> mean pool ->
  Dense head: two BatchNorms with spatial size 2, small enough to work out by hand."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=0.0)(x))
    h = nn.Dense(2, use_bias=False)(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=0.0)(h))
    return nn.Dense(2, use_bias=False)(jnp.mean(h, axis=(1, 2)))


def test_hand_worked_network_pins_the_whole_network_set_and_ang_plus():
  """DMS, DMS-AOS, DSS, DSS-EXT sum over the input pseudo-layer and both BatchNorms
  (Section 2.2, S = B); ANG+ is the authors' code's 1 - w_k+ . u / (|w_k| |u|)."""
  model = HandWorked()
  x = np.asarray([[1.0, 0.0, 2.0], [3.0, 2.0, -2.0]], np.float32).reshape(1, 2, 1, 3)
  variables = model.init(jax.random.key(0), x)
  one = lambda c: {"scale": jnp.ones(c), "bias": jnp.zeros(c)}
  params = {"BatchNorm_0": one(3), "BatchNorm_1": one(2),
            "Dense_0": {"kernel": jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])},
            "Dense_1": {"kernel": jnp.asarray([[2.0, 0.0], [-1.0, 1.0]])}}
  batch_stats = {"BatchNorm_0": {"mean": jnp.asarray([1.0, 1.0, 0.0]),
                                 "var": jnp.asarray([1.0, 4.0, 4.0])},
                 "BatchNorm_1": {"mean": jnp.asarray([1.0, 0.0]), "var": jnp.asarray([1.0, 1.0])}}
  variables = {"params": params, "batch_stats": batch_stats}
  s = {k: float(v[0]) for k, v in indicators(model, variables, jnp.asarray(x)).items()}
  # Pixels (rows) x channels of each layer's standardised input:
  #   input  [[1, 0, 2], [3, 2, -2]]        M = (2, 1, 0)   V = (2, 2, 8)
  #   BN 1   [[0, -1/2, 1], [2, 1/2, -1]]   M = (1, 0, 0)   V = (2, 1/2, 2)
  #   BN 2   ReLU(BN 1) @ Dense_0 = [[0, 0], [2, 1/2]], standardised [[-1, 0], [1, 1/2]]:
  #                                         M = (0, 1/4)    V = (2, 1/8)
  # With H W - 1 = 1, S = sqrt(V). C_S = 3 + 3 + 2 = 8 over the whole network.
  r2 = np.sqrt(2.0)
  assert s["IN-DMS"] == pytest.approx((4 + 1 + 0) / 3)
  assert s["IN-DMS-AOS"] == pytest.approx((5 + 2 + 4) / 3)
  assert s["IN-DSS"] == pytest.approx((15 - 8 * r2) / 3, rel=1e-5)
  assert s["IN-DSS-EXT"] == pytest.approx(1 / 3)  # only V = 8 lies beyond chi2_1's 95% point
  assert s["DMS"] == pytest.approx((5 + 1 + 1 / 16) / 8)
  assert s["DMS-AOS"] == pytest.approx((11 + 13 / 4 + 9 / 8) / 8)
  # sum (S - 1)^2: input 15 - 8 sqrt2, BN 1 15/2 - 5 sqrt2, BN 2 33/8 - 5/2 sqrt2.
  assert s["DSS"] == pytest.approx((15 + 15 / 2 + 33 / 8 - (8 + 5 + 5 / 2) * r2) / 8, rel=1e-5)
  assert s["DSS-EXT"] == pytest.approx(1 / 8)
  # Head: u = mean over pixels of ReLU(BN 2) = (1/2, 1/4); logits (3/4, 1/4), so k = 0 and
  # w_k = (2, -1): |w_k| |u| = sqrt5 * sqrt5 / 4 = 5/4, w_k . u = 3/4, w_k+ . u = 1.
  assert s["ANG"] == pytest.approx(1 - (3 / 4) / (5 / 4))
  assert s["ANG+"] == pytest.approx(1 - 1 / (5 / 4))  # 0.2; 1 - cos(u, w_k+) would be 0.106
  assert s["ANG++"] == pytest.approx(0.0, abs=1e-6)  # u+ = (1/2, 0) is parallel to w_k+
  assert s["ACT+"] == pytest.approx(-1.0)
