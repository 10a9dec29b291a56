"""Every config loads, documents its command, and its model builds at the data's size
(`jax.eval_shape`: full-size CIFAR models are shape-checked, never run here)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax import models
from oodjax.config import load_config
from oodjax.data.core import ImageDataset
from oodjax.train.sharding import make_mesh
from oodjax.vmdls import VMDLSEncoder, scoring
from oodjax.vmdls.train import check_vmdls_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CIFAR = {"tfds/cifar10": 10, "tfds/cifar100": 100}
SPECS = ["fmnist_small_cnn.py", "fmnist_small_cnn.py:smoke", "odin_fmnist.py",
         "odin_fmnist.py:smoke", "odin_cifar.py:densenet_c10", "odin_cifar.py:densenet_c100",
         "odin_cifar.py:wrn_c10", "odin_cifar.py:wrn_c100", "sample_free_cifar.py:r50_c10",
         "sample_free_cifar.py:r50_c100", "sample_free_cifar.py:wrn40_c10",
         "sample_free_cifar.py:wrn40_c100", "sample_free_cifar.py:d121_c10",
         "sample_free_cifar.py:d121_c100", "vmdls_cifar.py:densenet_c10",
         "vmdls_cifar.py:densenet_c100", "vmdls_cifar.py:resnet18_c10",
         "vmdls_cifar.py:resnet34_c10", "vmdls_cifar.py:wrn28_c10", "vmdls_cifar.py:vgg16_c10"]


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


# Widths of the members of Eq. 8's ensemble other than μ: the first three stages' outputs
# (t1, t2, t3) and the penultimate vector g, from the architectures' definitions.
#   ResNet-18/34 (CIFAR stem, ImageNet widths): stages 64, 128, 256, 512; g = 512.
#   WRN-28-10: stages 16k, 32k, 64k with k = 10; g = 640.
#   DenseNet-BC-100, k = 12, 16 bottleneck layers per stage: stem 2k = 24; stage 1 24 + 16k =
#   216; transition floor(216 / 2) = 108; stage 2 108 + 192 = 300; transition 150; stage 3
#   150 + 192 = 342 = g.
#   VGG-16: stages 64, 128, 256, 512, 512; at 32x32 the last leaves 1x1x512, so g = 512.
ENSEMBLE_WIDTHS = {"resnet18": ((64, 128, 256), 512), "resnet34": ((64, 128, 256), 512),
                   "wrn28_10": ((160, 320, 640), 640),
                   "densenet_bc100": ((216, 300, 342), 342), "vgg16": ((64, 128, 256), 512)}
# arg: (zoo model, dataset, K, d, B_C, B_N), d/B_C/B_N from the authors' README commands
# (resnet34: ResNet-18's; see the config's docstring).
VMDLS_VARIANTS = {
    "densenet_c10": ("densenet_bc100", "tfds/cifar10", 10, 32, 10, 8),
    "densenet_c100": ("densenet_bc100", "tfds/cifar100", 100, 64, 20, 20),
    "resnet18_c10": ("resnet18", "tfds/cifar10", 10, 32, 10, 8),
    "resnet34_c10": ("resnet34", "tfds/cifar10", 10, 32, 10, 8),
    "wrn28_c10": ("wrn28_10", "tfds/cifar10", 10, 32, 10, 20),
    "vgg16_c10": ("vgg16", "tfds/cifar10", 10, 32, 8, 8),
}


def _fake_cifar_train(num_classes: int) -> ImageDataset:
  """50,000 all-zero 32x32x3 images, balanced labels; the images are one broadcast buffer."""
  n = 50_000
  return ImageDataset(
      images=np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (n, 32, 32, 3)),
      labels=np.repeat(np.arange(num_classes, dtype=np.int32), n // num_classes),
      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
      class_names=tuple(str(c) for c in range(num_classes)), name="fake_cifar")


@pytest.mark.parametrize("arg", sorted(VMDLS_VARIANTS))
def test_vmdls_configs_follow_the_paper(arg):
  model_name, dataset, num_classes, d, b_c, b_n = VMDLS_VARIANTS[arg]
  config = load_config(str(CONFIGS / f"vmdls_cifar.py:{arg}"))
  assert (config.model, config.dataset) == (model_name, dataset)
  vc = config.vmdls
  assert (vc.latent_dim, vc.classes_per_batch, vc.per_class) == (d, b_c, b_n)
  assert vc.distancing_margin == d and vc.triplet_margin == 0.1 and vc.s2 == 0.1
  # The paper's defaults are kept; the code's variants are options (see the docstring).
  assert (vc.reducer, vc.normalize, vc.margin_warmup) == ("all", False, None)
  assert vc.train.num_epochs == 500 and vc.train.lr_drop_at == (0.2, 0.4, 0.6, 0.8)
  assert {"msp", "odin_tuned_without_ood", "vmdls_b", "vmdls"} <= set(config.eval.detectors)
  assert {f"folder/data/odin/{name}" for name in
          ("Imagenet", "Imagenet_resize", "LSUN", "LSUN_resize")} == set(config.eval.ood_sets)
  assert config.eval.open_set_train_size == 0  # the whole training set sets the threshold

  # Full-size models: shapes only (jax.eval_shape), never a real initialisation.
  encoder = VMDLSEncoder(backbone=models.get_model(config.model, num_classes=num_classes),
                         latent_dim=vc.latent_dim)
  x = jnp.zeros((8, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), x[:1])
  assert variables["params"]["mu"]["kernel"].shape[-1] == d
  is_block = scoring.ensemble_blocks(encoder, variables, x)
  t, t1 = jax.eval_shape(
      lambda v, x: scoring.feature_ensemble(encoder, v, x, is_block=is_block), variables, x)
  stages, g_width = ENSEMBLE_WIDTHS[model_name]
  assert t.shape == (8, sum(stages) + g_width + d)
  assert t1.shape == (8, stages[0])

  check_vmdls_config(config, _fake_cifar_train(num_classes),
                     make_mesh(config.mesh.shape, config.mesh.axes))
