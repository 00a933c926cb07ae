"""Issue 20's attacks, each re-tried as written: what a user sees now."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ablate.loop import Callback
from ablate.record import CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE, RunRecord
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


class NumpyCount(Callback):
    """Counts epochs in numpy scalars, as a callback built on numpy would."""

    def __init__(self):
        self.epochs = np.int64(0)

    def on_epoch_end(self, loop, row: dict) -> None:
        self.epochs += 1
        row["counted"] = int(self.epochs)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "mean": np.float32(0.5)}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = np.int64(state["epochs"])


class StopInEpoch2(Callback):
    """Fails at the end of epoch 2, before the checkpoint saves it: the folder resumes after epoch 1."""

    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] == 2:
            raise RuntimeError("stopped in epoch 2")


def stopped_after_epoch_1(run_dir, callbacks=()):
    """A run folder whose checkpoint holds epoch 1 of 2 (with `callbacks`, named like their class)."""
    adds = [f"+callbacks.{c}._target_=test_adversarial.{c}" for c in (*callbacks, "StopInEpoch2")]
    with pytest.raises(RuntimeError, match="stopped in epoch 2"):
        run(compose_cfg([*QUICK, *adds]), run_dir, {}, [])
    return pd.read_csv(run_dir / METRICS_FILE)


def test_a_callback_state_holding_numpy_scalars_resumes_where_it_stopped(tmp_path):
    first = stopped_after_epoch_1(tmp_path, ["NumpyCount"])
    cfg = compose_cfg([*QUICK, "+callbacks.NumpyCount._target_=test_adversarial.NumpyCount"])
    assert run(cfg, tmp_path, {}, []).status == "completed"
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert metrics["seconds"][0] == first["seconds"][0]  # epoch 1 was not trained again
    assert metrics["counted"].tolist() == [1, 2]  # and the callback's count went on from 1


def test_checkpoints_from_a_newer_version_with_one_more_field_still_load(tmp_path):
    stopped_after_epoch_1(tmp_path)  # an unfinished one: its state gains a field
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    ckpt["state"]["from_the_future"] = 1
    torch.save(ckpt, tmp_path / CHECKPOINT_FILE)
    record = run(compose_cfg(QUICK), tmp_path, {}, [])
    assert record.status == "completed" and record.epochs_run == 2
    # the finished one: its record and state gain a field, and result.json is lost
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    ckpt["state"]["from_the_future"] = 1
    ckpt["finished_record"] = json.dumps({**json.loads(ckpt["finished_record"]), "from_the_future": 1})
    torch.save(ckpt, tmp_path / CHECKPOINT_FILE)
    (tmp_path / RESULT_FILE).unlink()
    rebuilt = run(compose_cfg(QUICK), tmp_path, {}, [])
    assert rebuilt == record and RunRecord.load(tmp_path) == record
