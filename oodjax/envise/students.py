"""ENVISE students: binary networks (BSN) from the zoo's architectures and their real twins (RvSN).

    student = get_student("binary_vgg16", num_classes=17)               # BSN, the paper's default
    rvsn = get_student("binary_vgg16", num_classes=17, binary=False)    # same tree, real-valued
    variables = rvsn.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits = binary_twin(rvsn).apply(variables, x)  # the RvSN "directly binarised" (Figure 3)

Every student maps normalised NHWC float32 images to logits [B, K] and takes `train` like the
zoo's models (training needs `mutable=["batch_stats"]`). As in the paper (Sec. 4, after
Rastegari et al. 2016) the first convolution (`stem`) and the classifier (`head`, an `nn.Dense`
whose output is the model's output) are real-valued; every other conv or hidden Dense layer is a
`BinaryConv` / `BinaryDense`, shortcut projections included.

Block order. A binary unit is `BinaryConvBlock`: BatchNorm -> sign -> binary conv (XNOR-Net,
Fig. 3 of Rastegari et al.: BNorm, BinActiv, BinConv, Pool). The sign sits inside `BinaryConv`
(inputs are binarised after zero padding). No ReLU ever precedes a sign: sign(ReLU(z)) would be
+1 everywhere (sign(0) = +1). Pooling follows the conv, on real-valued outputs. The networks are
therefore pre-activation networks: the stem's output goes straight into the first unit, and a
final `NormReLU` (BatchNorm -> ReLU) before the head gives the real, non-negative feature map
Grad-CAM weights and the features the head reads.

Real twin. `binary=False` swaps, inside each unit, the sign for a ReLU and `BinaryConv` /
`BinaryDense` for `nn.Conv` / `nn.Dense` (no bias, the same initialisers and explicit names), so
the BSN and RvSN have identical parameter trees, and the same key initialises them to identical
values. Applying the binary student to an RvSN's variables is the "directly binarised RvSN"
baseline of Figure 3 (`binary_twin`).

Differences from the zoo's networks, all for binarisation: BatchNorm in AlexNet (binary units
need it; the twin has it too), student dropout off by default (binary weights regularise, and a
rate of 0 needs no "dropout" rng during the online phase), pre-activation ResNet blocks whose
projection shortcut is a binary 1x1 unit, and "SAME" padding everywhere (`BinaryConv` pads as
`lax.conv`; at stride 2 the 3x3 windows are centred one pixel lower/right of the zoo's symmetric
padding).

Naming follows `oodjax.models.layers`: units end in "Block", groups at one resolution in
"Stage", pooling is `MaxPool`, so `forward_with_insides(..., which=("feature_map", "head"))`
finds the final `NormReLU` output and the head.

References:
  Sharma et al., ENVISE (ICLR 2021 submission), Sec. 3 (binarisation) and Sec. 4 (BSN: binary
  VGG-16, AlexNet, ResNet-18, ResNet-50; first and last layers real).
  Rastegari et al. 2016, XNOR-Net, Sec. 3.2 and Fig. 3 (block order).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from oodjax.envise.binary import BinaryConv, BinaryDense
from oodjax.models.cnn import VGG16_STAGES
from oodjax.models.layers import BatchNorm, MaxPool, NormReLU, conv_init, global_avg_pool


def _stem(features: int, kernel_size: int) -> nn.Conv:
  # Real-valued first layer; a BatchNorm follows (in the next unit), so no bias.
  k = kernel_size
  return nn.Conv(features, (k, k), padding="SAME", use_bias=False, kernel_init=conv_init,
                 name="stem")


class BinaryConvBlock(nn.Module):
  """BatchNorm -> sign -> `BinaryConv` (binary) or BatchNorm -> ReLU -> `nn.Conv` (real twin).

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: step in both spatial directions ("SAME" padding: output ceil(H / strides)).
    binary: binary unit (True) or its real-valued twin (False); same parameters either way:
      norm/{scale, bias}, conv/kernel [k, k, C_in, features].
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), features]."""
    x = BatchNorm(name="norm")(x, use_running_average=not train)
    if self.binary:
      return BinaryConv(self.features, self.kernel_size, self.strides, name="conv")(x)
    k, s = self.kernel_size, self.strides
    return nn.Conv(self.features, (k, k), strides=(s, s), padding="SAME", use_bias=False,
                   kernel_init=conv_init, name="conv")(nn.relu(x))


class BinaryDenseBlock(nn.Module):
  """BatchNorm -> sign -> `BinaryDense` (binary) or BatchNorm -> ReLU -> `nn.Dense` (real).

  Attributes:
    features: output width D.
    binary: binary unit or its real twin; parameters norm/{scale, bias}, dense/kernel [D_in, D].
  """
  features: int
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, D_in] -> [B, features]."""
    x = BatchNorm(name="norm")(x, use_running_average=not train)
    if self.binary:
      return BinaryDense(self.features, name="dense")(x)
    return nn.Dense(self.features, use_bias=False, name="dense")(nn.relu(x))


