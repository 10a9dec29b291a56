"""ENVISE efficiency accounting: compiled FLOPs, XNOR-Net binary counts, RFL (Eq. 7), GiE (Eq. 8).

References are numbers worked out by hand (in the comments) and plain Python/numpy loops over
kernel taps, never the module's own helpers. XLA's conventions checked here: 2 FLOPs per
multiply-accumulate (MAC), and a convolution's MACs counted over the in-bounds kernel taps only.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax.envise import efficiency as eff
from oodjax.models import get_model

CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def conv(x, kernel, strides=(1, 1), padding="VALID"):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=CONV_DIMS)


def in_bounds_taps(n: int, k: int = 3) -> int:
  """Sum over the n outputs of a stride-1 SAME window of k taps of the taps inside [0, n)."""
  pad = (k - 1) // 2
  return sum(1 for i in range(n) for t in range(k) if 0 <= i + t - pad < n)


# ---------------------------------------------------------------------------------------------
# compiled_flops


def test_compiled_flops_matmul():
  a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert eff.compiled_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7  # 210
  # Abstract arguments: nothing allocated, same count; a batched contraction.
  a3 = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)
  assert eff.compiled_flops(lambda u, v: jnp.einsum("bij,jk->bik", u, v), a3, b) == 420


def test_compiled_flops_conv_valid_and_strided():
  x, k = jnp.ones((1, 5, 6, 3)), jnp.ones((3, 3, 3, 4))
  # VALID: out 3 x 4 x 4; each output a 3*3*3 = 27-term dot -> 3*4*4*27 = 1296 MACs.
  assert eff.compiled_flops(conv, x, k) == 2 * 1296
  # Stride 2, VALID, 7x7x2 -> 3x3x5 with 3*3*2 = 18-term dots: 9*5*18 = 810 MACs.
  strided = lambda x, k: conv(x, k, (2, 2))
  assert eff.compiled_flops(strided, jnp.ones((1, 7, 7, 2)), jnp.ones((3, 3, 2, 5))) == 1620


def test_compiled_flops_conv_same_counts_in_bounds_taps():
  x, k = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 5))
  # 4x4 SAME: per axis 3+3+3+3 taps minus the 2 on the padding = 10, so 10*10 spatial pairs
  # (not 16*9 = 144) times C_in * C_out = 15: 1500 MACs.
  assert in_bounds_taps(4) ** 2 == 100
  assert eff.compiled_flops(lambda x, k: conv(x, k, padding="SAME"), x, k) == 2 * 1500


# ---------------------------------------------------------------------------------------------
# model_flops with a stand-in binary layer (defined here, independent of oodjax.envise.binary)


class BinaryStandIn(nn.Module):
  """Zero-pad (SAME for 3x3, stride 1), sign the input, VALID conv with alpha * sign(kernel)."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(), (3, 3, x.shape[-1], self.features))
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = jnp.where(x >= 0, 1.0, -1.0)
    alpha = jnp.mean(jnp.abs(kernel), axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, features]
    return conv(x, alpha * jnp.where(kernel >= 0, 1.0, -1.0))


