"""One record per run, read as written: what a run records about itself, and tables built from
those records alone (identity, sweeps, data by content, checked columns)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from ablate.loop import Callback
from ablate.record import METRIC_COLUMNS, RunRecord
from ablate.train import run
from ablate.validation import ConfigError
from analysis.runs import collect
from analysis.tables import sweep_reports
from conftest import TINY, compose_cfg, run_script
from test_data import write_image_tree

QUICK = [*TINY, "epochs=3", "save_weights=false"]


class TensorColumn(Callback):
    """A callback that forgot float(): its column is a tensor of 3 numbers."""

    def on_epoch_end(self, loop, row):
        row["per_class"] = torch.tensor([0.1, 0.2, 0.3])


class NumpyColumn(Callback):
    """A numpy scalar and a one-element tensor: plain numbers once written."""

    def on_epoch_end(self, loop, row):
        row["np_metric"] = np.float64(row["epoch"] / 10)
        row["t_metric"] = torch.tensor(row["epoch"] * 2.0)


def test_a_callback_column_that_is_not_a_number_stops_the_run_at_epoch_1_in_one_line(tmp_path):
    cfg = compose_cfg([*QUICK, f"+callbacks.per_class._target_={__name__}.TensorColumn"])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "'per_class'" in message and "callback 'per_class'" in message
    assert "Tensor of shape (3,)" in message
    record = RunRecord.load(tmp_path)
    assert record.status == "failed" and record.epochs_run == 0  # not one more epoch was spent
    assert not (tmp_path / "metrics.csv").exists()


def test_numpy_scalars_and_one_element_tensors_are_written_as_plain_numbers(tmp_path):
    cfg = compose_cfg([*QUICK, "epochs=2", f"+callbacks.num._target_={__name__}.NumpyColumn"])
    assert run(cfg, tmp_path).status == "completed"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["np_metric"].tolist() == [0.1, 0.2] and metrics["t_metric"].tolist() == [2.0, 4.0]
    runs, frames = collect([tmp_path])
    assert runs.at[0, "status"] == "completed" and "np_metric" in frames["metrics"]


def test_the_record_says_what_the_run_was(tmp_path):
    cfg = compose_cfg([*QUICK, "epochs=1", "scale=0.5", "loss=focal"])
    record = run(cfg, tmp_path, {"loss": "focal"}, ["loss=focal", "scale=0.5"])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["config"] == OmegaConf.to_container(cfg, resolve=True)  # resolved once, here
    assert saved["sweep"] == {"kind": "single"} and saved["seed"] == 0
    assert len(saved["data_fingerprint"]) == 64 and saved["row_identity"] == record.row_identity
    row = collect([tmp_path])[0].iloc[0]
    assert row["row_identity"] == record.row_identity and row["note"] is None  # read as written
    assert row["typed_overrides"] == ["loss=focal", "scale=0.5"] and row["config"]["loss.gamma"] == 2.0


# ----------------------------------------------------------------------------- made-up records

def write_record(run_dir, *, seed, acc, row="r1", sweep=None, overrides=(), epochs=2, metrics=None):
    """A run folder as the run writes it: result.json with its config, identity and sweep, and
    metrics.csv with the loop's columns."""
    run_dir.mkdir(parents=True)
    config = {"seed": seed, "lr": overrides[0] if overrides else "x"}
    record = RunRecord(status="completed", seed=seed, epochs=epochs, epochs_run=epochs,
                       final_test_acc=acc, best_test_acc=acc, overrides=[*overrides, f"seed={seed}"],
                       config=config, row_identity=row, sweep=sweep or {"kind": "single"})
    record.save(run_dir)
    rows = metrics if metrics is not None else pd.DataFrame(
        [{c: (e if c == "epoch" else acc) for c in METRIC_COLUMNS} for e in range(1, epochs + 1)])
    rows.to_csv(run_dir / "metrics.csv", index=False)
    return run_dir


def test_two_optuna_studies_under_one_root_are_two_tables(tmp_path):
    for study, folder in (("lr_a", "tune_a"), ("lr_b", "tune_b")):
        for job, lr in enumerate((0.01, 0.001)):
            write_record(tmp_path / folder / f"optim.lr={lr}", seed=0, acc=0.5 + job / 10, row=f"{study}{lr}",
                         sweep={"kind": "optuna", "study": study, "job": job}, overrides=[f"optim.lr={lr}"])
    runs, _ = collect([tmp_path])
    assert sorted(runs["study"]) == ["lr_a", "lr_a", "lr_b", "lr_b"] and set(runs["sweep_kind"]) == {"optuna"}
    reports = sweep_reports(runs)
    assert sorted(r["sweep"] for r in reports) == [str(tmp_path / "tune_a"), str(tmp_path / "tune_b")]
    assert all(len(r["table"]) == 2 for r in reports)


