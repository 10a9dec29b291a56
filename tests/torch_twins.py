"""PyTorch networks with the state-dict layouts of checkpoints users own, for import tests.

Written for these tests from the layouts' descriptions (module names, layer order, paddings),
so that `oodjax.models.torch_import` can be checked against a forward pass PyTorch computes:

* `OdinDenseNet3`: the ODIN authors' DenseNet-BC (`DenseNet3`, bottleneck, growth k,
  reduction 0.5): conv1, block{1,2,3}.layer.{j}.{bn1,conv1,bn2,conv2} (new features
  concatenated after the old ones), trans{1,2}.{bn1,conv1} + 2x2 average pool, bn1, fc.
* `OdinWideResNet`: the Wide-ResNet they ship (xternalz/WideResNet-pytorch layout): conv1,
  block{1,2,3}.layer.{j}.{bn1,conv1,bn2,conv2[,convShortcut]}; a block whose widths differ
  pre-activates its input and feeds that to both the 3x3 conv and the 1x1 shortcut; bn1, fc.
* `KuangliuResNet`: kuangliu/pytorch-cifar's ResNets (the sample-free paper's code): CIFAR stem
  conv1/bn1, layer{i}.{j} basic or bottleneck blocks (stride on the 3x3 conv) with
  `shortcut.{0,1}`, head `linear`.

* `TorchvisionResNet`: torchvision's ResNet layout (torchvision itself is not used: the PyPI
  wheel is built against CUDA torch and fails to load next to the CPU torch the bench extra
  installs): conv1 7x7/2 padding 3, bn1, ReLU, max-pool 3x3/2 padding 1, layer{1..4}.{j} of
  BasicBlocks (conv1 3x3 with the stride, bn1, conv2, bn2) or Bottlenecks (conv1 1x1, bn1,
  conv2 3x3 with the stride, bn2, conv3 1x1 to 4x, bn3), `downsample.{0,1}` (1x1 conv with the
  stride, BN) where the shape changes, average pool, fc. Its parameter counts are checked
  against torchvision's published ones (11,689,512 for ResNet-18, 25,557,032 for ResNet-50).

`randomize_` gives a network random
BatchNorm affine parameters and running statistics, so BatchNorm is not the identity.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _DenseLayer(nn.Module):

  def __init__(self, in_planes: int, growth: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(4 * growth)
    self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

  def forward(self, x):
    y = self.conv1(F.relu(self.bn1(x)))
    y = self.conv2(F.relu(self.bn2(y)))
    return torch.cat([x, y], dim=1)


class _Transition(nn.Module):

  def __init__(self, in_planes: int, out_planes: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

  def forward(self, x):
    return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class _Group(nn.Module):
  """A named container whose `layer` is the Sequential, as in both ODIN networks."""

  def __init__(self, layers):
    super().__init__()
    self.layer = nn.Sequential(*layers)

  def forward(self, x):
    return self.layer(x)


class OdinDenseNet3(nn.Module):

  def __init__(self, depth: int = 100, num_classes: int = 10, growth: int = 12,
               reduction: float = 0.5, in_channels: int = 3):
    super().__init__()
    n = (depth - 4) // 6
    planes = 2 * growth
    self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
    for i in (1, 2, 3):
      setattr(self, f"block{i}", _Group([_DenseLayer(planes + j * growth, growth)
                                         for j in range(n)]))
      planes += n * growth
      if i < 3:
        out = int(planes * reduction)
        setattr(self, f"trans{i}", _Transition(planes, out))
        planes = out
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.fc = nn.Linear(planes, num_classes)

  def forward(self, x):
    x = self.trans1(self.block1(self.conv1(x)))
    x = self.trans2(self.block2(x))
    x = self.relu(self.bn1(self.block3(x)))
    return self.fc(x.mean(dim=(2, 3)))


class _WideBlock(nn.Module):

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
    self.same_width = in_planes == out_planes
    if not self.same_width:
      self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
    return (x if self.same_width else self.convShortcut(pre)) + y


class OdinWideResNet(nn.Module):

  def __init__(self, depth: int = 28, num_classes: int = 10, widen_factor: int = 10,
               in_channels: int = 3):
    super().__init__()
    n = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
    for i, stride in ((1, 1), (2, 2), (3, 2)):
      setattr(self, f"block{i}", _Group([
          _WideBlock(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1)
          for j in range(n)]))
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.relu = nn.ReLU()
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    x = self.relu(self.bn1(x))
    return self.fc(x.mean(dim=(2, 3)))


class _KuangliuBasic(nn.Module):
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + self.shortcut(x))


class _KuangliuBottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != 4 * planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, 4 * planes, 1, stride=stride, bias=False),
          nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class KuangliuResNet(nn.Module):

  def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64,
               in_channels: int = 3, bottleneck: bool = False):
    super().__init__()
    block = _KuangliuBottleneck if bottleneck else _KuangliuBasic
    self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    planes = width
    for i, n in enumerate(num_blocks):
      blocks = []
      for j in range(n):
        blocks.append(block(planes, width * 2**i, 2 if (i and not j) else 1))
        planes = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(num_blocks)
    self.linear = nn.Linear(planes, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.linear(x.mean(dim=(2, 3)))


class _TvBasic(nn.Module):
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (self.downsample(x) if hasattr(self, "downsample") else x))


class _TvBottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if hasattr(self, "downsample") else x))


class TorchvisionResNet(nn.Module):

  def __init__(self, num_blocks=(2, 2, 2, 2), bottleneck: bool = False,
               num_classes: int = 1000, in_channels: int = 3):
    super().__init__()
    block = _TvBottleneck if bottleneck else _TvBasic
    self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    planes = 64
    for i, n in enumerate(num_blocks):
      blocks = []
      for j in range(n):
        stride = 2 if (i and not j) else 1
        b = block(planes, 64 * 2**i, stride)
        if stride != 1 or planes != 64 * 2**i * block.expansion:
          b.downsample = nn.Sequential(
              nn.Conv2d(planes, 64 * 2**i * block.expansion, 1, stride=stride, bias=False),
              nn.BatchNorm2d(64 * 2**i * block.expansion))
        blocks.append(b)
        planes = 64 * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(num_blocks)
    self.fc = nn.Linear(planes, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(x.mean(dim=(2, 3)))


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
  """Random BatchNorm scale/shift/running statistics, head weights and biases in place;
  returns `net` in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(0.5 + torch.rand(c, generator=gen))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
      elif isinstance(module, nn.Linear):  # logits of order 1-10, not PyTorch's ~0.1
        d = module.in_features
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 3 / d**0.5)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
      elif isinstance(module, nn.Conv2d) and module.bias is not None:
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return net.eval()
