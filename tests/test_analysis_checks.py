"""Numbers analysis must not trust, and outputs it must not crash on: ranges in result.json and
metrics.csv, tuning around runs without a number, seeds a paired test leaves out, folder names
that are not UTF-8, an --out that cannot be written."""
import os

import pandas as pd
import pytest

from analysis import make_tables
from analysis.runs import collect
from analysis.tables import sweep_reports
from analysis.tuning import tuned_markdown, tuned_table
from test_analysis import make_run, make_sweep


def _patch_json(run_dir, text_fields: str) -> None:
    """Splice raw JSON (e.g. '"epochs_run": 1e999') into a run's result.json."""
    path = run_dir / "result.json"
    path.write_text(path.read_text().rstrip("}") + ", " + text_fields + "}")


@pytest.mark.parametrize("field, reason", [
    ('"best_val_acc": 1.5', "best_val_acc is 1.5, not an accuracy in [0, 1]"),
    ('"final_test_acc": 1e999', "final_test_acc is inf, not a finite number"),
    ('"epochs_run": 1e999', "epochs_run is inf, not a finite number"),
    ('"epochs_run": -5', "epochs_run is -5, not a count"),
    ('"train_images": 2.5', "train_images is 2.5, not a count"),
])
def test_an_impossible_number_in_a_record_makes_the_run_unreadable_with_the_reason(tmp_path, field, reason):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82], "mse": [0.7, 0.72]}, key="loss")
    _patch_json(root / "0", field)
    runs, _ = collect([root])
    bad = runs.set_index("run_dir").loc[str(root / "0")]
    assert bad["status"] == "unreadable" and reason in bad["error"]
    # the table is built from the others, and make_tables finishes with no traceback
    assert make_tables.main(["--root", str(root)]) == 0


@pytest.mark.parametrize("rows, reason", [
    ([(1, 0.5), (1, 0.6)], "epoch 1 comes twice or out of order"),
    ([(2, 0.5), (1, 0.6)], "epoch 1 comes twice or out of order"),
    ([(1, 0.5), (2, 1.5)], "test_acc is 1.5, not an accuracy in [0, 1]"),
    ([(1, 0.5), (2.5, 0.6)], "not a whole number"),
])
def test_metrics_with_repeated_epochs_or_impossible_accuracies_are_not_plotted(tmp_path, rows, reason):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82]}, key="loss")
    pd.DataFrame(rows, columns=["epoch", "test_acc"]).to_csv(root / "0" / "metrics.csv", index=False)
    runs, frames = collect([root])
    bad = runs.set_index("run_dir").loc[str(root / "0")]
    assert bad["status"] == "unreadable" and reason in bad["error"]
    assert str(root / "0") not in set(frames["metrics"]["run_dir"])


def _tuning_sweep(root):
    """lr in {a, b} x seeds 0-2, a validation split; lr=b looks best but 2 of its 3 seeds diverged."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    val = {"a": [0.70, 0.71, 0.72], "b": [0.80, None, None]}
    for lr, accs in val.items():
        for seed, acc in enumerate(accs):
            status = "completed" if acc is not None else "diverged"
            make_run(root / f"lr={lr},seed={seed}", [f"optim.lr={lr}", f"seed={seed}"], status=status,
                     acc=acc, record={"best_val_acc": acc, "val_images": 100})
    return root


def test_tuning_says_how_many_seeds_of_the_chosen_value_diverged(tmp_path):
    root = _tuning_sweep(tmp_path / "s")
    runs, _ = collect([root])
    table = tuned_table(runs, ["optim.lr"], ["optim.lr"])
    assert table.iloc[0]["chosen"] == {"optim.lr": "b"} and table.iloc[0]["n"] == 1
    assert table.iloc[0]["lost"] == "2 diverged"
    assert "| 2 diverged " in tuned_markdown(table, [], ["optim.lr"], "t")


def test_a_nan_validation_accuracy_drops_that_run_not_the_whole_tuning(tmp_path):
    root = _tuning_sweep(tmp_path / "s")
    # a completed run that has a split but no validation number
    make_run(root / "lr=a,seed=3", ["optim.lr=a", "seed=3"], acc=0.7,
             record={"best_val_acc": float("nan"), "val_images": 100})
    runs, _ = collect([root])
    table = tuned_table(runs, ["optim.lr"], ["optim.lr"])  # no TuningError blaming data.val_size=0
    assert table.iloc[0]["chosen"] == {"optim.lr": "b"}


def test_a_paired_test_on_fewer_seeds_than_the_rows_have_says_so(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.80, 0.81, 0.79, 0.80, 0.82],
                                       "mse": [0.70, 0.72, 0.71]}, key="loss")
    (report,) = sweep_reports(collect([root])[0])
    row = report["table"].set_index("loss").loc["mse"]
    assert row["test"] == "paired on the 3 shared of 5 seeds"
    assert "paired on the 3 shared of 5 seeds p=" in report["markdown"]


def test_a_folder_name_that_is_not_utf8_is_shown_not_fatal(tmp_path, capsys):
    sweep = tmp_path / os.fsdecode(b"sw\xe9ep")
    root = make_sweep(sweep, {"ce": [0.8, 0.82], "mse": [0.7, 0.72]}, key="loss")
    (root / "1" / "result.json").write_text("{")  # listed under the table, with its path
    os.rename(root / "1", root / os.fsdecode(b"j\xe9b"))
    assert make_tables.main(["--root", str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    text = (tmp_path / "t" / "tables.md").read_text(encoding="utf-8")
    assert "sw\ufffdep/j\ufffdb" in text and "unreadable" in text
    assert "| ce " in capsys.readouterr().out


def test_an_out_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82]}, key="loss")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        make_tables.main(["--root", str(root), "--out", str(tmp_path / "file" / "tables")])
    assert str(stop.value).startswith(f"error: cannot write the tables to {tmp_path / 'file' / 'tables'}: ")
    assert "\n" not in str(stop.value)
