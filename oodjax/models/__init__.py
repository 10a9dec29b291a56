"""The model zoo: CIFAR/MNIST-size classifiers and the functional access to their insides.

Every model maps normalised NHWC float32 images to logits: `model.apply(variables, x,
train=False)` -> [B, K]. Training mode needs `mutable=["batch_stats"]` for models with
BatchNorm and `rngs={"dropout": key}` for AlexNet and a WRN with dropout. Variants are
`functools.partial`s of the module classes; each family has a tiny variant for tests.

    model = get_model("resnet18", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits, insides = forward_with_insides(model, variables, x)
    apply_fn = inference_apply(model)  # (variables, x) -> logits, hashable: a static jit argument
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from oodjax.models.cnn import VGG, AlexNet, SmallCNN, VGGStage
from oodjax.models.densenet import DenseLayer, DenseNet, DenseStage, Transition
from oodjax.models.insides import (ALL_INSIDES, ChannelSums, InferenceApply, Insides,
                                   channel_sums, feature_map_gradient,
                                   forward_with_insides, inference_apply, is_block_or_stage,
                                   is_pool, is_stage, is_top_level, normalize_with_running_stats)
from oodjax.models.layers import ConvBlock, MaxPool, NormReLU
from oodjax.models.resnet import (BasicBlock, BottleneckBlock, ResNet, ResNetStage,
                                  WideBasicBlock, WideResNet)

partial = functools.partial

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    "resnet34": partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    "resnet50": partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock),
    # torchvision's ImageNet layout (7x7/2 stem + max-pool), for imported checkpoints.
    "resnet18_imagenet": partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock,
                                 stem="imagenet"),
    "resnet34_imagenet": partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock,
                                 stem="imagenet"),
    "resnet50_imagenet": partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock,
                                 stem="imagenet"),
    "wrn28_10": partial(WideResNet, depth=28, widen_factor=10),
    "wrn40_4": partial(WideResNet, depth=40, widen_factor=4),
    "densenet_bc100": partial(DenseNet, depth=100, growth_rate=12, compression=0.5),
    # DenseNet-121's stages and growth rate with the CIFAR stem (3x3 conv, no max-pool), as the
    # sample-free paper trains it on CIFAR.
    "densenet121": partial(DenseNet, stage_sizes=(6, 12, 24, 16), growth_rate=32,
                           compression=0.5),
    # DenseNet-201 (stages (6, 12, 48, 32), k = 32) with the same CIFAR stem: the ENVISE
    # paper's teacher on CIFAR-100 (configs/envise_cifar.py).
    "densenet201": partial(DenseNet, stage_sizes=(6, 12, 48, 32), growth_rate=32,
                           compression=0.5),
    # A wider small CNN: ENVISE's teacher in experiments/envise (~16.5 M MACs at 28x28x1,
    # four times "small_cnn", so that the students cost a fraction of it as in the paper).
    "small_cnn_wide": partial(SmallCNN, widths=(64, 128), hidden=256),
    "vgg16": VGG,
    "alexnet": AlexNet,
    # Tiny variants: same code paths (BN, projections, dropout), a few thousand parameters.
    "small_cnn_tiny": partial(SmallCNN, widths=(4, 8), hidden=16),
    "resnet_tiny": partial(ResNet, stage_sizes=(1, 1), block=BasicBlock, width=8),
    "wrn_tiny": partial(WideResNet, depth=10, widen_factor=1),
    "densenet_tiny": partial(DenseNet, depth=10, growth_rate=4),
    "vgg_tiny": partial(VGG, stages=((8,), (16, 16))),
    "alexnet_tiny": partial(AlexNet, widths=(8, 16, 16, 16, 16), hidden=32),
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Returns the model `name` with K = `num_classes`; `kwargs` override its attributes."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
    "ALL_INSIDES", "MODELS", "AlexNet", "BasicBlock", "BottleneckBlock", "ChannelSums",
    "ConvBlock",
    "DenseLayer", "DenseNet", "DenseStage", "InferenceApply", "Insides", "MaxPool", "NormReLU", "ResNet",
    "ResNetStage",
    "SmallCNN", "Transition", "VGG", "VGGStage", "WideBasicBlock", "WideResNet",
    "channel_sums", "feature_map_gradient", "forward_with_insides", "get_model", "inference_apply",
    "is_block_or_stage",
    "is_pool", "is_stage", "is_top_level", "normalize_with_running_stats",
]
