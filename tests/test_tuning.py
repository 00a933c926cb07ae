"""Fair comparisons on hand-made run folders: tuning on validation, paired vs Welch, Holm, budgets."""
import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.runs import collect
from analysis.tables import compare_with_best, holm, p_value, sweep_reports
from analysis.tuning import TuningError, budget_curves, expected_max, tuned_table
from conftest import run_script
from test_analysis import make_run


def tuned_sweep(root, results, filters=(16, 32, 64), val=5000):
    """results[(optim, lr)] = [(val_acc, test_acc) per seed]; filters may differ per optimizer."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for job, ((optim, lr), per_seed) in enumerate(results.items()):
        for seed, (v, t) in enumerate(per_seed):
            width = filters[optim] if isinstance(filters, dict) else filters
            config = {"seed": seed, "batch_size": 128, "optim": {"name": optim, "lr": lr},
                      "model": {"filters": list(width)}, "data": {"val_size": val}}
            make_run(root / f"{job}_{seed}", [f"optim={optim}", f"optim.lr={lr}", f"seed={seed}"],
                     acc=t, config=config,
                     record={"best_val_acc": v if val else None, "test_acc_at_best_val": t if val else None,
                             "val_images": val})
    return root


def test_tuning_picks_on_validation_and_reports_test_there(tmp_path):
    # adam: lr 1e-3 is best on validation, 1e-2 best on test; the test set must not decide
    root = tuned_sweep(tmp_path / "s", {
        ("adam", 1e-3): [(0.80, 0.70), (0.81, 0.71), (0.79, 0.72)],
        ("adam", 1e-2): [(0.60, 0.90), (0.61, 0.91), (0.62, 0.92)],
        ("sgd", 1e-3): [(0.50, 0.50), (0.52, 0.52), (0.51, 0.50)],
        ("sgd", 1e-2): [(0.70, 0.65), (0.71, 0.66), (0.72, 0.64)]})
    runs, _ = collect([root])
    (report,) = sweep_reports(runs)
    table = tuned_table(runs, report["keys"], ["optim.lr"]).set_index("optim")
    assert table.at["adam", "chosen"] == {"optim.lr": "0.001"}
    assert table.at["adam", "mean"] == pytest.approx(71.0)
    assert table.at["sgd", "chosen"] == {"optim.lr": "0.01"} and table.at["sgd", "mean"] == pytest.approx(65.0)
    assert table.at["adam", "val_mean"] == pytest.approx(80.0) and table.at["adam", "grid"] == 2
    # shared seeds, same architecture: the paired test on per-seed differences
    assert table.at["sgd", "test"] == "paired"
    p = stats.ttest_rel([65, 66, 64], [70, 71, 72]).pvalue
    assert table.at["sgd", "p_vs_best"] == pytest.approx(p)


def test_grid_position_shows_the_setting_it_moves(tmp_path):
    # like +ablation=optimizer_tuned: the sweep goes over lr_step, each optimizer reads its own lr
    root = tmp_path / "s"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    grids = {"adam": [1e-4, 1e-3], "sgd": [1e-2, 1e-1]}
    for optim, grid in grids.items():
        for step, lr in enumerate(grid):
            for seed in range(2):
                config = {"seed": seed, "lr_step": step, "optim": {"name": optim, "lr": lr}}
                make_run(root / f"{optim}{step}{seed}", [f"optim={optim}", f"lr_step={step}", f"seed={seed}"],
                         acc=0.5, config=config,
                         record={"best_val_acc": 0.5 + step / 10, "test_acc_at_best_val": 0.5, "val_images": 10})
    runs, _ = collect([root])
    table = tuned_table(runs, ["optim", "lr_step"], ["lr_step"]).set_index("optim")
    assert table.at["adam", "chosen"] == {"lr_step": "1"} and table.at["adam", "units"] == {"optim.lr": 1e-3}
    assert table.at["sgd", "units"] == {"optim.lr": 0.1}


def test_other_architecture_or_no_shared_seeds_means_welch(tmp_path):
    results = {("adam", 1e-3): [(0.8, 0.80), (0.8, 0.82), (0.8, 0.81)],
               ("sgd", 1e-3): [(0.7, 0.70), (0.7, 0.73), (0.7, 0.71)]}
    root = tuned_sweep(tmp_path / "s", results, filters={"adam": (16, 32, 64), "sgd": (8, 16, 32)})
    (report,) = sweep_reports(collect([root])[0])
    sgd = report["table"].set_index("optim").loc["sgd"]
    assert sgd["test"] == "Welch"
    assert sgd["p_vs_best"] == pytest.approx(stats.ttest_ind([70, 73, 71], [80, 82, 81], equal_var=False).pvalue)
    assert "Welch p=" in report["markdown"] and "Holm p=" in report["markdown"]
    same = tuned_sweep(tmp_path / "t", results)
    (report,) = sweep_reports(collect([same])[0])
    assert report["table"].set_index("optim").at["sgd", "test"] == "paired"


def test_holm_adjusts_and_worse_only_after_correction():
    assert holm([0.01, 0.04, 0.03, float("nan")]) == pytest.approx([0.03, 0.06, 0.06, float("nan")], nan_ok=True)
    assert holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    # three rows each with a raw p of about 0.03 against the best: none is 'worse' after Holm
    best = {0: 80.0, 1: 81.0, 2: 82.0}
    rows = [{"mean": 81.0, "n": 3, "seeds": best, "pairing": None}]
    for shift in (2.6, 2.7, 2.8):
        rows.append({"mean": 81 - shift, "n": 3, "pairing": None,
                     "seeds": {s: v - shift for s, v in best.items()}})
    table = compare_with_best(pd.DataFrame(rows))
    raw, adj = table["p_vs_best"].iloc[1:], table["p_holm"].iloc[1:]
    assert (raw < 0.05).all() and (adj >= 0.05).all()
    assert set(table["verdict"].iloc[1:]) == {"no evidence of a difference"}


def test_expected_max_matches_brute_force_enumeration():
    rng = np.random.default_rng(0)
    for values in ([0.3, 0.5, 0.5, 0.9], list(rng.uniform(0, 1, 5))):
        for k in range(1, 5):
            draws = itertools.product(values, repeat=k)  # every ordered sample, equally likely
            brute = np.mean([max(d) for d in draws])
            assert expected_max(values, k) == pytest.approx(brute, rel=1e-12)
    assert expected_max([0.2, 0.7], 1) == pytest.approx(0.45)


def test_budget_curves_rise_to_the_arm_best(tmp_path):
    root = tuned_sweep(tmp_path / "s", {("adam", 1e-3): [(0.8, 0.7), (0.7, 0.7)],
                                        ("adam", 1e-2): [(0.6, 0.9), (0.5, 0.9)]})
    runs, _ = collect([root])
    curves = budget_curves(runs, ["optim.lr"], ["optim.lr"])
    assert curves["k"].tolist() == [1, 2, 3, 4]
    assert curves["expected_best_val"].iloc[0] == pytest.approx(65.0)  # one draw: the mean
    assert curves["expected_best_val"].is_monotonic_increasing and curves["expected_best_val"].max() < 80


def test_tuning_without_a_validation_split_is_refused_with_the_reason(tmp_path):
    root = tuned_sweep(tmp_path / "s", {("adam", 1e-3): [(0, 0.7)] * 2, ("adam", 1e-2): [(0, 0.9)] * 2}, val=0)
    runs, _ = collect([root])
    with pytest.raises(TuningError, match="validation split"):
        tuned_table(runs, ["optim.lr"], ["optim.lr"])
    proc = run_script("analysis/make_tables.py", "--root", str(root), "--tune", "optim.lr", check=False)
    assert proc.returncode == 1 and "data.val_size" in proc.stderr and not (root / "tables").exists()


@pytest.mark.slow
def test_make_tables_tune_writes_tuned_table_and_budget_plot(tmp_path):
    root = tuned_sweep(tmp_path / "s", {("adam", 1e-3): [(0.8, 0.7)] * 2, ("adam", 1e-2): [(0.6, 0.9)] * 2,
                                        ("sgd", 1e-3): [(0.5, 0.5)] * 2, ("sgd", 1e-2): [(0.7, 0.6)] * 2})
    proc = run_script("analysis/make_tables.py", "--root", str(root), "--tune", "optim.lr")
    assert "### Tuned: " in proc.stdout and "| optim.lr=0.001 " in proc.stdout
    assert sorted(p.name for p in (root / "tables").glob("*.png")) == ["s.png", "s_budget.png"]
    assert "2 plots" in proc.stderr


def test_two_tuned_keys_pick_the_best_pair_on_validation(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    val = {("1e-3", "0"): 0.6, ("1e-3", "1e-4"): 0.9, ("1e-2", "0"): 0.7, ("1e-2", "1e-4"): 0.5}
    for (lr, wd), v in val.items():
        for seed in range(2):
            make_run(root / f"{lr}_{wd}_{seed}", [f"optim.lr={lr}", f"optim.weight_decay={wd}", f"seed={seed}"],
                     acc=1 - v, config={"seed": seed, "optim": {"lr": lr, "weight_decay": wd}},
                     record={"best_val_acc": v, "test_acc_at_best_val": 1 - v, "val_images": 10})
    runs, _ = collect([root])
    (row,) = tuned_table(runs, ["optim.lr", "optim.weight_decay"], ["optim.lr", "optim.weight_decay"]).to_dict("records")
    assert row["chosen"] == {"optim.lr": "1e-3", "optim.weight_decay": "1e-4"} and row["grid"] == 4
    assert row["mean"] == pytest.approx(10.0)


def test_same_architecture_without_shared_seeds_falls_back_to_welch():
    a, b = {0: 70.0, 1: 73.0, 2: 71.0}, {3: 80.0, 4: 82.0, 5: 81.0}
    p, test = p_value(a, b, paired=True)
    assert test == "Welch" and p == pytest.approx(stats.ttest_ind([70, 73, 71], [80, 82, 81], equal_var=False).pvalue)
    p, test = p_value(a, {0: 80.0, 1: 82.0, 2: 81.0}, paired=True)
    assert test == "paired" and p == pytest.approx(stats.ttest_rel([70, 73, 71], [80, 82, 81]).pvalue)
