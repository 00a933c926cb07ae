"""+callbacks=grad_norm: the mean gradient norm of each epoch, as a metrics.csv column."""
from __future__ import annotations

import torch

from ablate.loop import Callback


class GradNorm(Callback):
    """Adds `grad_norm` (the global L2 norm of the gradients each step used, after clipping,
    averaged over the epoch) to every epoch's row, so metrics.csv and the logger show it."""

    def on_fit_start(self, loop) -> None:
        self.params = [p for p in loop.model.parameters() if p.requires_grad]
        self.total, self.steps = 0.0, 0

    def after_step(self, loss: torch.Tensor) -> None:  # the gradients the optimizer just used
        norms = [p.grad.norm() for p in self.params if p.grad is not None]
        self.total += torch.linalg.vector_norm(torch.stack(norms))  # summed on the device: no sync
        self.steps += 1

    def on_epoch_end(self, loop, row: dict) -> None:
        row["grad_norm"] = float(self.total) / self.steps
        self.total, self.steps = 0.0, 0
