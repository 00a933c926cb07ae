"""+callbacks=grad_norm and +callbacks=weight_norm: norms of a run's gradients and weights, as
metrics.csv columns (and logger curves)."""
from __future__ import annotations

import torch

from ablate.loop import Callback, Loop


class GradNorm(Callback):
    """Adds `grad_norm` (the global L2 norm of the gradients each step used, after clipping,
    averaged over the epoch) to every epoch's row, so metrics.csv and the logger show it."""

    def on_fit_start(self, loop: Loop) -> None:
        self.total, self.steps = 0.0, 0

    def after_step(self, loop: Loop, loss: torch.Tensor) -> None:  # the gradients just used
        norms = torch.stack([g.norm() for g in loop.gradients()])
        self.total += torch.linalg.vector_norm(norms)  # summed on the device: no sync
        self.steps += 1

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        row["grad_norm"] = float(self.total) / self.steps
        self.total, self.steps = 0.0, 0


class WeightNorm(Callback):
    """Adds `weight_norm` (the global L2 norm of the model's parameters after each epoch) to
    every epoch's row. It reads `loop.model`: under the fused launcher, a copy of the member's
    model at that moment."""

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        with torch.no_grad():
            row["weight_norm"] = float(torch.linalg.vector_norm(
                torch.stack([p.float().norm() for p in loop.model.parameters()])))
