"""VGG-A (VGG-11) for 32x32 inputs, with or without BatchNorm, for the BN study."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ablate.models import Activation

# VGG-A's eight conv widths; a 2x2 max-pool follows the convs at these (0-based) positions,
# which gives the layout 64 M 128 M 256 256 M 512 512 M 512 512 M.
VGG_A_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
POOL_AFTER = (0, 1, 3, 5, 7)


class VGG(nn.Module):
    """VGG-A: 8 x (conv3x3 -> [BN] -> act) with 5 max-pools, then MLP hidden-hidden-classes."""

    def __init__(self, activation: Activation, widths: Sequence[int] = VGG_A_WIDTHS,
                 hidden: int = 512, batchnorm: bool = True, classifier_batchnorm: bool = False,
                 dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        if len(widths) != len(VGG_A_WIDTHS):
            raise ValueError(f"VGG-A has {len(VGG_A_WIDTHS)} conv layers, got widths={list(widths)}")
        layers, width = [], 3
        for i, out in enumerate(widths):
            # the conv bias is redundant before BN (BN subtracts the mean and adds its own shift)
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=not batchnorm),
                       nn.BatchNorm2d(out) if batchnorm else nn.Identity(), activation()]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*layers)  # (B, 3, 32, 32) -> (B, width, 1, 1)

        def dense(n_in: int) -> list[nn.Module]:
            return [nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden) if classifier_batchnorm
                    else nn.Identity(), activation(), nn.Dropout(dropout)]

        self.classifier = nn.Sequential(nn.Flatten(), *dense(width), *dense(hidden),
                                        nn.Linear(hidden, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # Without BN nothing rescales the activations, and PyTorch's default init shrinks them at
        # every layer (penultimate rms ~0.02 here vs ~2 with He init): the plain net sits at 10%.
        # He init keeps the forward variance constant under ReLU-like activations. Both variants
        # get it, so the only difference between them is BN.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Small output weights: the first loss is ~ln(classes) instead of a large random-logit spike.
        nn.init.normal_(self.classifier[-1].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        return self.classifier(self.features(x))