class BinaryVGGStage(nn.Module):
  """`BinaryConvBlock`s at one resolution (the max-pool after it belongs to the parent)."""
  widths: tuple[int, ...]
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.widths:
      x = BinaryConvBlock(width, binary=self.binary)(x, train)
    return x


class BinaryVGG(nn.Module):
  """Binary VGG (the paper's default BSN): real stem, binary stages, NormReLU, real head.

  The first conv of the first stage is the real `stem`; the other convs of `stages` are binary
  units; each stage is followed by a 2x2 max-pool, the last one after the final `NormReLU`
  (the feature map). At 32x32 VGG-16 ends in a 1x1x512 map and the head is Dense 512 -> K, as
  the zoo's CIFAR VGG.

  Attributes:
    num_classes: K.
    stages: conv widths per stage, e.g. `VGG16_STAGES`; stages[0] must not be empty.
    binary: BSN (True) or RvSN (False).
  """
  num_classes: int
  stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    if not self.stages or not self.stages[0]:
      raise ValueError(f"BinaryVGG needs a non-empty first stage (its first width is the "
                       f"real stem), got stages={self.stages}")
    x = _stem(self.stages[0][0], 3)(x)
    for i, widths in enumerate(self.stages):
      x = BinaryVGGStage(tuple(widths[1:] if i == 0 else widths), self.binary)(x, train)
      if i == len(self.stages) - 1:
        x = NormReLU()(x, train)  # the feature map [B, h, w, C]
      x = MaxPool()(x)
    x = x.reshape(x.shape[0], -1)  # [B, D]
    return nn.Dense(self.num_classes, name="head")(x)


class BinaryAlexNet(nn.Module):
  """Binary AlexNet at 32x32, as the zoo's AlexNet: 5 convs (5, 5, 3, 3, 3), 3x3/2 max-pools
  after the first, second and fifth, two hidden Dense layers, the head.

  Real: the 5x5 stem and the head. Binary: convs 2-5 and both hidden layers (XNOR-Net
  binarises AlexNet's fully connected layers too). A `NormReLU` after conv 5 gives the feature
  map; another after the hidden layers gives the head's non-negative features.

  Attributes:
    num_classes: K.
    widths: channels of the five conv layers.
    hidden: width D of the two hidden layers.
    dropout_rate: dropout before each hidden layer when training (0 by default, see the module
      docstring; a positive rate needs a "dropout" rng in training).
    binary: BSN (True) or RvSN (False).
  """
  num_classes: int
  widths: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)
  hidden: int = 1024
  dropout_rate: float = 0.0
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    if len(self.widths) != 5:
      raise ValueError(f"BinaryAlexNet has five conv layers, got widths={self.widths}")
    x = MaxPool(window=3, stride=2)(_stem(self.widths[0], 5)(x))
    for i, (width, k) in enumerate(zip(self.widths[1:], (5, 3, 3, 3)), start=1):
      x = BinaryConvBlock(width, kernel_size=k, binary=self.binary)(x, train)
      if i == 1:
        x = MaxPool(window=3, stride=2)(x)
    x = NormReLU()(x, train)  # the feature map [B, h, w, C]
    x = MaxPool(window=3, stride=2)(x)
    x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * C] at 32x32
    for _ in range(2):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = BinaryDenseBlock(self.hidden, binary=self.binary)(x, train)  # [B, D]
    x = NormReLU()(x, train)
    return nn.Dense(self.num_classes, name="head")(x)


