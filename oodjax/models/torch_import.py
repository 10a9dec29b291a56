r"""PyTorch checkpoints into zoo variables, so the papers' released models score in oodjax.

    state = load_torch_state_dict("densenet10_state.pth")  # weights_only: no pickled code runs
    model = get_model("densenet_bc100", num_classes=10)
    variables = import_state_dict(state, model)  # layout detected from the keys

`oodjax import-torch CHECKPOINT --config C --workdir W` does this for a config's model and stores
the result in `W/imported/`, where `oodjax evaluate` and `oodjax run` take it instead of
training (`save_imported` / `load_imported`).

Layouts (state-dict key patterns) and the zoo models they map onto:

  resnet_torchvision  torchvision's ResNet-18/34/50/...: conv1, bn1, layer{1..4}.{j}.{conv1,
                      bn1, conv2, bn2[, conv3, bn3][, downsample.0, downsample.1]}, fc. The
                      ImageNet stem (7x7/2 conv, max-pool) maps onto "resnet*_imagenet"; a 3x3
                      conv1 (torchvision's class used with a CIFAR stem) onto "resnet*".
  resnet_kuangliu     the CIFAR ResNets of kuangliu/pytorch-cifar, which the sample-free
                      paper's code (jm-begon/ood_samplefree) uses: the same keys with
                      `shortcut.{0,1}` for the projection and `linear` for the head; "resnet*".
  densenet_odin       the ODIN authors' `DenseNet3` (DenseNet-BC, growth 12, reduction 0.5):
                      conv1, block{1,2,3}.layer.{j}.{bn1, conv1, bn2, conv2}, trans{1,2}.{bn1,
                      conv1}, bn1, fc; "densenet_bc100".
  wrn_odin            the Wide-ResNet port the ODIN authors ship (the layout of
                      xternalz/WideResNet-pytorch): conv1, block{1,2,3}.layer.{j}.{bn1, conv1,
                      bn2, conv2[, convShortcut]}, bn1, fc; "wrn28_10".

Tensors map as: Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; Linear weight [K, D] ->
kernel [D, K]; BatchNorm2d weight/bias -> scale/bias, running_mean/var -> batch_stats mean/var
(`num_batches_tracked` is dropped). The zoo's BatchNorm epsilon is PyTorch's default, 1e-5, and
its paddings are PyTorch's symmetric ones (k // 2, the stem pool padded by 1 on both sides), so
the imported network computes the same function; a checkpoint trained with another epsilon
would need it set on the zoo model. The conversion is checked both ways: every parameter of
the model is filled with a tensor of the right shape, and every tensor of the checkpoint is
used, else a ValueError lists what did not match.

`torch` is needed to read the file only (`pip install 'oodjax[torch]'`); the rest is numpy.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import pickle
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from oodjax.fileio import atomic_write_json
from oodjax.models.densenet import DenseNet
from oodjax.models.resnet import BottleneckBlock, ResNet, WideResNet

INSTALL_HINT = "pip install 'oodjax[torch]'"
IMPORTED_DIR = "imported"  # under a workdir: variables.msgpack and import.json

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Pair:
  """One zoo module and the PyTorch module whose tensors fill it.

  Attributes:
    path: the Flax module path, e.g. ("ResNetStage_0", "BasicBlock_1", "Conv_0").
    prefix: the PyTorch module name, e.g. "layer1.1.conv1".
    kind: "conv", "bn" or "dense".
  """
  path: Path
  prefix: str
  kind: str


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family of PyTorch state dicts: how to recognise one and how its modules pair up.

  Attributes:
    name: the name `import_state_dict(layout=...)` and `oodjax import-torch --layout` take.
    model_class: the zoo module class it maps onto.
    zoo_models: zoo names it fits, for error messages.
    signature: keys every state dict of this layout has (detection).
    excludes: keys none has (detection).
    head: the PyTorch name of the classifier layer (its weight is [K, D]).
    pairs: model -> every candidate `Pair`; a pair whose module neither side has is skipped
      (an optional projection), one side only is a mismatch.
  """
  name: str
  model_class: type
  zoo_models: str
  signature: tuple[str, ...]
  excludes: tuple[str, ...]
  head: str
  pairs: Callable[[nn.Module], list[Pair]]


