"""PyTorch checkpoint import: logits and insides equal PyTorch's own forward pass.

Each layout is checked on a PyTorch network with random weights and random BatchNorm
statistics (`torch_twins`): the imported zoo model must give the same logits (1e-4 relative to
their scale) and the same insides as hooks on the PyTorch modules record: the penultimate
features and head, every block/stage output, every BatchNorm input normalised with the running
statistics (and its per-channel sums), and the feature map the head pools. Small variants
cover every layout's branches; the full-size networks (torchvision ResNet-18/50 layout, the
ODIN DenseNet-BC-100 and WRN-28-10) are checked at their real size too.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oodjax import cli, data
from oodjax.models import forward_with_insides, get_model
from oodjax.models import torch_import as ti

torch = pytest.importorskip("torch")  # the bench extra; CI installs it
import torch_twins as tw  # noqa: E402  (needs torch)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state_dict(net) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _stages(fmt: str, sizes, inner: str | None) -> list[str]:
  """Torch names in the zoo's block order: each block, then its stage."""
  names = []
  for i, n in enumerate(sizes):
    if inner is not None:
      names += [inner.format(i=i + 1, j=j) for j in range(n)]
    names.append(fmt.format(i=i + 1))
  return names


def _torch_pass(net, x: np.ndarray, blocks: list[str], feature_map: str, head: str):
  """Logits and insides recorded by hooks on `net`, converted to NHWC numpy."""
  modules = dict(net.named_modules())
  record = {"bn": [], "blocks": {}}
  hooks = []

  def nhwc(t):
    t = t.detach().numpy()
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t

  def bn_hook(module, args):
    z = args[0].detach()
    mean = module.running_mean.view(1, -1, 1, 1)
    var = module.running_var.view(1, -1, 1, 1)
    record["bn"].append(nhwc((z - mean) / torch.sqrt(var + module.eps)))

  for module in modules.values():
    if isinstance(module, torch.nn.BatchNorm2d):
      hooks.append(module.register_forward_pre_hook(bn_hook))
  for name in blocks:
    hooks.append(modules[name].register_forward_hook(
        lambda m, a, out, name=name: record["blocks"].__setitem__(name, nhwc(out))))
  hooks.append(modules[feature_map].register_forward_hook(
      lambda m, a, out: record.__setitem__("feature_map", nhwc(out))))
  hooks.append(modules[head].register_forward_pre_hook(
      lambda m, a: record.__setitem__("features", nhwc(a[0]))))
  with torch.no_grad():
    logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  for h in hooks:
    h.remove()
  record["blocks"] = [record["blocks"][name] for name in blocks]
  record["head_kernel"] = modules[head].weight.detach().numpy().T
  record["head_bias"] = modules[head].bias.detach().numpy()
  return logits, record


def _close(ours, ref, what: str, tol: float = 1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=tol * scale, err_msg=what)


def _check(net, model, x, blocks, feature_map, head, layout, tol=1e-4):
  """Imports `net` into `model` and compares everything with PyTorch's pass on `x` (NHWC)."""
  state = _state_dict(net)
  assert ti.detect_layout(state) == layout
  variables = ti.import_state_dict(state, model)
  ref_logits, ref = _torch_pass(net, x, blocks, feature_map, head)
  logits, ins = jax.jit(lambda v, x: forward_with_insides(model, v, x))(variables, jnp.asarray(x))
  _close(logits, ref_logits, "logits", tol)
  assert float(np.abs(ref_logits).max()) > 0.5  # logits of a scale the tolerance means something
  _close(ins.features, ref["features"], "features", tol)
  _close(ins.head_kernel, ref["head_kernel"], "head kernel", 0)
  _close(ins.head_bias, ref["head_bias"], "head bias", 0)
  assert len(ins.blocks) == len(ref["blocks"]), (ins.block_names, blocks)
  for name, ours, theirs in zip(ins.block_names, ins.blocks, ref["blocks"]):
    _close(ours, theirs, f"block {name}", tol)
  assert len(ins.bn_inputs) == len(ref["bn"]) > 0
  for name, ours, sums, theirs in zip(ins.bn_names, ins.bn_inputs, ins.bn_sums, ref["bn"]):
    _close(ours, theirs, f"BatchNorm input {name}", tol)
    _close(sums.total, theirs.sum(axis=(1, 2)), f"BatchNorm sums {name}", tol)
    _close(sums.total_square, (theirs.astype(np.float64) ** 2).sum(axis=(1, 2)),
           f"BatchNorm square sums {name}", tol)
  _close(ins.feature_map, ref["feature_map"], "feature map", tol)
  return variables