class BinaryBasicBlock(nn.Module):
  """Two 3x3 binary units with a residual connection (ResNet-18/34 basic block,
  pre-activation order); a binary 1x1 unit projects the shortcut when the shape changes.

  Attributes:
    features: output channels.
    strides: stride of the first unit and of the projection.
    binary: BSN or RvSN.
  """
  features: int
  strides: int = 1
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, features]."""
    unit = functools.partial(BinaryConvBlock, binary=self.binary)
    y = unit(self.features, 3, self.strides)(x, train)
    y = unit(self.features, 3)(y, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = unit(self.features, 1, self.strides)(x, train)
    return x + y


class BinaryBottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x `expansion`) binary units with a residual
  connection (ResNet-50 bottleneck, pre-activation order, stride on the 3x3 as the zoo's).

  Attributes:
    features: channels of the 3x3 unit; the block outputs expansion * features.
    strides: stride of the 3x3 unit and of the projection.
    binary: BSN or RvSN.
    expansion: output channels per `features`.
  """
  features: int
  strides: int = 1
  binary: bool = True
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C_in] -> [B, H / strides, W / strides, expansion * features]."""
    unit = functools.partial(BinaryConvBlock, binary=self.binary)
    out_features = self.features * self.expansion
    y = unit(self.features, 1)(x, train)
    y = unit(self.features, 3, self.strides)(y, train)
    y = unit(out_features, 1)(y, train)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = unit(out_features, 1, self.strides)(x, train)
    return x + y


class BinaryResNetStage(nn.Module):
  """`num_blocks` blocks at one resolution; the first applies `strides`.

  Attributes:
    block: `BinaryBasicBlock` or `BinaryBottleneckBlock`, called as
      `block(features, strides=..., binary=...)(x, train)`.
    num_blocks: number of blocks.
    features: the blocks' `features`.
    strides: stride of the first block.
    binary: BSN or RvSN.
  """
  block: Callable[..., nn.Module]
  num_blocks: int
  features: int
  strides: int = 1
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.features, strides=self.strides if i == 0 else 1,
                     binary=self.binary)(x, train)
    return x


class BinaryResNet(nn.Module):
  """Binary ResNet, CIFAR style as the zoo's: real 3x3 stem (stride 1, no max-pool), binary
  stages (stage i has width * 2**i channels, stride 2 from the second on), NormReLU (the
  feature map), global average pool, real head.

  Attributes:
    num_classes: K.
    stage_sizes: blocks per stage: (2, 2, 2, 2) ResNet-18, (3, 4, 6, 3) ResNet-50.
    block: `BinaryBasicBlock` or `BinaryBottleneckBlock`.
    width: channels of the stem and of the first stage.
    binary: BSN or RvSN.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Callable[..., nn.Module] = BinaryBasicBlock
  width: int = 64
  binary: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> logits [B, K]."""
    x = _stem(self.width, 3)(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      x = BinaryResNetStage(self.block, num_blocks, self.width * 2**i,
                            strides=1 if i == 0 else 2, binary=self.binary)(x, train)
    x = NormReLU()(x, train)  # the feature map [B, h, w, C]
    return nn.Dense(self.num_classes, name="head")(global_avg_pool(x))  # [B, D] -> [B, K]


partial = functools.partial

STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "binary_vgg16": partial(BinaryVGG, stages=VGG16_STAGES),
    "binary_alexnet": BinaryAlexNet,
    "binary_resnet18": partial(BinaryResNet, stage_sizes=(2, 2, 2, 2), block=BinaryBasicBlock),
    "binary_resnet50": partial(BinaryResNet, stage_sizes=(3, 4, 6, 3),
                               block=BinaryBottleneckBlock),
    # Tiny variants for tests and the short embedded scenario: the same code paths (binary and
    # real units, strided projections, pools), a few thousand parameters, 28x28x1 or 32x32x3.
    "binary_tiny": partial(BinaryVGG, stages=((4, 8), (16,))),
    # A small binary VGG for the embedded experiments (28x28x1): 4 convs, ~15 K parameters;
    # its real twin costs ~4.7 M MACs, the binary student ~0.2 M FLOPs (XNOR-Net count).
    "binary_vgg_small": partial(BinaryVGG, stages=((16, 16), (32, 32))),
    "binary_alexnet_tiny": partial(BinaryAlexNet, widths=(4, 8, 8, 8, 8), hidden=16),
    "binary_resnet_tiny": partial(BinaryResNet, stage_sizes=(1, 1), block=BinaryBasicBlock,
                                  width=4),
    "binary_resnet_bottleneck_tiny": partial(BinaryResNet, stage_sizes=(1, 1),
                                             block=BinaryBottleneckBlock, width=2),
}


def get_student(name: str, num_classes: int, binary: bool = True, **kwargs) -> nn.Module:
  """The student `name` with K = `num_classes`: the BSN, or with `binary=False` its RvSN twin.

  Args:
    name: a key of `STUDENTS`.
    num_classes: K, the width of the head.
    binary: binary student (True) or the real-valued twin with the same parameter tree.
    **kwargs: overrides of the module's attributes (e.g. `width=16`).
  """
  if name not in STUDENTS:
    raise ValueError(f"unknown student {name!r}; known: {sorted(STUDENTS)}")
  return STUDENTS[name](num_classes=num_classes, binary=binary, **kwargs)


def binary_twin(model: nn.Module, binary: bool = True) -> nn.Module:
  """The same student with `binary` set: `binary_twin(rvsn).apply(rvsn_variables, x)` runs the
  RvSN "directly binarised" (Figure 3's baseline: its latent weights read as alpha * sign(W),
  its activations signed, no retraining); `binary_twin(bsn, False)` is the RvSN.

  Args:
    model: a student module (any module with a `binary` attribute, e.g. from `get_student`).
    binary: the value of `binary` in the returned copy.
  """
  if not hasattr(model, "binary"):
    raise ValueError(f"{type(model).__name__} has no `binary` attribute; pass a student from "
                     "`get_student`")
  return model.clone(binary=binary)
