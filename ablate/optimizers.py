"""Optimizers PyTorch lacks."""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class SignSGD(Optimizer):
    """p <- p - lr * sign(m), with m = momentum * m + (grad + weight_decay * p); momentum 0 gives sign(grad)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0):
        # written so that NaN fails every test: `nan <= 0` is False
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    d = buf.mul_(group["momentum"]).add_(d)
                p.add_(torch.sign(d), alpha=-group["lr"])
        return loss