def _inputs(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _net(cls, *args, seed=0, **kwargs):
  torch.manual_seed(seed)
  return tw.randomize_(cls(*args, **kwargs), seed)


# --- Small variants of every layout (default suite) -------------------------------------------

def test_torchvision_resnet_basic_and_bottleneck_layouts():
  for bottleneck, zoo in ((False, "resnet18_imagenet"), (True, "resnet50_imagenet")):
    net = _net(tw.TorchvisionResNet, (1, 2, 1, 1), bottleneck, num_classes=7)
    model = get_model(zoo, 7, stage_sizes=(1, 2, 1, 1))
    # 40x40: the stem pool's padding (1 on both sides) and every stride meet odd sizes too.
    _check(net, model, _inputs((2, 40, 40, 3)),
           _stages("layer{i}", (1, 2, 1, 1), "layer{i}.{j}"), "layer4", "fc",
           "resnet_torchvision")


def test_kuangliu_resnet_layout():
  net = _net(tw.KuangliuResNet, (1, 2, 1), num_classes=5, width=8)
  model = get_model("resnet18", 5, stage_sizes=(1, 2, 1), width=8)
  _check(net, model, _inputs((2, 32, 32, 3)), _stages("layer{i}", (1, 2, 1), "layer{i}.{j}"),
         "layer3", "linear", "resnet_kuangliu")


def test_odin_densenet_layout():
  net = _net(tw.OdinDenseNet3, 16, 6, growth=4)
  model = get_model("densenet_bc100", 6, depth=16, growth_rate=4)
  _check(net, model, _inputs((2, 32, 32, 3)), ["block1", "block2", "block3"], "relu", "fc",
         "densenet_odin")


def test_odin_wrn_layout_including_equal_width_blocks_without_projection():
  # widen_factor 1: the first stage's blocks keep 16 channels (no convShortcut at all).
  for widen in (1, 2):
    net = _net(tw.OdinWideResNet, 16, 6, widen_factor=widen)
    model = get_model("wrn28_10", 6, depth=16, widen_factor=widen)
    variables = _check(net, model, _inputs((2, 32, 32, 3)),
                       _stages("block{i}", (2, 2, 2), "block{i}.layer.{j}"), "relu", "fc",
                       "wrn_odin")
    has_projection = "Conv_2" in variables["params"]["ResNetStage_0"]["WideBasicBlock_0"]
    assert has_projection == (widen != 1)


def test_resnet_imagenet_stem_parameter_counts_are_torchvisions():
  # torchvision's published counts (1000 classes): ResNet-18 11,689,512, ResNet-50 25,557,032.
  for name, want in (("resnet18_imagenet", 11_689_512), ("resnet50_imagenet", 25_557_032)):
    model = get_model(name, 1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"])) == want
    out = jax.eval_shape(lambda v, x: forward_with_insides(model, v, x, which=("blocks",)),
                         shapes, jnp.zeros((1, 224, 224, 3)))[1]
    # The stem takes 224 to 56 (7x7/2 conv, 3x3/2 pool), the stages to 56, 28, 14, 7.
    assert [b.shape[1] for b in out.blocks if b.ndim == 4][:1] == [56]
    assert out.blocks[-1].shape[1:3] == (7, 7)


# --- What the checks refuse -------------------------------------------------------------------

def test_mismatches_are_listed_not_silently_skipped():
  net = _net(tw.OdinWideResNet, 10, 4, widen_factor=2)
  state = _state_dict(net)
  right = get_model("wrn28_10", 4, depth=10, widen_factor=2)
  ti.import_state_dict(state, right)
  with pytest.raises(ValueError, match=r"shapes that differ.*fc -> params/Dense_0/kernel"):
    ti.import_state_dict(state, get_model("wrn28_10", 5, depth=10, widen_factor=2))
  with pytest.raises(ValueError, match="model variables left unfilled"):
    ti.import_state_dict(state, get_model("wrn28_10", 4, depth=16, widen_factor=2))
  missing = {k: v for k, v in state.items() if not k.startswith("block2.layer.0.bn2.")}
  with pytest.raises(ValueError, match=r"checkpoint tensors missing.*block2\.layer\.0\.bn2"):
    ti.import_state_dict(missing, right)
  extra = dict(state, **{"block1.layer.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"no module takes.*block1\.layer\.0\.extra\.weight"):
    ti.import_state_dict(extra, right)
  with pytest.raises(ValueError, match="fills a WideResNet"):
    ti.import_state_dict(state, get_model("densenet_tiny", 4))
  with pytest.raises(ValueError, match="cannot tell the checkpoint's layout"):
    ti.detect_layout({"features.0.weight": np.zeros(1)})


def test_a_7x7_stem_into_a_cifar_resnet_says_which_model_to_use():
  state = _state_dict(_net(tw.TorchvisionResNet, (1, 1, 1, 1), num_classes=3))
  with pytest.raises(ValueError, match="use a resnet\\*_imagenet model"):
    ti.import_state_dict(state, get_model("resnet18", 3, stage_sizes=(1, 1, 1, 1)))


def test_loading_refuses_pickled_models_and_unwraps_training_checkpoints(tmp_path):
  net = _net(tw.OdinDenseNet3, 10, 3, growth=2)
  whole = tmp_path / "densenet10.pth"
  torch.save(net, whole)  # what the ODIN authors released: a pickled module
  with pytest.raises(ValueError, match="whole pickled model") as err:
    ti.load_torch_state_dict(whole)
  message = str(err.value)
  assert "weights_only=False" in message and "torch.save(net.state_dict()" in message
  assert "densenet10_state_dict.pth" in message
  # The two lines turn it into a file that loads (needs the class importable, as here).
  converted = tmp_path / "densenet10_state_dict.pth"
  exec(message.split("\n", 1)[1].replace("  ", ""), {"torch": torch})  # pylint: disable=exec-used
  plain = ti.load_torch_state_dict(converted)
  assert set(plain) == set(net.state_dict())
  # A training checkpoint with a DataParallel prefix: unwrapped, prefix dropped.
  wrapped = tmp_path / "ckpt.pt"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
             wrapped)
  loaded = ti.load_torch_state_dict(wrapped)
  assert set(loaded) == set(plain)
  for k in plain:
    np.testing.assert_array_equal(loaded[k], plain[k])
  torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "bad.pt")
  with pytest.raises(ValueError, match="not a state dict"):
    ti.load_torch_state_dict(tmp_path / "bad.pt")
  with pytest.raises(FileNotFoundError):
    ti.load_torch_state_dict(tmp_path / "nope.pt")


def test_imported_weights_round_trip_and_are_checked_against_the_model(tmp_path):
  net = _net(tw.OdinWideResNet, 10, 4, widen_factor=1)
  model = get_model("wrn_tiny", 4)
  variables = ti.import_state_dict(_state_dict(net), model)
  assert ti.load_imported(tmp_path, model, (32, 32, 3)) is None
  ti.save_imported(tmp_path, variables, {"source": "x.pth", "layout": "wrn_odin",
                                         "sha256": "ab" * 32})
  back = ti.load_imported(tmp_path, model, (32, 32, 3))
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  assert "wrn_odin layout" in ti.describe_import(tmp_path)
  with pytest.raises(ValueError, match="do not fit the config's model"):
    ti.load_imported(tmp_path, get_model("wrn_tiny", 5), (32, 32, 3))


# --- The command line: import, then evaluate --------------------------------------------------

def test_import_torch_then_evaluate_scores_the_torch_network(tmp_path, capsys):
  """`oodjax import-torch` + `oodjax evaluate` on a random-weight file: the evaluation's
  accuracy is the PyTorch network's own on the same normalised test images."""
  net = _net(tw.OdinWideResNet, 10, 10, widen_factor=1, in_channels=1)
  path = tmp_path / "wrn.pth"
  torch.save(net.state_dict(), path)
  workdir = tmp_path / "run"
  config = str(ROOT / "configs" / "odin_fmnist.py") + ":smoke"
  sets = ["--set", "model=wrn_tiny", "--set", "eval.detectors=('msp',)",
          "--set", "eval.ood_sets=('embedded/uniform_noise',)", "--set", "eval.id_size=400",
          "--set", "eval.ood_size=400", "--set", "eval.holdout=100",
          "--set", "eval.open_set_train_size=None"]
  assert cli.main(["import-torch", str(path), "--config", config, "--workdir", str(workdir)]
                  + sets[:2]) == 0
  out = capsys.readouterr().out
  assert "wrn_odin layout" in out and "K = 10" in out and "normalization" in out
  record = json.loads((workdir / "imported" / "import.json").read_text())
  assert record["sha256"] == ti.file_sha256(path) and record["model"] == "wrn_tiny"
  assert cli.main(["evaluate", "--config", config, "--workdir", str(workdir), "--no-progress"]
                  + sets) == 0
  assert "imported from" in capsys.readouterr().out
  results = json.loads((workdir / "results.json").read_text())
  test = data.load("embedded/fashion_mnist", "test").take(slice(0, 400))
  x = data.normalize(test.images, test.mean, test.std).transpose(0, 3, 1, 2)
  with torch.no_grad():
    torch_accuracy = float((net(torch.from_numpy(x)).argmax(1).numpy() == test.labels).mean())
  assert results["accuracy"] == pytest.approx(torch_accuracy, abs=1e-9)
  # `train` does not train beside imported weights; `evaluate` with another model says so.
  assert cli.main(["train", "--config", config, "--workdir", str(workdir)] + sets) == 2
  assert "holds imported weights" in capsys.readouterr().err
  assert cli.main(["evaluate", "--config", config, "--workdir", str(workdir)]
                  + sets[2:] + ["--set", "model=wrn40_4"]) == 2
  assert "do not fit" in capsys.readouterr().err


def test_import_torch_refuses_a_pickled_model_in_one_line(tmp_path, capsys):
  net = _net(tw.OdinWideResNet, 10, 10, widen_factor=1, in_channels=1)
  torch.save(net, tmp_path / "whole.pth")
  config = str(ROOT / "configs" / "odin_fmnist.py") + ":smoke"
  assert cli.main(["import-torch", str(tmp_path / "whole.pth"), "--config", config,
                   "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert "whole pickled model" in err and "net.state_dict()" in err
  assert not (tmp_path / "w" / "imported").exists()


def test_config_normalization_reaches_every_set(tmp_path):
  from oodjax.config import load_config
  config = load_config(str(ROOT / "configs" / "odin_cifar.py") + ":densenet_c100")
  assert config.normalization.mean[0] == pytest.approx(125.3 / 255)
  plain = load_config(str(ROOT / "configs" / "fmnist_small_cnn.py"))
  with plain.unlocked():
    plain.normalization = {"mean": (0.25,), "std": (0.5,)}
  ds = data.load_config_dataset(plain, "test")
  assert ds.mean == (0.25,) and ds.std == (0.5,)
  plain.normalization = {"mean": (0.25, 0.1, 0.1), "std": (0.5, 0.5, 0.5)}
  with pytest.raises(ValueError, match="one value per channel"):
    data.load_config_dataset(plain, "test")


# --- The full-size networks the issue names (about 30 s together) --------------------------------------------

@pytest.mark.parametrize("bottleneck, sizes, zoo", [(False, (2, 2, 2, 2), "resnet18_imagenet"),
                                                    (True, (3, 4, 6, 3), "resnet50_imagenet")])
def test_full_size_torchvision_resnets(bottleneck, sizes, zoo):
  net = _net(tw.TorchvisionResNet, sizes, bottleneck, num_classes=1000)
  _check(net, get_model(zoo, 1000), _inputs((2, 64, 64, 3)),
         _stages("layer{i}", sizes, "layer{i}.{j}"), "layer4", "fc", "resnet_torchvision")


def test_full_size_odin_densenet_bc100():
  net = _net(tw.OdinDenseNet3, 100, 10)
  _check(net, get_model("densenet_bc100", 10), _inputs((2, 32, 32, 3)),
         ["block1", "block2", "block3"], "relu", "fc", "densenet_odin")


def test_full_size_odin_wrn28_10():
  net = _net(tw.OdinWideResNet, 28, 100)
  _check(net, get_model("wrn28_10", 100), _inputs((2, 32, 32, 3)),
         _stages("block{i}", (4, 4, 4), "block{i}.layer.{j}"), "relu", "fc", "wrn_odin")


# --- The papers' released-model commands, on random-weight files (slow) -----------------------

@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
  """A TFDS data dir holding a prepared "cifar10" of 48 + 48 random 32x32x3 images, 10 classes
  (TFDS writes it, as `oodjax data prepare cifar10` would, without TensorFlow: the images are
  PNG-encoded here)."""
  import io

  import tensorflow_datasets as tfds
  from PIL import Image
  root = str(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(0)

  def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()

  class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(48), "test": self._generate_examples(48)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                  "label": i % 10}

  FakeCifar10(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def _paper_path(tmp_path, capsys, net, config, data_dir, overrides, mean, std):
  """import-torch + evaluate with a paper config; returns (results, the torch accuracy)."""
  path = tmp_path / "released_state_dict.pth"
  torch.save(net.state_dict(), path)
  workdir = str(tmp_path / "run")
  assert cli.main(["import-torch", str(path), "--config", config, "--workdir", workdir]) == 0
  assert "normalization" not in capsys.readouterr().out  # the config sets it: no note
  sets = [a for o in overrides for a in ("--set", o)]
  assert cli.main(["evaluate", "--config", config, "--workdir", workdir, "--data-dir", data_dir,
                   "--no-progress"] + sets) == 0
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  test = data.load("tfds/cifar10", "test", data_dir=data_dir)
  x = data.normalize(test.images, mean, std).transpose(0, 3, 1, 2)
  with torch.no_grad():
    accuracy = float((net(torch.from_numpy(x)).argmax(1).numpy() == test.labels).mean())
  return results, accuracy


@pytest.mark.slow
def test_odin_released_densenet_command(tmp_path, capsys, fake_cifar10):
  """configs/odin_cifar.py's documented commands on a random DenseNet3 (ODIN's layout)."""
  from configs.odin_cifar import ODIN_NORMALIZATION
  net = _net(tw.OdinDenseNet3, 100, 10)
  overrides = ["eval.ood_sets=('embedded/uniform_noise:32x32x3',)", "eval.ood_size=48",
               "eval.holdout=16", "eval.batch_size=48", "eval.odin.temperatures=(1.0, 1000.0)",
               "eval.odin.epsilons=(0.0, 0.0014)", "eval.open_set_train_size=None",
               "eval.detectors=('msp', 'odin_tuned_on_ood')"]
  results, accuracy = _paper_path(tmp_path, capsys, net, str(ROOT / "configs" / "odin_cifar.py") + ":densenet_c10",
                                  fake_cifar10, overrides, **ODIN_NORMALIZATION)
  assert results["accuracy"] == pytest.approx(accuracy, abs=1e-9)
  assert {"msp", "odin_tuned_on_ood"} <= set(results["rows"])


@pytest.mark.slow
def test_sample_free_resnet50_command(tmp_path, capsys, fake_cifar10):
  """configs/sample_free_cifar.py's documented commands on a random kuangliu ResNet-50."""
  from configs.sample_free_cifar import SAMPLE_FREE_NORMALIZATION
  net = _net(tw.KuangliuResNet, (3, 4, 6, 3), 10, bottleneck=True)
  overrides = ["eval.ood_sets=('embedded/gaussian_noise:32x32x3',)", "eval.ood_size=48",
               "eval.batch_size=48", "eval.sample_free.noise_n=48",
               "eval.detectors=('msp', 'indicators', '1c_sum')",
               "eval.open_set_train_size=None"]
  results, accuracy = _paper_path(tmp_path, capsys, net, str(ROOT / "configs" / "sample_free_cifar.py") + ":r50_c10",
                                  fake_cifar10, overrides, **SAMPLE_FREE_NORMALIZATION)
  assert results["accuracy"] == pytest.approx(accuracy, abs=1e-9)
  assert "1c_sum" in results["rows"]
