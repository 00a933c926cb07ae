"""+callbacks=grad_norm: the mean gradient norm of each epoch, as a metrics.csv column."""
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
