"""Every config loads, documents its command, and its model builds at the data's size
(`jax.eval_shape`: full-size CIFAR models are shape-checked, never run here)."""
import pathlib

import jax
import jax.numpy as jnp
import pytest

from oodjax import models
from oodjax.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CIFAR = {"tfds/cifar10": 10, "tfds/cifar100": 100}
SPECS = ["fmnist_small_cnn.py", "fmnist_small_cnn.py:smoke", "odin_fmnist.py",
         "odin_fmnist.py:smoke", "odin_cifar.py:densenet_c10", "odin_cifar.py:densenet_c100",
         "odin_cifar.py:wrn_c10", "odin_cifar.py:wrn_c100", "sample_free_cifar.py:r50_c10",
         "sample_free_cifar.py:r50_c100", "sample_free_cifar.py:wrn40_c10",
         "sample_free_cifar.py:wrn40_c100", "sample_free_cifar.py:d121_c10",
         "sample_free_cifar.py:d121_c100"]


def test_every_config_file_is_covered():
  assert {p.name for p in CONFIGS.glob("*.py")} == {s.split(":")[0] for s in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_config_builds_its_model(spec):
  config = load_config(str(CONFIGS / spec))
  module_doc = (CONFIGS / spec.split(":")[0]).read_text().split('"""')[1]
  assert "oodjax run --config" in module_doc
  num_classes = CIFAR.get(config.dataset, 10)
  shape = (1, 32, 32, 3) if config.dataset in CIFAR else (1, 28, 28, 1)
  model = models.get_model(config.model, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                          jnp.zeros((8, *shape[1:])))
  assert logits.shape == (8, num_classes)
  assert "msp" in config.eval.detectors


def test_odin_configs_follow_the_paper():
  config = load_config(str(CONFIGS / "odin_cifar.py:densenet_c10"))
  assert (config.train.num_epochs, config.train.batch_size) == (300, 64)
  assert config.train.nesterov and config.train.lr_drop_at == (0.5, 0.75)
  assert len(config.eval.odin.temperatures) == 10 and len(config.eval.odin.epsilons) == 21
  assert config.eval.odin.epsilons[-1] == 0.004 and config.eval.holdout == 1000
  wrn = load_config(str(CONFIGS / "odin_cifar.py:wrn_c100"))
  assert (wrn.train.num_epochs, wrn.train.batch_size, wrn.model) == (200, 128, "wrn28_10")
  with pytest.raises(ValueError, match="argument"):
    load_config(str(CONFIGS / "odin_cifar.py"))


def test_sample_free_configs_follow_the_paper():
  for arg, model in (("r50_c10", "resnet50"), ("wrn40_c100", "wrn40_4"),
                     ("d121_c10", "densenet121")):
    config = load_config(str(CONFIGS / f"sample_free_cifar.py:{arg}"))
    assert config.model == model
    assert {"indicators", "1c_sum", "supervised", "odin_fixed"} <= set(config.eval.detectors)
    assert config.eval.sample_free.noise_n == 10_000