def _block_name(block) -> str:
  """The class name Flax gives a block built from `block` (a class or a functools.partial)."""
  return getattr(block, "func", block).__name__


def _resnet_pairs(model: ResNet, shortcut: str, head: str) -> list[Pair]:
  pairs = [Pair(("Conv_0",), "conv1", "conv"), Pair(("BatchNorm_0",), "bn1", "bn")]
  block = _block_name(model.block)
  convs = 3 if getattr(model.block, "func", model.block) is BottleneckBlock else 2
  for i, num_blocks in enumerate(model.stage_sizes):
    for j in range(num_blocks):
      base, prefix = (f"ResNetStage_{i}", f"{block}_{j}"), f"layer{i + 1}.{j}"
      for c in range(convs):
        pairs.append(Pair(base + (f"Conv_{c}",), f"{prefix}.conv{c + 1}", "conv"))
        pairs.append(Pair(base + (f"BatchNorm_{c}",), f"{prefix}.bn{c + 1}", "bn"))
      # The projection shortcut is created last in the block: Conv_<convs>, BatchNorm_<convs>.
      pairs.append(Pair(base + (f"Conv_{convs}",), f"{prefix}.{shortcut}.0", "conv"))
      pairs.append(Pair(base + (f"BatchNorm_{convs}",), f"{prefix}.{shortcut}.1", "bn"))
  pairs.append(Pair(("Dense_0",), head, "dense"))
  return pairs


def _wrn_pairs(model: WideResNet) -> list[Pair]:
  num_blocks = (model.depth - 4) // 6
  pairs = [Pair(("Conv_0",), "conv1", "conv")]
  for i in range(3):
    for j in range(num_blocks):
      base, prefix = (f"ResNetStage_{i}", f"WideBasicBlock_{j}"), f"block{i + 1}.layer.{j}"
      pairs += [Pair(base + ("NormReLU_0", "BatchNorm_0"), f"{prefix}.bn1", "bn"),
                Pair(base + ("Conv_0",), f"{prefix}.conv1", "conv"),
                Pair(base + ("NormReLU_1", "BatchNorm_0"), f"{prefix}.bn2", "bn"),
                Pair(base + ("Conv_1",), f"{prefix}.conv2", "conv"),
                Pair(base + ("Conv_2",), f"{prefix}.convShortcut", "conv")]
  pairs += [Pair(("NormReLU_0", "BatchNorm_0"), "bn1", "bn"), Pair(("Dense_0",), "fc", "dense")]
  return pairs


