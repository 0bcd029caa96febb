"""The reference path: a DenseNet in plain PyTorch, the oracle every kernel is tested against.

Written to be obviously right rather than fast: each layer concatenates its inputs and applies
BatchNorm, ReLU and convolution exactly as the paper and torchvision describe. Nothing is folded.
Module names match torchvision's, so a torchvision state dict loads as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import NO_CLASSIFIER, DenseNetSpec


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3 (bottleneck), or BN-ReLU-conv3x3 (plain)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None, eps: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels, eps=eps)
        if bn_size is None:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate, eps=eps)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bn_size is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        if self.bottleneck:
            out = self.conv2(F.relu(self.norm2(out)))
        return out


class DenseBlock(nn.ModuleDict):
    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, bn_size: int | None, eps: float):
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, eps)
                for i in range(num_layers)
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            # Dense connectivity: every layer sees the concatenation of all earlier outputs.
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, eps=eps)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), kernel_size=2, stride=2)


class ReferenceDenseNet(nn.Module):
    def __init__(self, spec: DenseNetSpec):
        super().__init__()
        self.spec = spec
        c0, eps = spec.num_init_features, spec.bn_eps
        self.features = nn.Sequential()
        if spec.stem == "imagenet":
            self.features.add_module("conv0", nn.Conv2d(spec.in_channels, c0, 7, stride=2, padding=3, bias=False))
            self.features.add_module("norm0", nn.BatchNorm2d(c0, eps=eps))
            self.features.add_module("relu0", nn.ReLU())
            self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.features.add_module("conv0", nn.Conv2d(spec.in_channels, c0, 3, padding=1, bias=False))
        channels = spec.block_channels()
        transitions = spec.transition_channels()
        for b, layers in enumerate(spec.block_config, start=1):
            c_in, c_end = channels[b - 1]
            self.features.add_module(f"denseblock{b}", DenseBlock(c_in, layers, spec.growth_rate, spec.bn_size, eps))
            if b < len(spec.block_config):
                self.features.add_module(f"transition{b}", Transition(c_end, transitions[b - 1], eps))
        self.features.add_module("norm5", nn.BatchNorm2d(spec.num_features, eps=eps))
        # A backbone saved without its classifier (num_classes 0) gives features only.
        self.classifier = nn.Linear(spec.num_features, spec.num_classes) if spec.num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: Kaiming-normal convs, unit BatchNorm, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, C]: what the classifier sees."""
        out = F.relu(self.features(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ValueError(NO_CLASSIFIER)
        return self.classifier(self.forward_features(x))
