"""The pure functions of the core, each run with and without `jax.jit` (`chex.variants`) against
float64 numpy references: a function that only works eagerly, or only under jit, fails here."""
import chex
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score

from oodjax import metrics
from oodjax.detectors import odin, softmax
from oodjax.detectors.sample_free import onecsum, supervised, whitebox
from test_detectors_softmax import (STD, inputs, mlp_apply, mlp_params, np_forward, np_odin,
                                    np_softmax, to_jax)


class DetectorVariantsTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.p = mlp_params()
    self.x = inputs(n=9)
    self.logits = np_forward(self.p, self.x.astype(np.float64))[0]  # [B, K] float64

  @chex.variants(with_jit=True, without_jit=True)
  def test_msp_max_logit_energy(self):
    variables = to_jax(self.p)
    msp = self.variant(lambda v, x: softmax.msp(mlp_apply, v, x))
    max_logit = self.variant(lambda v, x: softmax.max_logit(mlp_apply, v, x))
    energy = self.variant(lambda v, x, t: softmax.energy(mlp_apply, v, x, temperature=t))
    np.testing.assert_allclose(msp(variables, self.x), 1 - np_softmax(self.logits).max(-1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(max_logit(variables, self.x), -self.logits.max(-1), rtol=1e-5)
    z = self.logits / 3.0
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(energy(variables, self.x, jnp.float32(3.0)), -3.0 * lse,
                               rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_odin_score(self):
    score = self.variant(lambda v, x, t, e: odin.odin_score(mlp_apply, v, x, temperature=t,
                                                            epsilon=e, std=STD))
    got = score(to_jax(self.p), self.x, jnp.float32(10.0), jnp.float32(0.02))
    np.testing.assert_allclose(got, np_odin(self.p, self.x.astype(np.float64), 10.0, 0.02),
                               rtol=2e-5, atol=2e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_probability_indicators(self):
    fn = self.variant(whitebox.probability_indicators)
    out = fn(jnp.asarray(self.logits, jnp.float32))
    p = np_softmax(self.logits)
    np.testing.assert_allclose(out["MP"], 1 - p.max(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["H"], -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_c_sum_and_supervised_score(self):
    scores = {"A": jnp.asarray([1.0, 3.0]), "B": jnp.asarray([10.0, 0.0])}
    stats = {"indicators": {"A": {"mean": jnp.float32(1.0), "std": jnp.float32(2.0)},
                            "B": {"mean": jnp.float32(4.0), "std": jnp.float32(3.0)}}}
    # (1-1)/2 + (10-4)/3 = 2;  (3-1)/2 + (0-4)/3 = -1/3.
    chex.assert_trees_all_close(self.variant(onecsum.one_c_sum)(scores, stats),
                                jnp.asarray([2.0, -1 / 3]), rtol=1e-6)
    weights = {"mean": {"A": jnp.float32(1.0), "B": jnp.float32(0.0)},
               "scale": {"A": jnp.float32(2.0), "B": jnp.float32(5.0)},
               "coef": {"A": jnp.float32(0.5), "B": jnp.float32(-1.0)},
               "intercept": jnp.float32(0.25)}
    # 0.5 (1-1)/2 - 10/5 + 0.25 = -1.75;  0.5 (3-1)/2 - 0 + 0.25 = 0.75.
    chex.assert_trees_all_close(self.variant(supervised.supervised_score)(scores, weights),
                                jnp.asarray([-1.75, 0.75]), rtol=1e-6)


class MetricVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_auroc_and_fpr95(self):
    rng = np.random.default_rng(0)
    s_in = rng.normal(size=40).astype(np.float32)
    s_out = (rng.normal(size=30) + 1.0).astype(np.float32)
    auroc = self.variant(metrics.auroc)(s_in, s_out)
    want = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[s_in, s_out])
    np.testing.assert_allclose(auroc, want, atol=1e-6)
    # FPR at 95% TPR by brute force: the smallest threshold accepting >= 95% of ID.
    t = np.sort(s_in)[int(np.ceil(0.95 * 40)) - 1]
    fpr = self.variant(metrics.fpr_at_tpr)(s_in, s_out)
    np.testing.assert_allclose(fpr, np.mean(s_out <= t), atol=1e-7)