@pytest.mark.parametrize("damage", ["header cut mid-name", "cut mid-row", "a row too short"])
def test_a_damaged_metrics_csv_makes_its_run_unreadable_with_the_reason(tmp_path, damage):
    run_dir = write_record(tmp_path / "s" / "a", seed=0, acc=0.5, sweep={"kind": "grid", "job": 0})
    write_record(tmp_path / "s" / "b", seed=1, acc=0.6, sweep={"kind": "grid", "job": 1})
    path = run_dir / "metrics.csv"
    text = path.read_text()
    if damage == "header cut mid-name":
        path.write_text(text.split("\n", 1)[0][:-3] + "\n")
    elif damage == "cut mid-row":
        path.write_text(text[:-5])
    else:
        lines = text.splitlines()
        path.write_text("\n".join([*lines[:-1], lines[-1].rsplit(",", 2)[0]]) + "\n")
    runs, frames = collect([tmp_path])
    bad = runs.set_index("run_dir").loc[str(run_dir)]
    assert bad["status"] == "unreadable" and "metrics.csv" in bad["error"]
    assert set(frames["metrics"]["run_dir"]) == {str(tmp_path / "s" / "b")}  # no half a curve


def test_a_text_column_of_an_older_run_is_left_out_and_the_run_kept(tmp_path):
    rows = pd.DataFrame([{**{c: 0.5 for c in METRIC_COLUMNS}, "epoch": e, "note": "hi"} for e in (1, 2)])
    write_record(tmp_path / "r", seed=0, acc=0.5, metrics=rows)
    runs, frames = collect([tmp_path])
    assert runs.at[0, "status"] == "completed" and "'note' left out" in runs.at[0, "note"]
    assert "note" not in frames["metrics"] and len(frames["metrics"]) == 2


# ----------------------------------------------------------------------------- real runs

@pytest.mark.slow
def test_an_environment_variable_in_the_config_is_resolved_by_the_run_not_the_reader(tmp_path):
    """Two sweeps of a config whose training-set size comes from $NTRAIN (200 and 100 images):
    two rows, no copies, whatever NTRAIN is when the tables are made."""
    size = "data.train_size='${oc.decode:${oc.env:NTRAIN,200}}'"
    for n in (200, 100):
        os.environ["NTRAIN"] = str(n)
        try:
            run_script("ablate/train.py", "-m", *QUICK, "epochs=1", size, "seed=0",
                       f"hydra.sweep.dir={tmp_path / f'n{n}'}")
        finally:
            del os.environ["NTRAIN"]
    os.environ["NTRAIN"] = "50"
    try:
        out = run_script("analysis/make_tables.py", "--root", str(tmp_path), "--out", str(tmp_path / "t")).stdout
        runs, _ = collect([tmp_path])
    finally:
        del os.environ["NTRAIN"]
    assert sorted(runs["config"].map(lambda c: c["data.train_size"])) == [100, 200]
    assert runs["row_identity"].nunique() == 2 and "also exist" not in out
    assert not runs["status"].eq("duplicate").any()


@pytest.mark.slow
def test_the_same_images_at_two_paths_pool_and_changed_images_do_not(tmp_path):
    from PIL import Image

    first, second, changed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_image_tree(first, {"train": 4, "test": 2})
    shutil.copytree(first, second)
    shutil.copytree(first, changed)
    image = changed / "train" / "cat" / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(image)
    common = ["data.train_size=null", "data.test_size=null", "model.filters=[8,16,32]", "epochs=1",
              "save_weights=false", "batch_size=8"]
    for root, seed in ((first, 0), (second, 1), (changed, 2)):
        run_script("ablate/train.py", "-m", *common, f"data.root={root}", f"seed={seed}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    runs, _ = collect([tmp_path / "sweep"])
    assert len(runs) == 3 and (runs["status"] == "completed").all()
    by_seed = runs.set_index("seed")["row_identity"]
    assert by_seed[0] == by_seed[1] != by_seed[2]
    (report,) = sweep_reports(runs)
    assert sorted(report["table"]["n"]) == [1, 2]  # one row of 2 seeds, one of the changed images
