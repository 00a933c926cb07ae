"""Stochastic weight averaging (Izmailov et al. 2018) on top of torch.optim.swa_utils."""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ablate.savers import save_weights
from ablate.data import batches
from ablate.loop import Callback, Loop, Schedule, evaluate
from ablate.record import SWA_WEIGHTS

log = logging.getLogger(__name__)


class SWA(Callback):
    """Averages the weights after every epoch from `start_epoch` (1-based) on.

    It takes the place of the run's Schedule callback: that scheduler sets the learning rate up
    to and including start_epoch; from then on SWALR replaces it, annealing to `lr` over
    `anneal_epochs` epochs and holding it there. At the end the averaged model gets fresh BN
    statistics and is evaluated into record.extra (swa_test_acc, ...) and, with save_weights,
    saved as SWA_WEIGHTS.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, start_epoch: int,
                 lr: float, anneal_epochs: int = 5, anneal_strategy: str = "cos",
                 schedule: Schedule | None = None, save_weights: bool = True):
        self.averaged = AveragedModel(model)  # a copy whose parameters hold the running mean
        self.optimizer = optimizer
        self.start_epoch, self.lr = start_epoch, lr
        self.anneal_epochs, self.anneal_strategy = anneal_epochs, anneal_strategy
        self.scheduler: SWALR | None = None  # built when averaging starts (see update)
        self.schedule = schedule or Schedule(None)
        self.save_weights = save_weights

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        if row["epoch"] >= self.start_epoch:
            self.update(loop.model)
        else:
            self.schedule.on_epoch_end(loop, row)

    def on_fit_end(self, loop: Loop) -> None:
        if loop.state.epoch < self.start_epoch:  # e.g. a diverged run: nothing was averaged
            return
        loop.record.extra.update(self.finish(loop))
        if self.save_weights:
            save_weights(self.averaged.module.state_dict(), loop.run_dir / SWA_WEIGHTS)

    def update(self, model: nn.Module) -> None:
        """Add this epoch's weights to the average; step SWALR instead of the run's scheduler."""
        self.averaged.update_parameters(model)
        if self.scheduler is None:
            # Built now rather than with the optimizer, so that it anneals from the learning
            # rate the run's scheduler reached and never touches the earlier epochs.
            self.scheduler = self._swalr()
        self.scheduler.step()

    def _swalr(self) -> SWALR:
        return SWALR(self.optimizer, swa_lr=self.lr, anneal_epochs=self.anneal_epochs,
                     anneal_strategy=self.anneal_strategy)

    def state_dict(self) -> dict:
        """The averaged model, SWALR, and the run's scheduler it took over from."""
        # Some torch versions keep the annealing function (a callable) in SWALR's state, which
        # torch.load(weights_only=True) rejects; it is rebuilt from anneal_strategy instead.
        sched = None if self.scheduler is None else {
            k: v for k, v in self.scheduler.state_dict().items() if not callable(v)}
        return {"averaged": self.averaged.state_dict(), "scheduler": sched,
                "run_scheduler": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        if state.get("run_scheduler") is not None:
            self.schedule.load_state_dict(state["run_scheduler"])
        if state["scheduler"] is not None:
            # Rebuilt on the restored optimizer, whose groups already hold the current lr and
            # swa_lr: the constructor's initial step leaves that lr as it is (anneal step 0, or
            # swa_lr itself when anneal_epochs is 0) and the saved counters replace its own.
            self.scheduler = self._swalr()
            self.scheduler.load_state_dict(state["scheduler"])

    def finish(self, loop: Loop) -> dict[str, float]:
        """Recompute the averaged model's BatchNorm statistics, evaluate it: record.extra entries.

        The averaged weights never ran forward, so the running means and variances copied
        from the model at the start fit none of them; update_bn replaces them by an average
        over one pass of the training set. Without augmentation that pass is deterministic,
        so a resumed run gets the same statistics.
        """
        data, recipe = loop.data, loop.recipe
        update_bn(batches(data.train_x, data.train_y, recipe.batch_size), self.averaged,
                  device=data.train_x.device)
        test = evaluate(self.averaged, data.test_x, data.test_y, loss_fn=recipe.loss_fn,
                        precision=recipe.precision)
        result = {"swa_test_acc": test["acc"], "swa_test_loss": test["loss"],
                  "swa_epochs_averaged": int(self.averaged.n_averaged)}
        if loop.has_val:
            result["swa_val_acc"] = evaluate(self.averaged, data.val_x, data.val_y,
                                             loss_fn=recipe.loss_fn, precision=recipe.precision)["acc"]
        log.info("SWA of %d epochs: test loss %.4f acc %.4f", result["swa_epochs_averaged"],
                 test["loss"], test["acc"])
        return result
