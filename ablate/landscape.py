"""Santurkar et al. (2018) loss-landscape probe: what happens along the gradient before each step.

Every `every` steps, on the step's own mini-batch and in train mode, compute the gradient g at
the current weights w, then for each step size eta = multiplier * lr evaluate the loss and the
gradient at w - eta * g. Rows go to landscape.csv (one per step and step size):

    loss       L(w - eta g)                       -> its range over eta is the loss landscape
    grad_dist  ||grad L(w - eta g) - g||          -> its range is the gradient predictiveness
    step_norm  ||eta g||                          -> max(grad_dist / step_norm) is the effective
                                                     beta-smoothness
Parameters, BN buffers and the RNG are restored bit for bit afterwards, so the real step (and
the rest of the run) is the same as without the probe. The probe looks along the raw gradient
(as the paper does), whatever the optimizer then does with it, and always runs in fp32.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ablate.loop import Callback, Loop
from ablate.record import LANDSCAPE_FILE, WriteError, write_atomic

COLUMNS = ("step", "multiplier", "eta", "loss0", "loss", "grad_dist", "step_norm", "grad_norm")


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class LandscapeProbe(Callback):
    """A loop callback (conf/probe/landscape.yaml) writing landscape.csv before every `every`-th step.

    It counts its own steps; that count goes into the checkpoint, so a resumed run drops the
    rows of the epoch it re-runs and probes the same steps as an uninterrupted one.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 run_dir: Path, every: int = 50,
                 multipliers: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 4.0)):
        if every < 1 or not multipliers or min(multipliers) <= 0:
            raise ValueError(f"probe needs every >= 1 and positive multipliers, got {every}, "
                             f"{list(multipliers)}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.every, self.multipliers = every, [float(m) for m in multipliers]
        self.path = Path(run_dir) / LANDSCAPE_FILE
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def on_fit_start(self, loop: Loop) -> None:
        """Keep the rows of the steps before this one (all of them on a fresh run: none)."""
        kept = []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if int(r["step"]) < self.step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        write_atomic(self.path, buf.getvalue())

    def before_step(self, loop: Loop, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.step % self.every == 0:
            rows = self.probe(inputs, targets)
            try:
                with open(self.path, "a", newline="") as fh:  # whole rows per probe, flushed on close
                    csv.DictWriter(fh, fieldnames=COLUMNS).writerows(rows)
            except OSError as err:
                raise WriteError(err.errno, f"cannot write {self.path}: {err.strerror}") from None
        self.step += 1

    def _loss_and_grad(self, params, inputs, targets) -> tuple[float, list[torch.Tensor]]:
        loss = self.loss_fn(self.model(inputs).float(), targets)
        # autograd.grad leaves every p.grad alone, so the optimizer's own backward is unaffected
        return loss.item(), list(torch.autograd.grad(loss, params))

    def probe(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[dict]:
        """Measure along -g at each step size, then put weights, buffers and RNG back exactly."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        state = params + list(self.model.buffers())  # BN running_mean/var, num_batches_tracked
        saved = [t.detach().clone() for t in state]
        lr = self.optimizer.param_groups[0]["lr"]
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        rows = []
        # Dropout draws from the global RNG: fork it so the real step sees the same masks.
        with torch.random.fork_rng(devices=devices):
            loss0, g = self._loss_and_grad(params, inputs, targets)
            grad_norm = global_norm(g).item()
            for m in self.multipliers:
                eta = m * lr
                with torch.no_grad():
                    for p, w, gi in zip(params, saved, g):
                        p.copy_(w - eta * gi)
                    for b, s in zip(state[len(params):], saved[len(params):]):
                        b.copy_(s)  # each evaluation starts from the same running statistics
                loss, g_eta = self._loss_and_grad(params, inputs, targets)
                rows.append(dict(step=self.step, multiplier=m, eta=eta, loss0=loss0, loss=loss,
                                 grad_dist=global_norm([a - b for a, b in zip(g_eta, g)]).item(),
                                 step_norm=eta * grad_norm, grad_norm=grad_norm))
            with torch.no_grad():
                for t, s in zip(state, saved):
                    t.copy_(s)
        return rows
