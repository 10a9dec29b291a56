"""Softmax-family detectors and ODIN against float64 numpy references written from the weights.

The reference network is a 2-layer tanh MLP on flattened [B, H, W, C] inputs, whose forward pass
and input gradient are written out by hand below (and the gradient checked by finite
differences). `test_odin_grid.py` and `test_odin_tuning.py` import these helpers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax import detectors
from oodjax.detectors import odin, softmax

H, W, C, K, HIDDEN = 3, 3, 2, 4, 8
STD = (0.25, 0.5)  # distinct per channel, so a missing or transposed /std shows


def mlp_params(seed: int = 0, dead_pixel: bool = True) -> dict[str, np.ndarray]:
  """float64 weights; with `dead_pixel`, input (0, 0, 0) does not reach the output at all."""
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(H * W * C, HIDDEN)) / 2, "b1": rng.normal(size=HIDDEN) / 4,
            "w2": rng.normal(size=(HIDDEN, K)) * 2, "b2": rng.normal(size=K) / 4}
  if dead_pixel:
    params["w1"][0] = 0.0  # flattened index 0 is pixel (h=0, w=0, channel 0)
  return params


def to_jax(params):
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def mlp_apply(variables, x):
  """The JAX network: [B, H, W, C] -> logits [B, K]."""
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ variables["w1"] + variables["b1"][None, :])
  return h @ variables["w2"] + variables["b2"][None, :]


def np_forward(p, x):
  xf = x.reshape(x.shape[0], -1)
  hidden = np.tanh(xf @ p["w1"] + p["b1"])
  return hidden @ p["w2"] + p["b2"], hidden


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_loss(p, x, temperature, labels):
  """Per-example cross-entropy of logits / T against fixed labels, float64."""
  logits, _ = np_forward(p, x)
  z = logits / temperature
  log_probs = z - (z.max(-1, keepdims=True)
                   + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))
  return -log_probs[np.arange(len(x)), labels]


def np_input_gradient(p, x, temperature):
  """Hand-derived ∇_x of -log softmax(f(x)/T)[argmax f(x)], float64 [B, H, W, C]."""
  logits, hidden = np_forward(p, x)
  labels = logits.argmax(-1)
  d_logits = (np_softmax(logits / temperature) - np.eye(K)[labels]) / temperature  # [B, K]
  d_pre = (d_logits @ p["w2"].T) * (1.0 - hidden**2)  # [B, HIDDEN]
  return (d_pre @ p["w1"].T).reshape(x.shape)


def np_odin(p, x, temperature, epsilon, std=STD, divide_by_std=True):
  """The six steps of ODIN's released procedure, in float64 numpy."""
  grad = np_input_gradient(p, x, temperature)
  sign = np.where(grad >= 0, 1.0, -1.0)
  if divide_by_std:
    sign = sign / np.asarray(std)
  logits, _ = np_forward(p, x - epsilon * sign)
  return 1.0 - np_softmax(logits / temperature).max(-1)


def inputs(n: int = 6, seed: int = 1, shift: float = 0.0) -> np.ndarray:
  return (np.random.default_rng(seed).normal(size=(n, H, W, C)) + shift).astype(np.float32)


def test_reference_gradient_matches_finite_differences():
  p, x = mlp_params(), inputs().astype(np.float64)
  temperature = 3.0
  labels = np_forward(p, x)[0].argmax(-1)
  grad = np_input_gradient(p, x, temperature)
  h = 1e-6
  fd = np.zeros_like(x)
  for idx in np.ndindex(*x.shape[1:]):
    step = np.zeros_like(x)
    step[(slice(None),) + idx] = h
    fd[(slice(None),) + idx] = (np_loss(p, x + step, temperature, labels)
                                - np_loss(p, x - step, temperature, labels)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_input_gradient_matches_reference(temperature):
  p, x = mlp_params(), inputs()
  got = odin.odin_input_gradient(mlp_apply, to_jax(p), jnp.asarray(x),
                                    temperature=temperature)
  want = np_input_gradient(p, x.astype(np.float64), temperature)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * scale)
  assert np.all(np.asarray(got)[:, 0, 0, 0] == 0.0)  # the dead pixel


