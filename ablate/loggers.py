"""Live curves of a run (conf/logger/): `logger=tensorboard` writes TensorBoard event files.

metrics.csv and result.json are written whatever the logger (ablate.loop.Metrics); a logger only
adds a view. `tensorboard --logdir multirun/<sweep>` shows every run of a sweep as it trains.
"""
from __future__ import annotations

import numbers

from ablate.loop import Callback, Loop
from ablate.record import TENSORBOARD_DIR
from ablate.validation import ConfigError

EXTRA = "pip install -e \".[tensorboard]\""
# The record's final numbers shown beside the hyperparameters in TensorBoard's HParams view.
FINAL_METRICS = ("final_test_acc", "best_test_acc", "best_val_acc", "test_acc_at_best_val",
                 "final_train_loss")


def tag(column: str) -> str:
    """metrics.csv's column as a TensorBoard tag: train_loss -> train/loss, so splits group."""
    split, _, metric = column.partition("_")
    return f"{split}/{metric}" if split in ("train", "val", "test") and metric else column


class TensorBoard(Callback):
    """Every epoch's losses, accuracies and learning rate (and any column other callbacks add),
    then the run's hyperparameters with its final metrics, into the run folder's TENSORBOARD_DIR."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"logger=tensorboard needs TensorBoard: {EXTRA}") from None
        self.make_writer = SummaryWriter
        self.writer = None

    def on_fit_start(self, loop: Loop) -> None:
        # A resumed run drops what it logged past its checkpoint, so an epoch is never shown twice.
        self.writer = self.make_writer(str(loop.run_dir / TENSORBOARD_DIR), purge_step=loop.state.epoch + 1)

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        for column, value in row.items():
            if column not in ("epoch", "seconds") and isinstance(value, numbers.Real):
                self.writer.add_scalar(tag(column), value, row["epoch"])
        self.writer.flush()  # live: TensorBoard sees each epoch as it ends

    def on_fit_end(self, loop: Loop) -> None:
        record = loop.record
        params = {**record.choices, "seed": record.seed, "epochs": record.epochs,
                  **dict(o.lstrip("+~").split("=", 1) for o in record.overrides if "=" in o)}
        metrics = {f"hparams/{k}": getattr(record, k) for k in FINAL_METRICS
                   if getattr(record, k) is not None}
        metrics.update({f"hparams/{k}": v for k, v in record.extra.items()
                        if isinstance(v, numbers.Real)})  # e.g. swa_test_acc
        # run_name="." keeps them in this run's folder (torch would make a timestamped subfolder)
        self.writer.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                 for k, v in params.items()}, metrics, run_name=".")
        self.writer.close()
