"""A PyTorch twin of oodjax's SmallCNN carrying the Flax weights, and the ODIN authors' released
per-configuration procedure run on it: the reference the ODIN grid is benchmarked and checked
against. Needs the `bench` extra (`pip install 'oodjax[bench]'`, torch 2.13.0 CPU).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SmallCNNTwin(nn.Module):
  """conv-BN-ReLU-maxpool blocks, Dense-ReLU, Dense: oodjax.models.SmallCNN in NCHW layout."""

  def __init__(self, widths, hidden, num_classes, in_channels, spatial):
    super().__init__()
    layers, c = [], in_channels
    for w in widths:
      layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w, eps=1e-5),
                 nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
      c, spatial = w, -(-spatial // 2)
    self.features = nn.Sequential(*layers)
    self.hidden = nn.Linear(c * spatial * spatial, hidden)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):  # x: [B, C, H, W]
    x = self.features(x)
    # Flax flattens NHWC: permute before flattening so the Dense kernel's rows line up.
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return self.head(torch.relu(self.hidden(x)))


def small_cnn_twin(variables, widths, hidden, num_classes, in_channels, spatial) -> SmallCNNTwin:
  """Builds the twin and copies the Flax SmallCNN variables into it (inference mode)."""
  net = SmallCNNTwin(widths, hidden, num_classes, in_channels, spatial)
  params, stats = variables["params"], variables["batch_stats"]
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
  with torch.no_grad():
    for i in range(len(widths)):
      conv, bn = net.features[4 * i], net.features[4 * i + 1]
      block_p, block_s = params[f"ConvBlock_{i}"], stats[f"ConvBlock_{i}"]
      conv.weight.copy_(t(block_p["Conv_0"]["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
      bn.weight.copy_(t(block_p["BatchNorm_0"]["scale"]))
      bn.bias.copy_(t(block_p["BatchNorm_0"]["bias"]))
      bn.running_mean.copy_(t(block_s["BatchNorm_0"]["mean"]))
      bn.running_var.copy_(t(block_s["BatchNorm_0"]["var"]))
    for layer, name in ((net.hidden, "Dense_0"), (net.head, "Dense_1")):
      layer.weight.copy_(t(params[name]["kernel"]).T)
      layer.bias.copy_(t(params[name]["bias"]))
  return net.eval()


def released_odin_grid(net: nn.Module, x_nhwc: np.ndarray, temperatures, epsilons, std,
                       batch_size: int = 1000) -> np.ndarray:
  """ODIN as the released code computes it: forward, backward, forward for EVERY (T, ε).

  Returns [T, E, B] scores 1 − max softmax(f(x̃)/T), higher = more OOD.
  """
  x_all = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  std_t = torch.tensor(np.asarray(std, np.float32)).reshape(1, -1, 1, 1)
  out = np.empty((len(temperatures), len(epsilons), x_all.shape[0]), np.float32)
  for ti, temperature in enumerate(temperatures):
    for ei, epsilon in enumerate(epsilons):
      for start in range(0, x_all.shape[0], batch_size):
        inputs = x_all[start:start + batch_size].clone().requires_grad_(True)
        logits = net(inputs)
        labels = logits.argmax(1)
        loss = nn.functional.cross_entropy(logits / temperature, labels, reduction="sum")
        loss.backward()
        gradient = (torch.ge(inputs.grad, 0).float() - 0.5) * 2 / std_t
        with torch.no_grad():
          perturbed = inputs - epsilon * gradient
          probs = torch.softmax(net(perturbed) / temperature, dim=1)
          out[ti, ei, start:start + batch_size] = (1 - probs.max(1).values).numpy()
  return out
