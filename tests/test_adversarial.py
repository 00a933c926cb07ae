"""Issue 20's attacks, each re-tried as written: what a user sees now."""
from __future__ import annotations

import pandas as pd

from ablate.loop import Callback
from ablate.train import run
from conftest import TINY, compose_cfg

QUICK = [*TINY, "model.filters=[4,8,16]", "device=cpu", "save_weights=false", "epochs=2"]


class LateColumn(Callback):
    """Adds a `late` column from epoch 2 on, as a callback that warms up first would."""

    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] >= 2:
            row["late"] = 0.5 * row["epoch"]


def test_a_column_a_callback_adds_after_epoch_1_reaches_metrics_csv(tmp_path):
    cfg = compose_cfg([*QUICK, "+callbacks.late._target_=test_adversarial.LateColumn"])
    assert run(cfg, tmp_path, {}, []).status == "completed"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.columns[-1] == "late"
    assert pd.isna(metrics["late"][0]) and metrics["late"][1] == 1.0
