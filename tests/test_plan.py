"""make_tables.py --plan: seeds that would likely settle each open comparison, and the command."""
import shlex

import numpy as np
import pytest
from scipy import stats

from analysis import make_tables
from analysis.plan import LOOKS, plan_table, power, seeds_needed
from analysis.runs import collect
from analysis.tables import sweep_reports
from test_analysis import make_sweep


@pytest.mark.parametrize("paired", [True, False])
def test_power_is_the_rejection_rate_of_the_test_it_sizes(paired):
    rng = np.random.default_rng(0)
    effect, n, alpha, draws = 1.2, 6, 0.01, 40_000
    if paired:  # per-seed differences with mean effect * sd
        p = stats.ttest_1samp(rng.normal(effect, 1, (draws, n)), 0, axis=1).pvalue
    else:
        p = stats.ttest_ind(rng.normal(effect, 1, (draws, n)), rng.normal(0, 1, (draws, n)), axis=1).pvalue
    assert abs(power(effect, n, alpha, paired) - (p < alpha).mean()) < 0.01


def test_seeds_needed_is_the_first_n_that_reaches_the_power():
    n = seeds_needed(1.0, 0.01, paired=True)
    assert power(1.0, n, 0.01, True) >= 0.8 > power(1.0, n - 1, 0.01, True)
    assert seeds_needed(0.0, 0.01, paired=True) is None  # no difference: no number of seeds
    assert seeds_needed(0.01, 0.01, paired=True) is None  # past MAX_SEEDS


def test_the_plan_lists_open_rows_only_with_commands_adding_new_seeds_to_both_rows(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.80, 0.82, 0.81], "focal": [0.795, 0.81, 0.795],
                                       "mse": [0.60, 0.61, 0.59]}, key="loss")
    (report,) = sweep_reports(collect([root])[0])
    table = report["table"].set_index("loss")
    assert table.at["mse", "verdict"] == "worse" and table.at["focal", "verdict"].startswith("no evidence")
    plan = plan_table(report["table"], report["sweep"])
    assert list(plan["row"]) == ["loss=focal"]  # the settled row (mse) needs nothing
    line = plan.iloc[0]
    alpha = 0.05 / (LOOKS * 2)
    assert line["seeds_needed"] == seeds_needed(line["effect"], alpha, paired=True, start=3)
    extra = line["seeds_needed"] - 3
    commands = [shlex.split(c) for c in line["commands"]]
    new_seeds = f"seed={','.join(str(s) for s in range(3, 3 + extra))}"
    assert commands == [["python", "ablate/train.py", "-m", "loss=focal", new_seeds, f"hydra.sweep.dir={root}"],
                        ["python", "ablate/train.py", "-m", "loss=ce", new_seeds, f"hydra.sweep.dir={root}"]]


def test_make_tables_plan_prints_the_plan_and_its_guard_against_peeking(tmp_path, capsys):
    root = make_sweep(tmp_path / "s", {"ce": [0.80, 0.82, 0.81], "focal": [0.795, 0.81, 0.795]}, key="loss")
    assert make_tables.main(["--root", str(root), "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"### Plan: {root}" in out and "python ablate/train.py -m loss=focal seed=3," in out
    assert "make at most 3 looks" in out
