"""Losses PyTorch lacks. Label smoothing is torch's CrossEntropyLoss(label_smoothing=...)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Softmax focal loss, alpha * (1 - p_t)^gamma * CE, as in the seed report."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        for name, value in (("alpha", alpha), ("gamma", gamma)):
            if not (math.isfinite(value) and value >= 0):  # a negative one makes the loss negative
                raise ValueError(f"focal loss needs {name} >= 0, got {name}={value}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"focal loss reduction must be mean or sum, got {reduction!r}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none")
        p_t = torch.exp(-ce)  # probability given to the true class
        loss = self.alpha * (1 - p_t) ** self.gamma * ce
        return loss.mean() if self.reduction == "mean" else loss.sum()


class OneHotMSELoss(nn.Module):
    """Mean squared error between the logits and one-hot targets."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"one-hot MSE needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(target, self.num_classes).to(logits.dtype)
        return F.mse_loss(logits, one_hot)
