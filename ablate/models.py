"""Networks for the ablations. Each takes `activation`, a factory returning an nn.Module."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Activation = Callable[[], nn.Module]


class CNN(nn.Module):
    """The seed report's CNN: 3 x (conv3x3 -> [BN] -> act -> maxpool2), then MLP 512-256-classes."""

    def __init__(self, activation: Activation, filters: Sequence[int] = (64, 128, 256),
                 batchnorm: bool = True, dropout: float = 0.5, num_classes: int = 10):
        super().__init__()
        if len(filters) > 5:  # each block halves the 32x32 input; a sixth would leave nothing
            raise ValueError(f"model.filters has {len(filters)} blocks; at most 5 fit a 32x32 image")
        layers, width = [], 3
        for out in filters:
            layers += [nn.Conv2d(width, out, 3, padding=1),
                       nn.BatchNorm2d(out) if batchnorm else nn.Identity(),
                       activation(), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(filters)  # each block halves the 32x32 input
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * side * side, 512), activation(), nn.Dropout(dropout),
            nn.Linear(512, 256), activation(), nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        return self.classifier(self.features(x))


class StridedPointwise(nn.Conv2d):
    """A strided 1x1 conv computed as "take every stride-th pixel, then a 1x1 conv".

    The two are the same function, but oneDNN's own strided 1x1 backward (its "reduce to unit
    stride" path) returns wrong weight gradients, or hangs, when the input has fewer channels than
    its vector block (8 on AVX2, 16 on AVX-512), e.g. a channels_last ResNet with width=4 on an
    AVX2 CPU. Subsampling first keeps every backend on its plain 1x1 kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return nn.functional.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)


class BasicBlock(nn.Module):
    """act(BN(conv(act(BN(conv(x))))) + shortcut(x)), shortcut = 1x1 conv + BN if the shape changes."""

    def __init__(self, activation: Activation, in_width: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = activation()
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_width != width:
            self.shortcut = nn.Sequential(StridedPointwise(in_width, width, stride),
                                          nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3x3 stem, no max-pool, BasicBlock stages, avg-pool, linear.

    Stage widths are width * (1, 2, 4, 8); every stage after the first halves the side
    (32 -> 32, 16, 8, 4). blocks=(2, 2, 2, 2), width=64 is ResNet-18 (11,173,962 params).
    """

    def __init__(self, activation: Activation, blocks: Sequence[int] = (2, 2, 2, 2),
                 width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), activation())
        stages, in_width = [], width
        for i, count in enumerate(blocks):
            out = width * 2 ** i
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(activation, in_width, out, stride))
                in_width = out
        self.stages = nn.Sequential(*stages)
        # (B, 8 * width, 4, 4) -> (B, 8 * width) -> (B, classes)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(in_width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        return self.head(self.stages(self.stem(x)))
