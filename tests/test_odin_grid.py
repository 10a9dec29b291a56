"""ODIN's (T, ε) grid against per-config `odin_score`, compile-once, chunking, map/vmap variants.

The grid shares one forward pass among all temperatures and skips the forwards of ε = 0; the
tests below check both against `odin_perturbation` / float64 numpy written independently."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodjax import detectors, metrics
from oodjax.detectors import softmax
from oodjax.detectors.odin import grid as grid_module
from oodjax.detectors.odin import odin_grid, odin_perturbation
from test_detectors_softmax import (STD, conv_net, inputs, mlp_apply, mlp_params, np_forward,
                                    np_odin, np_softmax, to_jax)

TEMPERATURES = (1.0, 7.0, 1000.0)
EPSILONS = (0.0, 0.004, 0.05)


def test_grid_matches_reference_per_config():
  p, x = mlp_params(), inputs(n=7)
  # chunk_size 3 pads the last chunk (7 = 3 + 3 + 1); forward_batch 2 leaves a lax.map remainder.
  grid = odin_grid(mlp_apply, to_jax(p), x, TEMPERATURES, EPSILONS, std=STD, chunk_size=3,
                   forward_batch=2)
  assert grid.shape == (3, 3, 7) and grid.dtype == np.float32
  for t, temperature in enumerate(TEMPERATURES):
    for e, epsilon in enumerate(EPSILONS):
      want = np_odin(p, x.astype(np.float64), temperature, epsilon)
      np.testing.assert_allclose(grid[t, e], want, rtol=2e-5, atol=2e-7, err_msg=f"{t}, {e}")


@pytest.mark.parametrize("forward_batch", [1, 2, None])
def test_grid_matches_reference_with_zero_epsilons_anywhere(forward_batch):
  # forward_batch 1 is a plain lax.map where ε = 0 takes the shared forward pass's logits (a
  # real cond); 2 and None vmap the forwards, where the cond runs both branches. A zero in the
  # middle and a repeated zero must come out as the reference's ε = 0 column, wherever they sit.
  p, x = mlp_params(), inputs(n=7)
  epsilons = (0.004, 0.0, 0.05, 0.0)
  grid = odin_grid(mlp_apply, to_jax(p), x, TEMPERATURES, epsilons, std=STD, chunk_size=3,
                   forward_batch=forward_batch)
  for t, temperature in enumerate(TEMPERATURES):
    for e, epsilon in enumerate(epsilons):
      want = np_odin(p, x.astype(np.float64), temperature, epsilon)
      np.testing.assert_allclose(grid[t, e], want, rtol=2e-5, atol=2e-7, err_msg=f"{t}, {e}")
    # ε = 0 is temperature-scaled MSP of the unperturbed inputs, written out in float64.
    logits, _ = np_forward(p, x.astype(np.float64))
    msp = 1.0 - np_softmax(logits / temperature).max(-1)
    np.testing.assert_allclose(grid[t, 1], msp, rtol=2e-5, atol=2e-7)
    np.testing.assert_array_equal(grid[t, 1], grid[t, 3])


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_shared_forward_directions_equal_odin_perturbation(net):
  # The grid's directions come from one forward pass and T pullbacks; odin_perturbation
  # differentiates the whole loss at each T. The signs must agree exactly (the MLP's dead pixel
  # has a zero gradient, which both must send to +1 / std).
  if net == "mlp":
    apply_fn, variables, x = mlp_apply, to_jax(mlp_params()), jnp.asarray(inputs(n=6))
  else:
    apply_fn, variables = conv_net(num_classes=4, channels=2)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 2)), jnp.float32)
  temperatures = jnp.asarray(TEMPERATURES, jnp.float32)
  std = jnp.asarray(STD, jnp.float32)
  directions, logits = jax.jit(
      lambda v, xb: grid_module._odin_directions(apply_fn, v, xb, temperatures, std, 1)
  )(variables, x)
  assert directions.shape == (len(TEMPERATURES), *x.shape)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(apply_fn(variables, x)), rtol=1e-6,
                             atol=1e-6)
  perturb = jax.jit(lambda t: odin_perturbation(apply_fn, variables, x, temperature=t, std=STD))
  for t, temperature in enumerate(TEMPERATURES):
    np.testing.assert_array_equal(np.asarray(directions[t]),
                                  np.asarray(perturb(jnp.float32(temperature))), err_msg=str(t))


def test_one_config_per_step_keeps_the_epsilon_zero_branch():
  # lax.map(batch_size=1) vmaps its body, which turns lax.cond into a select that runs the
  # skipped forward anyway; forward_batch=1 must compile to a real conditional.
  args = (to_jax(mlp_params()), jnp.asarray(inputs(n=3)), jnp.asarray(TEMPERATURES),
          jnp.asarray(EPSILONS), jnp.asarray(STD))
  plain = jax.make_jaxpr(lambda *a: grid_module._odin_grid_chunk(mlp_apply, *a, 1))(*args)
  assert "cond[" in str(plain)


def test_grid_equals_odin_per_config_on_a_conv_net():
  apply_fn, variables = conv_net(num_classes=4, channels=2)
  x = np.random.default_rng(3).normal(size=(5, 8, 8, 2)).astype(np.float32)
  temperatures, epsilons = (1.0, 1000.0), (0.0, 0.01, 0.1)
  grid = odin_grid(apply_fn, variables, x, temperatures, epsilons, std=STD, chunk_size=3,
                   forward_batch=4)
  # One compiled `odin` with traced (T, ε): eager conv backward passes are slow on CPU.
  odin = jax.jit(lambda t, e: detectors.odin_score(apply_fn, variables, jnp.asarray(x),
                                                   temperature=t, epsilon=e, std=STD))
  for t, temperature in enumerate(temperatures):
    for e, epsilon in enumerate(epsilons):
      want = odin(jnp.float32(temperature), jnp.float32(epsilon))
      np.testing.assert_allclose(grid[t, e], np.asarray(want), rtol=1e-5, atol=1e-7)


def test_grid_traces_once_for_new_values_and_reuses_it_across_chunks():
  traces = []

  def counting_apply(variables, x):
    traces.append(x.shape)  # runs only while JAX traces, never when a compiled program runs
    return mlp_apply(variables, x)

  p, x = mlp_params(), inputs(n=7)
  v = to_jax(p)
  first = odin_grid(counting_apply, v, x, TEMPERATURES, EPSILONS, std=STD, chunk_size=3,
                    forward_batch=3)
  traced = len(traces)
  assert traced > 0
  # New temperature and epsilon VALUES, same shapes: no new trace, and the new values are used.
  second = odin_grid(counting_apply, v, x, (2.0, 3.0, 500.0), (0.001, 0.002, 0.2),
                     std=STD, chunk_size=3, forward_batch=3)
  assert len(traces) == traced
  np.testing.assert_allclose(second[2, 2], np_odin(p, x.astype(np.float64), 500.0, 0.2),
                             rtol=2e-5, atol=2e-7)
  assert not np.allclose(first, second)
  # A new grid SHAPE must retrace: shows the counter can see a trace.
  odin_grid(counting_apply, v, x, (2.0, 3.0), EPSILONS, std=STD, chunk_size=3,
            forward_batch=3)
  assert len(traces) > traced


def test_chunking_and_batching_variants_agree():
  p, x = mlp_params(), inputs(n=7)
  v = to_jax(p)
  one_chunk = odin_grid(mlp_apply, v, x, TEMPERATURES, EPSILONS, std=STD, chunk_size=100,
                        forward_batch=None)
  for chunk_size, forward_batch in [(2, None), (3, 4), (100, "auto")]:
    got = odin_grid(mlp_apply, v, x, TEMPERATURES, EPSILONS, std=STD,
                    chunk_size=chunk_size, forward_batch=forward_batch)
    # Different batch shapes round differently in the matmuls: agreement to float32 noise.
    np.testing.assert_allclose(got, one_chunk, rtol=1e-5, atol=1e-6,
                               err_msg=f"{chunk_size}, {forward_batch}")


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperatures=(), epsilons=EPSILONS), "empty"),
    (dict(temperatures=TEMPERATURES, epsilons=()), "empty"),
    (dict(temperatures=(1.0, 0.0), epsilons=EPSILONS), "> 0"),
    (dict(temperatures=TEMPERATURES, epsilons=(0.0, -0.001)), ">= 0"),
    (dict(temperatures=[[1.0]], epsilons=EPSILONS), "1-D"),
    (dict(temperatures=TEMPERATURES, epsilons=EPSILONS, std=(0.5,)), "channel"),
    (dict(temperatures=TEMPERATURES, epsilons=EPSILONS, chunk_size=0), "chunk_size"),
    (dict(temperatures=TEMPERATURES, epsilons=EPSILONS, forward_batch=0), "forward_batch"),
])
def test_grid_rejects_bad_arguments(kwargs, match):
  kwargs = {"std": STD, **kwargs}
  with pytest.raises(ValueError, match=match):
    odin_grid(mlp_apply, to_jax(mlp_params()), inputs(n=2), **kwargs)


def test_score_grid_matches_per_temperature_calls():
  v, x = to_jax(mlp_params()), jnp.asarray(inputs())
  for detector in (softmax.temperature_scaled, detectors.energy):
    grid = softmax.score_grid(detector, mlp_apply, v, x, TEMPERATURES)
    assert grid.shape == (3, x.shape[0])
    for t, temperature in enumerate(TEMPERATURES):
      np.testing.assert_allclose(np.asarray(grid[t]),
                                 np.asarray(detector(mlp_apply, v, x, temperature=temperature)),
                                 rtol=1e-6)
  with pytest.raises(ValueError, match="> 0"):
    softmax.score_grid(detectors.energy, mlp_apply, v, x, (1.0, -1.0))


def test_metrics_grid_matches_per_cell_metrics():
  rng = np.random.default_rng(0)
  scores_in = rng.normal(size=(2, 3, 20)).astype(np.float32)
  scores_out = (rng.normal(size=(2, 3, 15)) + rng.uniform(0, 2, size=(2, 3, 1))).astype(np.float32)
  table = metrics.metrics_grid(scores_in, scores_out)
  assert set(table) == {"fpr95", "detection_error", "auroc", "aupr_in", "aupr_out"}
  for t in range(2):
    for e in range(3):
      cell = jax.jit(metrics.all_metrics)(scores_in[t, e], scores_out[t, e])
      for key, value in cell.items():
        assert table[key].shape == (2, 3)
        assert float(table[key][t, e]) == pytest.approx(float(value), abs=1e-6), key
      labels = np.r_[np.zeros(20), np.ones(15)]  # OOD positive, score as the ranking
      want_auroc = roc_auc_score(labels, np.r_[scores_in[t, e], scores_out[t, e]])
      assert float(table["auroc"][t, e]) == pytest.approx(want_auroc, abs=1e-6)


def test_metrics_grid_rejects_mismatched_or_nan_grids():
  with pytest.raises(ValueError, match="leading axes"):
    metrics.metrics_grid(np.zeros((2, 3, 5)), np.zeros((3, 2, 5)))
  bad = np.zeros((2, 3, 5))
  bad[1, 1, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.metrics_grid(bad, np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="empty"):
    metrics.metrics_grid(np.zeros((2, 3, 0)), np.zeros((2, 3, 4)))