def test_perturbation_is_sign_over_std_and_zero_gradient_gives_plus_one():
  p, x = mlp_params(), inputs()
  got = np.asarray(odin.odin_perturbation(mlp_apply, to_jax(p), jnp.asarray(x),
                                             temperature=2.0, std=STD))
  grad = np_input_gradient(p, x.astype(np.float64), 2.0)
  clear = np.abs(grad) > 1e-6 * np.abs(grad).max()  # signs float32 can be trusted with
  want = np.where(grad >= 0, 1.0, -1.0) / np.asarray(STD)
  np.testing.assert_allclose(got[clear], want[clear], rtol=1e-6)
  # The only unclear entries are the exactly-zero ones, which move by +1/std (not jnp.sign's 0).
  assert np.array_equal(~clear, grad == 0.0)
  np.testing.assert_allclose(got[:, 0, 0, 0], 1.0 / STD[0])


@pytest.mark.parametrize("temperature,epsilon", [(1.0, 0.0), (1.0, 0.05), (10.0, 0.02),
                                                 (1000.0, 0.004), (1000.0, 0.1)])
def test_odin_matches_reference(temperature, epsilon):
  p, x = mlp_params(), inputs()
  got = np.asarray(detectors.odin_score(mlp_apply, to_jax(p), jnp.asarray(x),
                                  temperature=temperature, epsilon=epsilon, std=STD))
  want = np_odin(p, x.astype(np.float64), temperature, epsilon)
  assert got.shape == (x.shape[0],)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-7)


def test_odin_reference_would_catch_a_missing_std_division():
  p, x = mlp_params(), inputs()
  got = np.asarray(detectors.odin_score(mlp_apply, to_jax(p), jnp.asarray(x), temperature=1.0,
                                  epsilon=0.05, std=STD))
  without_std = np_odin(p, x.astype(np.float64), 1.0, 0.05, divide_by_std=False)
  assert np.abs(got - without_std).max() > 1e-3


def test_small_epsilon_raises_every_max_softmax():
  # To first order the step lowers -log S_y, so S_y and with it max S rise: the score falls.
  p, x = mlp_params(), inputs(n=16)
  v, x = to_jax(p), jnp.asarray(x)
  base = softmax.temperature_scaled(mlp_apply, v, x, temperature=2.0)
  perturbed = detectors.odin_score(mlp_apply, v, x, temperature=2.0, epsilon=1e-3, std=STD)
  assert np.all(np.asarray(perturbed) < np.asarray(base))


def test_odin_with_zero_epsilon_is_temperature_scaling():
  p, x = mlp_params(), jnp.asarray(inputs())
  a = detectors.odin_score(mlp_apply, to_jax(p), x, temperature=5.0, epsilon=0.0, std=STD)
  b = softmax.temperature_scaled(mlp_apply, to_jax(p), x, temperature=5.0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_odin_on_a_batchnorm_conv_net_scores_each_image_alone():
  # Inference-mode BN: the gradient of the summed loss is each example's own gradient, so
  # scoring a batch equals scoring each image alone.
  apply_fn, variables = conv_net(num_classes=3, channels=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 2)), jnp.float32)
  # Jitted: op-by-op dispatch of a conv net's backward pass is slow on CPU.
  score = jax.jit(functools.partial(detectors.odin_score, apply_fn, temperature=10.0, epsilon=0.01,
                                    std=STD))
  batch = score(variables, x)
  alone = jnp.concatenate([score(variables, x[i:i + 1]) for i in range(4)])
  np.testing.assert_allclose(np.asarray(batch), np.asarray(alone), rtol=1e-5, atol=1e-7)


def conv_net(num_classes: int, channels: int, seed: int = 0):
  """small_cnn_tiny (conv-BN-ReLU blocks) in inference mode, with random weights and BN stats.

  The variables are filled from their abstract shapes instead of running `model.init`, whose
  compilation takes seconds on a busy 2-core machine.
  """
  from oodjax.models import get_model
  model = get_model("small_cnn_tiny", num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, channels)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":  # BN running variance: positive
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = 0.3 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return functools.partial(model.apply, train=False), variables


