"""oodjax's ODIN grid against the ODIN authors' released per-configuration procedure, run in
PyTorch on a twin of the network carrying the same weights (benchmarks/torch_twin.py).

Needs the `bench` extra (torch 2.13.0 CPU); CI installs it (`OODJAX_EXTRAS=test,bench`), a plain
`bash scripts/test.sh` skips this file with that reason.
"""
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the bench extra: pip install 'oodjax[bench]'")

from oodjax import models  # noqa: E402
from oodjax.detectors.odin import odin_grid  # noqa: E402

from benchmarks import torch_twin  # noqa: E402


def _perturbed_batch_stats(variables, seed):
  """Non-trivial running statistics, so a wrong BatchNorm copy would show."""
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda a: np.asarray(a), variables["batch_stats"])
  for block in stats.values():
    bn = block["BatchNorm_0"]
    bn["mean"] = rng.normal(0, 0.3, bn["mean"].shape).astype(np.float32)
    bn["var"] = rng.uniform(0.5, 2.0, bn["var"].shape).astype(np.float32)
  return {"params": variables["params"], "batch_stats": stats}


def test_twin_logits_equal_flax_logits():
  model = models.get_model("small_cnn_tiny", num_classes=10)
  x = np.random.default_rng(0).normal(size=(6, 28, 28, 1)).astype(np.float32)
  variables = _perturbed_batch_stats(model.init(jax.random.key(0), x[:1]), 1)
  net = torch_twin.small_cnn_twin(variables, (4, 8), 16, 10, 1, 28)
  ours = np.asarray(model.apply(variables, x, train=False))
  with torch.no_grad():
    theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_odin_grid_equals_released_procedure():
  model = models.get_model("small_cnn_tiny", num_classes=10)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(12, 28, 28, 1)).astype(np.float32)
  variables = _perturbed_batch_stats(model.init(jax.random.key(3), x[:1]), 4)
  temperatures = np.array([1.0, 10.0, 1000.0], np.float32)
  epsilons = np.array([0.0, 0.0014, 0.004], np.float32)
  std = (0.3533,)
  ours = odin_grid(functools.partial(model.apply, train=False), variables, x, temperatures,
                   epsilons, std=std, chunk_size=8)
  net = torch_twin.small_cnn_twin(variables, (4, 8), 16, 10, 1, 28)
  theirs = torch_twin.released_odin_grid(net, x, temperatures, epsilons, std, batch_size=5)
  assert ours.shape == theirs.shape == (3, 3, 12)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # The perturbation must matter, else this test could not tell the procedures apart.
  assert np.max(np.abs(theirs[:, 2] - theirs[:, 0])) > 1e-3
