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
from oodjax.envise import online
from oodjax.envise import scenarios as envise_scenarios
from oodjax.envise import stream as envise_stream
from oodjax.envise.students import get_student
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
         "vmdls_cifar.py:resnet34_c10", "vmdls_cifar.py:wrn28_c10", "vmdls_cifar.py:vgg16_c10",
         # ENVISE: the teacher is the same for every scenario, so one spec covers the file here.
         "envise_cifar.py:c1", "envise_embedded.py", "envise_embedded.py:quick"]
OTHER_CLASSES = {"embedded/fashion_animal": 20}


def test_every_config_file_is_covered():
  assert {p.name for p in CONFIGS.glob("*.py")} == {s.split(":")[0] for s in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_config_builds_its_model(spec):
  config = load_config(str(CONFIGS / spec))
  module_doc = (CONFIGS / spec.split(":")[0]).read_text().split('"""')[1]
  assert "oodjax run --config" in module_doc
  num_classes = CIFAR.get(config.dataset, OTHER_CLASSES.get(config.dataset, 10))
  shape = (1, 32, 32, 3) if config.dataset in CIFAR else (1, 28, 28, 1)
  model = models.get_model(config.model, num_classes=num_classes)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                          jnp.zeros((8, *shape[1:])))
  assert logits.shape == (8, num_classes)
  assert "msp" in config.eval.detectors


def _class_names(dataset: str):
  if dataset == "tfds/cifar100":
    return envise_scenarios.CIFAR100_FINE_LABELS
  if dataset == "embedded/fashion_animal":
    return envise_scenarios.FASHION_ANIMAL_CLASSES
  return envise_scenarios.FASHION_MNIST_CLASSES


@pytest.mark.parametrize("spec", [s for s in SPECS if "smoke" not in s])
def test_envise_sections_pass_their_checks(spec):
  """Every config with an `envise` section names known scenarios, student and gates, with
  stream lengths that fit its batch size (what `oodjax run` checks before training)."""
  from oodjax.envise.pipeline import check_envise_config
  config = load_config(str(CONFIGS / spec))
  if "envise" not in config:
    pytest.skip("no envise section")
  check_envise_config(config, _class_names(config.dataset))


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


# ---------------------------------------------------------------------------------------------
# ENVISE (configs/envise_cifar.py): the paper's CIFAR-100 setting, one config per scenario.

# The paper's Table 1 "# IL train" (images per epoch here) and Table 7's (#IL, #OL) classes,
# typed in from the paper.
ENVISE_TABLE1_IL_TRAIN = {"C1": 840, "C2": 630, "C3": 350, "C4": 560, "C5": 1750, "C6": 420}
ENVISE_TABLE7_COUNTS = {"C1": (12, 5), "C2": (10, 5), "C3": (5, 5), "C4": (8, 5), "C5": (25, 5),
                        "C6": (5, 10)}
ENVISE_ARGS = ["c1", "c2", "c3", "c4", "c5", "c6", "C6"]


def _fake_cifar100() -> ImageDataset:
  """One black 32x32x3 image per CIFAR-100 class, labelled with the fine names."""
  return ImageDataset(
      images=np.zeros((100, 32, 32, 3), np.uint8), labels=np.arange(100, dtype=np.int32),
      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
      class_names=envise_scenarios.CIFAR100_FINE_LABELS, name="fake_cifar100")


def _densenet_params(stage_sizes, growth_rate, num_classes, compression=0.5) -> int:
  """Parameter count of the zoo's DenseNet-BC with the CIFAR stem, layer by layer from its
  definition: conv3x3(2k) stem; per dense layer BN(c) + conv1x1 c->4k + BN(4k) + conv3x3 4k->k
  (no conv biases; a BN has a scale and a bias per channel); per transition BN(c) + conv1x1
  c->floor(theta c); final BN(c) + Dense(c -> K) with bias."""
  k = growth_rate
  c = 2 * k
  total = 3 * 3 * 3 * c
  for i, layers in enumerate(stage_sizes):
    for _ in range(layers):
      total += 2 * c + c * 4 * k + 2 * 4 * k + 3 * 3 * 4 * k * k
      c += k
    if i < len(stage_sizes) - 1:
      out = int(c * compression)
      total += 2 * c + c * out
      c = out
  return total + 2 * c + c * num_classes + num_classes


@pytest.fixture(scope="module")
def envise_networks():
  """(teacher, abstract teacher variables, student, abstract student variables) at K = 100."""
  config = load_config(str(CONFIGS / "envise_cifar.py:c1"))
  teacher = models.get_model(config.model, num_classes=100)
  student = get_student(config.envise.student, 100)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return (teacher, jax.eval_shape(teacher.init, jax.random.key(0), x),
          student, jax.eval_shape(student.init, jax.random.key(0), x))