class BinaryTinyNet(nn.Module):
  """A container whose name starts with "Binary" but owns no kernel: looked through."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)  # [1, 4, 4, 4]
    x = BinaryStandIn(8)(x)  # [1, 4, 4, 8]
    x = x.reshape(x.shape[0], -1)  # [1, 128]
    return nn.Dense(3, use_bias=False)(x)


# Hand count for a 6x6x1 image:
#   float conv 3x3x1 -> 4, VALID: 4*4*4 outputs * 9 = 576 MACs
#   binary 3x3x4 -> 8 on the padded 6x6 map: 4*4*8 outputs * 36 = 4608 binary MACs -> 72 ops
#   dense 128 -> 3: 384 MACs
FLOAT_MACS, BINARY_MACS, BINARY_OPS = 576 + 384, 4608, 4608 / 64


@pytest.fixture(scope="module")
def tiny():
  model = BinaryTinyNet()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))


def test_model_flops_tiny_binary_network(tiny):
  model, variables = tiny
  f = eff.model_flops(model, variables, (6, 6, 1))
  assert f["binary_macs"] == BINARY_MACS
  assert f["binary"] == BINARY_OPS == 72
  assert f["float"] == FLOAT_MACS  # no elementwise op outside the binary layer
  assert f["total"] == FLOAT_MACS + 72
  assert f["float_layer_macs"] == FLOAT_MACS
  assert f["layer_total"] == FLOAT_MACS + 72
  assert f["compiled"] > 2 * FLOAT_MACS  # the binary layer ran in float in the program

  f2 = eff.model_flops(model, variables, (1, 6, 6, 1), flops_per_mac=2)
  assert (f2["float"], f2["binary"], f2["total"]) == (2 * FLOAT_MACS, 144, 2 * FLOAT_MACS + 144)
  assert f2["compiled"] == f["compiled"]


def test_model_flops_abstract_variables_and_predicate(tiny):
  model, variables = tiny
  abstract = jax.eval_shape(lambda: variables)
  assert eff.model_flops(model, abstract, (6, 6, 1)) == eff.model_flops(model, variables,
                                                                         (6, 6, 1))
  # Nothing binary: the stand-in is neither binary nor an nn.Conv, so it is in "float" only.
  f = eff.model_flops(model, variables, (6, 6, 1), binary_predicate=lambda m: False)
  assert f["binary_macs"] == 0 and f["binary"] == 0
  assert f["float"] == f["compiled"] / 2 and f["float_layer_macs"] == FLOAT_MACS


def test_model_flops_whole_model_binary():
  layer = BinaryStandIn(8)
  variables = layer.init(jax.random.key(1), jnp.zeros((1, 4, 4, 4)))
  f = eff.model_flops(layer, variables, (4, 4, 4), apply_kwargs={})
  assert f["float"] == 0 and f["float_layer_macs"] == 0
  assert f["binary_macs"] == 4 * 4 * 8 * 36 and f["total"] == 72


@pytest.mark.parametrize("shape", [(6, 6), (2, 6, 6, 1), (0, 6, 1)])
def test_model_flops_bad_shape(tiny, shape):
  model, variables = tiny
  with pytest.raises(ValueError, match="input_shape"):
    eff.model_flops(model, variables, shape)


def test_model_flops_bad_convention(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match="flops_per_mac"):
    eff.model_flops(model, variables, (6, 6, 1), flops_per_mac=3)


def test_zoo_vgg16_matches_paper_rvsn_figure():
  """The zoo's CIFAR VGG-16 at 32x32x3, K = 100, next to the paper's RvSN "310 MFLOPs"."""
  model = get_model("vgg16", num_classes=100)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  f = eff.model_flops(model, variables, (32, 32, 3))
  widths = [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]
  full, in_bounds, c_in, n = 0, 0, 3, 32
  for stage in widths:
    for c_out in stage:
      full += n * n * 9 * c_in * c_out
      in_bounds += in_bounds_taps(n) ** 2 * c_in * c_out
      c_in = c_out
    n //= 2
  head = 512 * 100
  assert f["binary_macs"] == 0
  assert f["float_layer_macs"] == full + head == 313_247_744
  # Compiled: in-bounds taps (247.3 M) plus BatchNorm/ReLU/pool work (under 1%).
  assert in_bounds + head <= f["float"] <= 1.01 * (in_bounds + head)
  # FLOPs = MACs with full kernels is the paper's convention: 313.2 M vs 310 (1%); 2 x MACs
  # would be 626 M.
  paper = {p.role: p.mflops for p in eff.PAPER_FIGURES}["RvSN"]
  assert abs(f["layer_total"] / 1e6 - paper) / paper < 0.02


# ---------------------------------------------------------------------------------------------
# RFL (Eq. 7) and GiE (Eq. 8)

# X = 100, Y = 10, p = 0.8 (q = 0.2), N_tr = 1, N_in = 3 (N_T = 4); FL_tr = 110.
# RFL_min = (10 + 0.2 * 100) / 100 = 0.3.
BASE = {"teacher_flops": 100.0, "student_flops": 10.0, "p_inlier": 0.8, "adaptive_length": 1.0,
            "inference_length": 3.0}
HAND = [
    # (f_p, o_d, RFL, GiE)
    # FL_in = 10 + 10 = 20, FL_o = 10 + 50 = 60; 0.8*20 + 0.2*60 = 28;
    # RFL = 1/4 * 1.1 + 3/4 * 0.28 = 0.485; GiE = 0.3 / 0.485.
    (0.1, 0.5, 0.485, 0.3 / 0.485),
    # No routing: FL_in = FL_o = 10; RFL = 0.275 + 0.75 * 0.1 = 0.35; GiE = 0.3 / 0.35 = 6/7.
    (0.0, 0.0, 0.35, 6 / 7),
    # Everything routed: FL_in = FL_o = 110; RFL = 1.1; GiE = 0.3 / 1.1 = 3/11.
    (1.0, 1.0, 1.1, 3 / 11),
    # Perfect gate: 0.8*10 + 0.2*110 = 30; RFL = 0.275 + 0.225 = 0.5; GiE = 0.6.
    (0.0, 1.0, 0.5, 0.6),
]
TOL = {"rtol": 1e-6, "atol": 1e-7}


@pytest.mark.parametrize("f_p, o_d, rfl, gie", HAND)
def test_rfl_and_gie_hand_worked(f_p, o_d, rfl, gie):
  args = dict(BASE, inlier_routed=f_p, outlier_routed=o_d)
  np.testing.assert_allclose(eff.relative_flops(**args), rfl, **TOL)
  np.testing.assert_allclose(eff.gain_in_efficiency(**args), gie, **TOL)


def test_rfl_phase_edge_cases():
  # No adaptive phase and a perfect gate: RFL = RFL_min = 0.3, GiE = 1.
  args = dict(BASE, inlier_routed=0.0, outlier_routed=1.0, adaptive_length=0.0)
  np.testing.assert_allclose(eff.relative_flops(**args), 0.3, **TOL)
  np.testing.assert_allclose(eff.gain_in_efficiency(**args), 1.0, **TOL)
  # Only the adaptive phase: both networks on every image, RFL = (X + Y) / X = 1.1.
  args = dict(BASE, inlier_routed=0.3, outlier_routed=0.7, inference_length=0.0)
  np.testing.assert_allclose(eff.relative_flops(**args), 1.1, **TOL)
  # A stream without outliers (p = 1), no adaptation, no routing: RFL = Y / X = RFL_min.
  args = dict(BASE, p_inlier=1.0, inlier_routed=0.0, outlier_routed=0.4, adaptive_length=0.0)
  np.testing.assert_allclose(eff.relative_flops(**args), 0.1, **TOL)
  np.testing.assert_allclose(eff.gain_in_efficiency(**args), 1.0, **TOL)
  # A gate that under-routes outliers (o_d < 1) is cheaper than the "minimum": GiE > 1.
  args = dict(BASE, inlier_routed=0.0, outlier_routed=0.0, adaptive_length=0.0)
  np.testing.assert_allclose(eff.gain_in_efficiency(**args), 3.0, **TOL)  # 0.3 / 0.1


def test_phase_flops_hand_worked():
  fl_tr, fl_in, fl_o = eff.phase_flops(100.0, 10.0, 0.1, 0.5)
  np.testing.assert_allclose([fl_tr, fl_in, fl_o], [110.0, 20.0, 60.0], **TOL)


def test_paper_worked_example():
  """Appendix A.3: Eq. 8 gives 0.2301 where the paper prints "GiE = 0.79" (and a "36.2%" gain).

  By hand, in MFLOPs: FL_tr = 9054, FL_in = 6 + 0.26 * 9048 = 2358.48,
  FL_o = 6 + 0.15 * 9048 = 1363.2, p FL_in + q FL_o = 2122.632 + 136.32 = 2258.952;
  N_tr / N_T = 0.25, N_in / N_T = 0.75: RFL = (2263.5 + 1694.214) / 9048 = 0.437413;
  RFL_min = (6 + 904.8) / 9048 = 0.100663; GiE = 910.8 / 3957.714 = 0.230133.
  Reading 0.15 as a detection error (o_d = 0.85) gives GiE = 910.8 / 4432.734 = 0.205470,
  not 0.79 either.
  """
  ex = dict(eff.PAPER_WORKED_EXAMPLE)
  paper_gie = ex.pop("paper_gie")
  ex.pop("paper_gain")
  np.testing.assert_allclose(eff.relative_flops(**ex), 3957.714 / 9048, rtol=1e-6)
  np.testing.assert_allclose(eff.min_relative_flops(9048e6, 6e6, 0.9), 910.8 / 9048, rtol=1e-6)
  np.testing.assert_allclose(eff.gain_in_efficiency(**ex), 910.8 / 3957.714, rtol=1e-6)
  np.testing.assert_allclose(eff.gain_in_efficiency(**dict(ex, outlier_routed=0.85)),
                             910.8 / 4432.734, rtol=1e-6)
  assert abs(float(eff.gain_in_efficiency(**ex)) - paper_gie) > 0.5  # the discrepancy


def gie_reference(x, y, p, f_p, o_d, n_tr, n_in):
  """Eqs. 7-8 for scalars in float64, written out term by term."""
  q = 1.0 - p
  n_t = n_tr + n_in
  inference = p * (y + f_p * x) + q * (y + o_d * x)
  rfl = n_tr / n_t * (x + y) / x + n_in / n_t * inference / x
  return rfl, ((y + q * x) / x) / rfl


def test_broadcasting_against_float64_loop():
  f_p = np.linspace(0.0, 1.0, 3)[:, None]  # [3, 1]
  o_d = np.linspace(0.0, 1.0, 4)[None, :]  # [1, 4]
  args = {"teacher_flops": 9048e6, "student_flops": 6e6, "p_inlier": 0.7, "adaptive_length": 10.0,
              "inference_length": 30.0}
  rfl = eff.relative_flops(**args, inlier_routed=f_p, outlier_routed=o_d)
  gie = eff.gain_in_efficiency(**args, inlier_routed=f_p, outlier_routed=o_d)
  assert rfl.shape == gie.shape == (3, 4)
  for i in range(3):
    for j in range(4):
      want = gie_reference(9048e6, 6e6, 0.7, f_p[i, 0], o_d[0, j], 10.0, 30.0)
      np.testing.assert_allclose([rfl[i, j], gie[i, j]], want, rtol=1e-6)


def test_vmapped_sweep_compiles_once():
  traces = []

  @jax.jit
  def sweep(p, f_p, o_d):
    traces.append(None)
    one = lambda p, f, o: eff.gain_in_efficiency(9048e6, 310e6, p, f, o, 10.0, 30.0)
    return jax.vmap(one)(p, f_p, o_d)

  rng = np.random.default_rng(0)
  for _ in range(2):
    p, f_p, o_d = (jnp.asarray(rng.uniform(size=5), jnp.float32) for _ in range(3))
    got = sweep(p, f_p, o_d)
    want = [gie_reference(9048e6, 310e6, *map(float, v), 10.0, 30.0)[1]
            for v in zip(p, f_p, o_d)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
  assert len(traces) == 1


@pytest.mark.parametrize("bad, match", [
    ({"p_inlier": 1.5}, "p_inlier"),
    ({"inlier_routed": -0.1}, "inlier_routed"),
    ({"outlier_routed": np.array([0.5, 1.2])}, "outlier_routed"),
    ({"teacher_flops": 0.0}, "teacher_flops"),
    ({"student_flops": -1.0}, "student_flops"),
    ({"adaptive_length": 0.0, "inference_length": 0.0}, "N_T"),
    ({"inference_length": math.nan}, "inference_length"),
])
def test_bad_inputs(bad, match):
  args = dict(BASE, inlier_routed=0.1, outlier_routed=0.5) | bad
  with pytest.raises(ValueError, match=match):
    eff.relative_flops(**args)
  with pytest.raises(ValueError, match=match):
    eff.gain_in_efficiency(**args)


# ---------------------------------------------------------------------------------------------
# The paper's figures


def test_paper_figures_and_table():
  figures = {p.role: (p.architecture, p.mflops) for p in eff.PAPER_FIGURES}
  assert figures["TN"] == ("DenseNet-201", 9048.0)
  assert figures["RvSN"] == ("VGG-16", 310.0)
  assert figures["BSN"][1] == 6.0
  table = eff.flops_table({"RvSN": 313.248e6})
  assert "9048.0" in table and "313.2" in table and "p. 8" in table
  with pytest.raises(ValueError, match="unknown roles"):
    eff.flops_table({"student": 1.0})