def _densenet_pairs(model: DenseNet) -> list[Pair]:
  stages = model.stage_sizes or (((model.depth - 4) // 6),) * 3
  pairs = [Pair(("Conv_0",), "conv1", "conv")]
  for i, num_layers in enumerate(stages):
    for j in range(num_layers):
      base, prefix = (f"DenseStage_{i}", f"DenseLayer_{j}"), f"block{i + 1}.layer.{j}"
      pairs += [Pair(base + ("NormReLU_0", "BatchNorm_0"), f"{prefix}.bn1", "bn"),
                Pair(base + ("Conv_0",), f"{prefix}.conv1", "conv"),
                Pair(base + ("NormReLU_1", "BatchNorm_0"), f"{prefix}.bn2", "bn"),
                Pair(base + ("Conv_1",), f"{prefix}.conv2", "conv")]
    if i < len(stages) - 1:
      pairs += [Pair((f"Transition_{i}", "NormReLU_0", "BatchNorm_0"), f"trans{i + 1}.bn1", "bn"),
                Pair((f"Transition_{i}", "Conv_0"), f"trans{i + 1}.conv1", "conv")]
  pairs += [Pair(("NormReLU_0", "BatchNorm_0"), "bn1", "bn"), Pair(("Dense_0",), "fc", "dense")]
  return pairs


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("resnet_torchvision", ResNet, "resnet18/34/50_imagenet (or resnet18/34/50 for a 3x3 "
           "conv1)", ("conv1.weight", "layer1.0.conv1.weight", "fc.weight"), ("linear.weight",), "fc",
           lambda m: _resnet_pairs(m, "downsample", "fc")),
    Layout("resnet_kuangliu", ResNet, "resnet18/34/50",
           ("conv1.weight", "layer1.0.conv1.weight", "linear.weight"), ("fc.weight",), "linear",
           lambda m: _resnet_pairs(m, "shortcut", "linear")),
    Layout("densenet_odin", DenseNet, "densenet_bc100",
           ("conv1.weight", "block1.layer.0.bn1.weight", "trans1.conv1.weight", "fc.weight"), (), "fc",
           _densenet_pairs),
    Layout("wrn_odin", WideResNet, "wrn28_10 (or wrn40_4, ...)",
           ("conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv2.weight",
            "fc.weight"), ("trans1.conv1.weight",), "fc",
           _wrn_pairs),
)}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as numpy arrays, without running pickled code.

  The file is read with `torch.load(..., weights_only=True)`, which only rebuilds tensors and
  plain containers. Accepted: a state dict, or a dict holding one under "state_dict",
  "model_state_dict", "model" or "net" (training checkpoints); a "module." prefix on every key
  (nn.DataParallel) is removed.

  Raises:
    ImportError: torch is not installed (the message says how to install it).
    FileNotFoundError: no such file.
    ValueError: the file holds a whole pickled model (or other objects) rather than tensors;
      the message gives the two lines that make a state dict of it.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading a PyTorch checkpoint needs torch: {INSTALL_HINT}") from None
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path!r}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f"{path} is not a plain state dict (torch.load(weights_only=True) refused it: "
        f"{first[:200]}). It probably holds a whole pickled model, as the ODIN authors' "
        "released .pth files do; oodjax never unpickles code. If you trust the file, make a "
        "state dict of it once, in Python with the model's class importable (for ODIN's "
        "files: run from its code/ folder):\n"
        f"  net = torch.load({path!r}, map_location='cpu', weights_only=False)\n"
        f"  torch.save(net.state_dict(), {_state_dict_name(path)!r})") from None
  obj = _unwrap(obj, path)
  return {key: value.detach().to(torch.float32).numpy() if value.is_floating_point()
          else value.detach().numpy() for key, value in obj.items()}


def _state_dict_name(path: str) -> str:
  root, ext = os.path.splitext(path)
  return f"{root}_state_dict{ext or '.pth'}"


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top

  def all_tensors(d):
    return isinstance(d, Mapping) and d and all(isinstance(v, torch.Tensor) for v in d.values())

  if not all_tensors(obj) and isinstance(obj, Mapping):
    for key in ("state_dict", "model_state_dict", "model", "net"):
      if all_tensors(obj.get(key)):
        obj = obj[key]
        break
  if not all_tensors(obj):
    what = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
            else type(obj).__name__)
    raise ValueError(f"{path} holds {what}, not a state dict of tensors (nor one under "
                     "'state_dict', 'model_state_dict', 'model' or 'net')")
  keys = list(obj)
  if all(k.startswith("module.") for k in keys):  # saved from nn.DataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """The name of the one layout whose signature keys `state_dict` has.

  Raises:
    ValueError: no layout (or more than one) matches; the message lists a few keys.
  """
  found = [layout.name for layout in LAYOUTS.values()
           if all(k in state_dict for k in layout.signature)
           and not any(k in state_dict for k in layout.excludes)]
  if len(found) != 1:
    raise ValueError(f"cannot tell the checkpoint's layout (matching: {found or 'none'}); "
                     f"known layouts: {sorted(LAYOUTS)}; the checkpoint's first keys: "
                     f"{list(state_dict)[:6]}")
  return found[0]


def num_classes_of(state_dict: Mapping[str, Any], layout: str) -> int:
  """K, the rows of the layout's classifier weight."""
  key = f"{LAYOUTS[layout].head}.weight"
  if key not in state_dict:
    raise ValueError(f"a {layout} checkpoint has {key!r}; this one does not")
  return int(np.shape(state_dict[key])[0])


