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