@pytest.mark.parametrize("arg", ENVISE_ARGS)
def test_envise_configs_follow_the_paper(arg):
  name = arg.upper()
  config = load_config(str(CONFIGS / f"envise_cifar.py:{arg}"))
  assert config.is_locked and config.envise.online.is_locked
  assert (config.model, config.dataset) == ("densenet201", "tfds/cifar100")
  assert (config.envise.student, config.envise.scenario) == ("binary_vgg16", name)
  # The teacher's recipe (ours: DenseNet's CIFAR one) and its experiment without VMDLS.
  assert (config.train.optimizer, config.train.num_epochs, config.train.batch_size) == (
      "sgd", 300, 64)
  assert "vmdls" not in config and config.eval.detectors == ("msp",)

  oc = config.envise.online
  online.validate_online_config(oc)
  assert (oc.student_kind, oc.batch_size) == ("bsn", 10)
  assert (oc.optimizer.name, oc.optimizer.learning_rate) == ("adam", 1e-4)
  assert (oc.loss.lambda_d, oc.loss.lambda_at, oc.loss.margin) == (1.0, 0.2, 1.5)
  assert (oc.loss.attention, oc.loss.temperature) == ("triplet", None)  # hard pseudo-labels
  il_train = ENVISE_TABLE1_IL_TRAIN[name]
  assert (oc.adaptive.max_epochs, oc.adaptive.epoch_size) == (10, il_train)
  assert online.max_adaptive_steps(oc) == il_train  # 10 epochs x il_train images / batch 10

  scenario = envise_scenarios.CIFAR100_SCENARIOS[config.envise.scenario]
  assert envise_scenarios.validate(scenario, envise_scenarios.CIFAR100_FINE_LABELS) is scenario
  assert (len(scenario.inliers), len(scenario.outliers)) == ENVISE_TABLE7_COUNTS[name]
  assert config.envise.adaptive_inliers_only and config.envise.split == "test"

  # The stream section is make_stream's keyword arguments: 40 epochs of "# IL train" images.
  sc = config.envise.stream
  assert (sc.max_angle, sc.crop_range, sc.batch_size) == (15.0, (0.8, 1.0), oc.batch_size)
  fake = _fake_cifar100()
  deploy = envise_stream.make_stream(fake, [scenario], **sc)
  adapt = envise_stream.make_stream(fake, [envise_scenarios.inliers_only(scenario)], **sc)
  assert deploy.steps_per_scenario == adapt.steps_per_scenario == (40 * il_train // 10,)
  assert (deploy.batch_size, deploy.max_angle, deploy.crop_range) == (10, 15.0, (0.8, 1.0))


def test_envise_config_is_locked_and_takes_overrides():
  assert (load_config(str(CONFIGS / "envise_cifar.py:C3")).to_dict()
          == load_config(str(CONFIGS / "envise_cifar.py:c3")).to_dict())
  config = load_config(str(CONFIGS / "envise_cifar.py:c2"),
                       ["envise.online.loss.margin=2.0", "envise.online.student_kind=rvsn"])
  assert (config.envise.online.loss.margin, config.envise.online.student_kind) == (2.0, "rvsn")
  with pytest.raises(ValueError, match="margni"):
    load_config(str(CONFIGS / "envise_cifar.py:c2"), ["envise.online.loss.margni=2.0"])
  for bad in (None, "c7", "t1"):
    with pytest.raises(ValueError, match="argument"):
      load_config(str(CONFIGS / "envise_cifar.py") + (f":{bad}" if bad else ""))


def test_envise_teacher_is_densenet201_at_cifar_size(envise_networks):
  teacher, variables, _, _ = envise_networks
  logits = jax.eval_shape(lambda v, x: teacher.apply(v, x, train=False), variables,
                          jnp.zeros((8, 32, 32, 3), jnp.float32))
  assert logits.shape == (8, 100)
  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  assert num_params == _densenet_params((6, 12, 48, 32), 32, 100)
  assert 18.0e6 < num_params < 18.5e6  # the paper's "DenseNet-201 (18M parameters)", App. A.3
  # Its pooled feature map: 64 + 6k -> 128 + 12k -> 256 + 48k -> 896 + 32k = 1920 channels.
  assert variables["params"]["Dense_0"]["kernel"].shape == (1920, 100)


def test_envise_student_is_binary_vgg16_at_cifar_size(envise_networks):
  _, _, student, variables = envise_networks
  logits = jax.eval_shape(lambda v, x: student.apply(v, x, train=False), variables,
                          jnp.zeros((8, 32, 32, 3), jnp.float32))
  assert logits.shape == (8, 100)
  params = variables["params"]
  # VGG-16's 13 convolutions: the real stem, then 12 binary units; the real head reads the
  # 1x1x512 map left after five 2x2 poolings of 32x32.
  assert params["stem"]["kernel"].shape == (3, 3, 3, 64)
  assert params["head"]["kernel"].shape == (512, 100)
  widths = [params[stage][block]["conv"]["kernel"].shape[-1]
            for stage in sorted(p for p in params if p.startswith("BinaryVGGStage"))
            for block in sorted(params[stage])]
  assert widths == [64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def test_envise_adaptive_step_traces_at_full_size(envise_networks):
  # The whole adaptive step (teacher labels and Grad-CAM, second-order L_at, Adam), traced
  # with shapes only: run_online's own pre-flight check at the paper's sizes.
  teacher, teacher_vars, student, _ = envise_networks
  config = load_config(str(CONFIGS / "envise_cifar.py:c5"))
  trained, _ = online.student_modules(student, config.envise.online.student_kind)
  spec = online.step_spec(config.envise.online, trained, teacher)
  state = jax.eval_shape(
      lambda key: online.create_student_state(spec, key, jnp.zeros((1, 32, 32, 3))),
      jax.random.key(0))
  x = jax.ShapeDtypeStruct((config.envise.online.batch_size, 32, 32, 3), jnp.float32)
  new_state, metrics = jax.eval_shape(
      lambda s, tv, x: online.adaptive_step(spec, s, tv, x), state, teacher_vars, x)
  assert {k: v.shape for k, v in metrics.items()} == {"loss": (), "distillation": (),
                                                      "attention": ()}
  assert jax.tree.map(lambda a: a.shape, new_state.params) == jax.tree.map(
      lambda a: a.shape, state.params)