def _convert(kind: str, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(params, batch_stats) of one Flax module from its PyTorch tensors (suffix -> array)."""
  if kind == "conv":
    params = {"kernel": tensors["weight"].transpose(2, 3, 1, 0)}
    if "bias" in tensors:
      params["bias"] = tensors["bias"]
    return params, {}
  if kind == "dense":
    params = {"kernel": tensors["weight"].T}
    if "bias" in tensors:
      params["bias"] = tensors["bias"]
    return params, {}
  return ({"scale": tensors["weight"], "bias": tensors["bias"]},
          {"mean": tensors["running_mean"], "var": tensors["running_var"]})


def import_state_dict(state_dict: Mapping[str, np.ndarray], model: nn.Module, *,
                      layout: str | None = None,
                      input_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """Zoo variables {"params", "batch_stats"} holding a PyTorch state dict's tensors.

  Args:
    state_dict: name -> array, e.g. from `load_torch_state_dict`.
    model: the zoo model to fill (`get_model(...)`); its class must be the layout's, with the
      same depth, widths and number of classes as the checkpoint.
    layout: one of `LAYOUTS`; None detects it from the keys (`detect_layout`).
    input_shape: (H, W, C) used to build the model's variable shapes; None takes C from the
      first convolution and H = W = 32 (the parameters do not depend on H and W).

  Returns:
    The variables, float32 numpy arrays, for `model.apply(variables, x)` with NHWC inputs.

  Raises:
    ValueError: unknown layout, a model of another class, or any tensor or parameter left
      unmatched or of another shape (all of them listed, up to 10 each).
  """
  layout = detect_layout(state_dict) if layout is None else layout
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
  spec = LAYOUTS[layout]
  if not isinstance(model, spec.model_class):
    raise ValueError(f"a {layout} checkpoint fills a {spec.model_class.__name__} "
                     f"({spec.zoo_models}), not a {type(model).__name__}")
  if input_shape is None:
    channels = int(np.shape(state_dict["conv1.weight"])[1]) if "conv1.weight" in state_dict \
        else 3
    input_shape = (32, 32, channels)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
  # (collection, *module path, name) -> ShapeDtypeStruct, and the module paths with params.
  targets = traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  modules = {key[1:-1] for key in targets if key[0] == "params"}
  filled: dict[tuple[str, ...], np.ndarray] = {}
  used: set[str] = set()
  missing, unexpected, wrong = [], [], []
  for pair in spec.pairs(model):
    suffixes = {"conv": ("weight", "bias"), "dense": ("weight", "bias"),
                "bn": ("weight", "bias", "running_mean", "running_var")}[pair.kind]
    tensors = {s: state_dict[f"{pair.prefix}.{s}"] for s in suffixes
               if f"{pair.prefix}.{s}" in state_dict}
    has_flax = pair.path in modules
    if not tensors and not has_flax:
      continue  # e.g. a block without projection shortcut: neither side has it
    if not has_flax:
      unexpected.append(f"{pair.prefix}.*")
      continue
    if "weight" not in tensors or (pair.kind == "bn" and len(tensors) < 4):
      missing.append(f"{pair.prefix}.{{{','.join(s for s in suffixes if s not in tensors)}}} "
                     f"(for {'/'.join(pair.path)})")
      continue
    used.update(f"{pair.prefix}.{s}" for s in tensors)
    used.add(f"{pair.prefix}.num_batches_tracked")
    params, stats = _convert(pair.kind, tensors)
    for collection, values in (("params", params), ("batch_stats", stats)):
      for name, value in values.items():
        key = (collection, *pair.path, name)
        target = targets.get(key)
        where = f"{pair.prefix} -> {'/'.join(key)}"
        if target is None:
          wrong.append(f"{where}: the zoo module has no {name!r}")
        elif tuple(value.shape) != tuple(target.shape):
          wrong.append(f"{where}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
        else:
          filled[key] = np.asarray(value, dtype=target.dtype)
  unexpected += sorted(k for k in state_dict if k not in used
                       and not k.endswith("num_batches_tracked"))
  unfilled = ["/".join(key) for key in targets if key not in filled]
  problems = [(title, items) for title, items in (
      ("shapes that differ", wrong), ("checkpoint tensors missing", missing),
      ("checkpoint tensors no module takes", unexpected),
      ("model variables left unfilled", unfilled)) if items]
  if problems:
    hint = ""
    if layout == "resnet_torchvision" and np.shape(state_dict.get("conv1.weight", ()))[-1:] \
        == (7,) and getattr(model, "stem", None) != "imagenet":
      hint = " (the checkpoint has the 7x7 ImageNet stem: use a resnet*_imagenet model)"
    detail = "; ".join(f"{title} ({len(items)}): {items[:10]}" for title, items in problems)
    raise ValueError(f"the {layout} checkpoint does not fit {type(model).__name__} "
                     f"{_describe(model)}{hint}: {detail}")
  return traverse_util.unflatten_dict(filled)


def _describe(model: nn.Module) -> str:
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  fields = {k: getattr(v, "__name__", getattr(getattr(v, "func", None), "__name__", v))
            for k, v in fields.items()}
  return "(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"


# ---------------------------------------------------------------------------------------------
# Imported weights in a workdir (what `oodjax import-torch` writes, `evaluate` / `run` read)


def imported_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / IMPORTED_DIR / "variables.msgpack"


def save_imported(workdir: str | os.PathLike, variables: Mapping[str, Any],
                  info: Mapping[str, Any]) -> pathlib.Path:
  """Writes imported variables and a record of where they came from to `workdir/imported/`.

  `variables.msgpack` (Flax msgpack) is written atomically; `import.json` holds `info` plus the
  time of the import.
  """
  path = imported_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".msgpack.tmp")
  tmp.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(dict(variables))))
  os.replace(tmp, path)
  record = dict(info, imported_at=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"))
  atomic_write_json(path.with_name("import.json"), record)
  return path


def load_imported(workdir: str | os.PathLike, model: nn.Module,
                  input_shape: tuple[int, int, int]) -> dict[str, Any] | None:
  """The variables `save_imported` wrote to `workdir`, checked against `model`; None if none.

  Raises:
    ValueError: they do not fit `model` at `input_shape` (another config's model, K, ...).
  """
  path = imported_path(workdir)
  if not path.exists():
    return None
  variables = flax.serialization.msgpack_restore(path.read_bytes())
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
  want = jax.tree.map(lambda a: tuple(a.shape), flax.core.unfreeze(abstract))
  have = jax.tree.map(lambda a: tuple(np.shape(a)), variables)
  if want != have:
    raise ValueError(f"the weights imported into {path} do not fit the config's model "
                     f"{type(model).__name__} {_describe(model)} at input {input_shape}: "
                     "import them again for this config, or use the config they were imported "
                     "for (see import.json beside them)")
  return variables


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def describe_import(workdir: str | os.PathLike) -> str:
  """One line on the weights imported into `workdir` (from import.json)."""
  record = json.loads(imported_path(workdir).with_name("import.json").read_text())
  return (f"imported from {record.get('source')} ({record.get('layout')} layout, "
          f"sha256 {str(record.get('sha256'))[:12]}...)")
