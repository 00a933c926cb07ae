"""The loop's callbacks that save into the run folder: checkpoint, best weights, step losses."""
from __future__ import annotations

from pathlib import Path

import torch

from ablate.checkpoint import atomic_torch_save, resume_state
from ablate.loop import Callback, Loop
from ablate.record import BEST_WEIGHTS, CHECKPOINT_FILE, STEPS_FILE, write_atomic


class Checkpoint(Callback):
    """Saves everything to resume bit for bit after every epoch (keep it last among the callbacks,
    so that it saves what the others did to the epoch)."""

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        # identity is record.identity of the config: a run of another config never resumes it
        atomic_torch_save(resume_state(loop.record.config_hash, loop.state_dict(), loop.callbacks),
                          loop.run_dir / CHECKPOINT_FILE)


class BestWeights(Callback):
    """Saves the weights of the best epoch so far (by validation accuracy, else test accuracy)."""

    def on_fit_start(self, loop: Loop) -> None:
        self.path = loop.run_dir / BEST_WEIGHTS
        self.key = "val_acc" if loop.has_val else "test_acc"
        self.best = max((r[self.key] for r in loop.state.rows), default=-1.0)

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        if row[self.key] > self.best:
            self.best = row[self.key]
            save_weights(loop.weights(), self.path)


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """A state_dict, on the CPU, as the model's own file."""
    atomic_torch_save({k: v.detach().cpu() for k, v in weights.items()}, path)


class StepLosses(Callback):
    """Collects each step's loss on the device and appends the epoch's to steps.csv at its end."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def after_step(self, loop: Loop, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        append_steps(loop.run_dir / STEPS_FILE, row["epoch"], torch.stack(self.losses).tolist())  # one sync
        self.losses = []


def append_steps(path: Path, epoch: int, losses: list[float]) -> None:
    """Append one epoch's per-step training losses (rewritten atomically, dropping a re-run epoch)."""
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    lines = [ln for ln in lines if int(ln.split(",")[1]) < epoch]
    first = len(lines)
    lines += [f"{first + i},{epoch},{loss!r}" for i, loss in enumerate(losses)]
    write_atomic(path, "step,epoch,loss\n" + "".join(ln + "\n" for ln in lines))