def _logits_apply(variables, x):
  del x
  return variables  # the "network" returns fixed logits


def test_cheap_detectors_on_huge_logits():
  logits = jnp.asarray([[1e4, -1e4, 0.0], [3.0, 1.0, -2.0]], jnp.float32)
  x = jnp.zeros((2, 1, 1, 1))
  l64 = np.asarray(logits, np.float64)

  def np_lse(z):
    m = z.max(-1)
    return m + np.log(np.exp(z - m[:, None]).sum(-1))

  np.testing.assert_allclose(np.asarray(detectors.max_logit(_logits_apply, logits, x)),
                             [-1e4, -3.0])
  for t in (1.0, 1000.0):
    got = np.asarray(detectors.energy(_logits_apply, logits, x, temperature=t))
    np.testing.assert_allclose(got, -t * np_lse(l64 / t), rtol=1e-6)
    got = np.asarray(softmax.temperature_scaled(_logits_apply, logits, x, temperature=t))
    np.testing.assert_allclose(got, 1.0 - np_softmax(l64 / t).max(-1), rtol=1e-4, atol=1e-7)
  # Hand-worked: at T = 1000, f / T = (10, -10, 0) and 1 - max S = 1 - 1 / (1 + e^-10 + e^-20).
  t1000 = softmax.temperature_scaled(_logits_apply, logits, x, temperature=1000.0)
  np.testing.assert_allclose(float(t1000[0]), 4.5397868e-05, rtol=1e-3)
  assert float(detectors.energy(_logits_apply, logits, x)[0]) == pytest.approx(-1e4)


def test_temperature_and_epsilon_are_traced_not_static():
  p, x = mlp_params(), jnp.asarray(inputs())
  fn = jax.jit(lambda t, e: detectors.odin_score(mlp_apply, to_jax(p), x, temperature=t, epsilon=e,
                                           std=STD))
  got = fn(jnp.float32(7.0), jnp.float32(0.03))
  np.testing.assert_allclose(np.asarray(got), np_odin(p, np.asarray(x, np.float64), 7.0, 0.03),
                             rtol=2e-5, atol=2e-7)
  # Under jit nothing can be checked: a bad temperature gives garbage, not an error.
  assert fn(jnp.float32(-1.0), jnp.float32(0.0)).shape == (x.shape[0],)


@pytest.mark.parametrize("hyper,match", [
    (dict(temperature=0.0, epsilon=0.0, std=STD), "temperature"),
    (dict(temperature=-2.0, epsilon=0.0, std=STD), "temperature"),
    (dict(temperature=float("nan"), epsilon=0.0, std=STD), "temperature"),
    (dict(temperature=1.0, epsilon=-1e-3, std=STD), "epsilon"),
    (dict(temperature=jnp.ones(2), epsilon=0.0, std=STD), "scalar"),
    (dict(temperature=1.0, epsilon=0.0, std=(0.5,)), "one entry per input channel"),
    (dict(temperature=1.0, epsilon=0.0, std=(0.5, 0.5, 0.5)), "one entry per input channel"),
    (dict(temperature=1.0, epsilon=0.0, std=0.5), "one entry per input channel"),
    (dict(temperature=1.0, epsilon=0.0, std=(0.5, 0.0)), "> 0"),
])
def test_odin_rejects_bad_hyperparameters(hyper, match):
  p, x = mlp_params(), jnp.asarray(inputs())
  with pytest.raises(ValueError, match=match):
    detectors.odin_score(mlp_apply, to_jax(p), x, **hyper)


@pytest.mark.parametrize("detector", [detectors.energy, softmax.temperature_scaled])
def test_temperature_detectors_reject_nonpositive_temperature(detector):
  with pytest.raises(ValueError, match="temperature"):
    detector(mlp_apply, to_jax(mlp_params()), jnp.asarray(inputs()), temperature=0.0)
