"""Analysis on hand-made run folders: tables, statistics, and broken or unfinished runs."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from analysis.runs import collect
from analysis.tables import mean_ci, sweep_reports
from conftest import run_script


def make_run(run_dir, overrides, status="completed", acc=None, result="ok", epochs=2):
    """A run folder as train.py leaves it; result='broken' writes a corrupt result.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    choices = {k: v for k, v in (o.split("=") for o in overrides) if "." not in k}
    hydra = {"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **choices}},
                       "overrides": {"task": overrides}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if result == "broken":
        (run_dir / "result.json").write_text('{"status": "compl')
    elif result == "ok":
        record = {"status": status, "choices": choices, "overrides": overrides,
                  "epochs_run": epochs if status == "completed" else 1,
                  "final_test_acc": acc, "best_test_acc": acc, "error": None}
        (run_dir / "result.json").write_text(json.dumps(record))
        rows = [{"epoch": e, "train_loss": 2.0 / e, "test_acc": (acc or 0.1) * e / epochs}
                for e in range(1, epochs + 1)]
        pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "acts"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    accs = {"relu": [0.80, 0.82, 0.81], "leaky_relu": [0.83, 0.84, 0.835], "elu": [0.70, 0.71, 0.69]}
    job = 0
    for act, values in accs.items():
        for seed, acc in enumerate(values):
            make_run(root / str(job), [f"model/activation={act}", f"seed={seed}"], acc=acc)
            job += 1
    make_run(root / str(job), ["model/activation=relu", "seed=3"], status="diverged", acc=None)
    make_run(root / str(job + 1), ["model/activation=elu", "seed=3"], result="broken")
    make_run(root / str(job + 2), ["model/activation=elu", "seed=4"], result=None)
    return root, accs


def test_collect_reads_every_run_including_broken_ones(sweep):
    root, _ = sweep
    runs, curves = collect([root.parent])
    assert len(runs) == 12
    assert sorted(runs["status"].value_counts().items()) == [
        ("completed", 9), ("diverged", 1), ("unfinished", 1), ("unreadable", 1)]
    assert set(curves["run_dir"]) <= set(runs["run_dir"])


def test_table_has_one_row_per_variant_with_mean_std_ci_and_welch(sweep):
    root, accs = sweep
    runs, _ = collect([root.parent])
    (report,) = sweep_reports(runs)
    assert report["keys"] == ["model/activation"]
    table = report["table"].set_index("model/activation")
    assert list(table.index) == ["relu", "leaky_relu", "elu"]
    relu = np.array(accs["relu"]) * 100
    assert table.at["relu", "n"] == 3
    assert table.at["relu", "mean"] == pytest.approx(relu.mean())
    assert table.at["relu", "std"] == pytest.approx(relu.std(ddof=1))
    half = stats.t.ppf(0.975, 2) * relu.std(ddof=1) / math.sqrt(3)
    assert table.at["relu", "ci_high"] == pytest.approx(relu.mean() + half)
    assert table.at["leaky_relu", "verdict"] == "best"
    assert table.at["elu", "verdict"] == "worse"
    p = stats.ttest_ind(relu, np.array(accs["leaky_relu"]) * 100, equal_var=False).pvalue
    assert table.at["relu", "p_vs_best"] == pytest.approx(p)
    assert "1 diverged" in table.at["relu", "status"] and "1 unreadable" in table.at["elu", "status"]


def test_markdown_names_the_axis_and_lists_runs_that_did_not_complete(sweep):
    root, _ = sweep
    runs, _ = collect([root.parent])
    md = sweep_reports(runs)[0]["markdown"]
    assert md.splitlines()[2].startswith("| Activation ")
    assert "| leaky_relu " in md and "Welch" in md
    assert "Not completed:" in md and "diverged" in md and "unreadable" in md and "no result.json" in md


def test_single_runs_without_varying_keys_form_one_row(tmp_path):
    make_run(tmp_path / "outputs" / "d" / "t1", ["seed=1"], acc=0.5)
    make_run(tmp_path / "outputs" / "d" / "t2", ["seed=2"], acc=0.7)
    runs, _ = collect([tmp_path / "outputs"])
    (report,) = sweep_reports(runs)
    assert report["keys"] == [] and report["table"]["n"].tolist() == [2]
    assert report["table"]["mean"].iloc[0] == pytest.approx(60.0)


def test_validation_metric_is_used_when_every_run_has_it(tmp_path):
    for i, (acc, at_val) in enumerate([(0.9, 0.8), (0.92, 0.85)]):
        make_run(tmp_path / str(i), ["loss=ce" if i else "loss=mse"], acc=acc)
        rec = json.loads((tmp_path / str(i) / "result.json").read_text())
        rec["test_acc_at_best_val"] = at_val
        (tmp_path / str(i) / "result.json").write_text(json.dumps(rec))
    (report,) = sweep_reports(collect([tmp_path])[0])
    assert report["metric"] == "test_acc_at_best_val"
    assert sorted(report["table"]["mean"]) == pytest.approx([80.0, 85.0])


def test_make_tables_cli_writes_tables_and_plots_and_survives_broken_runs(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "out"
    proc = run_script("analysis/make_tables.py", "--root", str(root.parent), "--out", str(out))
    assert "| Activation " in proc.stdout
    assert (out / "tables.md").exists() and len(list(out.glob("*.png"))) == 1


def test_make_tables_without_runs_says_so(tmp_path):
    proc = run_script("analysis/make_tables.py", "--root", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no runs found" in proc.stderr
