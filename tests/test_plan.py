"""make_tables.py --plan: seeds that would likely settle each open comparison, and the command."""
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from analysis import make_tables
from analysis.plan import (LOOKS, allocate, hydra_value, plan_markdown, plan_table, power, seeds_needed,
                           train_command)
from analysis.runs import collect
from analysis.tables import sweep_reports
from conftest import REPO, run_script
from test_analysis import make_run, make_sweep


def make_rows(root: Path, rows: dict, key: str = "loss", extra=(), configs: dict | None = None) -> Path:
    """A sweep folder whose rows have the given {seed: accuracy}; configs[value] replaces the
    resolved config (e.g. another architecture, which does not pair)."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for value, accs in rows.items():
        for seed, acc in accs.items():
            overrides = [f"{key}={value}", *extra, f"seed={seed}"]
            config = None if configs is None else {**configs[value], "seed": seed}
            make_run(root / f"{value}_{seed}", overrides, acc=acc, config=config)
    return root


def report_of(root: Path) -> dict:
    (report,) = sweep_reports(collect([root])[0])
    return report


# ----------------------------------------------------------------------------- power


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("effect, n", [(1.2, 6), (5.0, 3)])  # (5.0, 3): statsmodels' power is NaN
def test_power_is_the_rejection_rate_of_the_test_it_sizes(paired, effect, n):
    rng = np.random.default_rng(0)
    alpha, draws = 0.0083, 40_000
    if paired:  # per-seed differences with mean effect * sd
        p = stats.ttest_1samp(rng.normal(effect, 1, (draws, n)), 0, axis=1).pvalue
    else:  # the table's Welch test, two rows of n seeds with equal spread
        p = stats.ttest_ind(rng.normal(effect, 1, (draws, n)), rng.normal(0, 1, (draws, n)), axis=1,
                            equal_var=False).pvalue
    assert abs(power(effect, n, alpha, paired) - (p < alpha).mean()) < 0.01


def test_power_is_statsmodels_where_statsmodels_is_defined_and_never_nan():
    """Paired: statsmodels' one-sample t power. Welch: at most the pooled two-sample t power of
    statsmodels (Welch's df is smaller), the same at 50 seeds. On a grid up to 12 sd, where the
    reference gives NaN (large noncentrality) ours is still a probability, rising with the effect."""
    effects, nan_there = np.arange(0.25, 12.01, 0.25), 0
    for paired, reference in ((True, TTestPower()), (False, TTestIndPower())):
        for n in (2, 3, 4, 6, 10, 25, 50):
            for alpha in (0.05, 0.0083):
                ours = np.array([power(d, n, alpha, paired) for d in effects])
                ref = np.array([reference.power(d, n, alpha) for d in effects])
                finite = np.isfinite(ref)
                nan_there += (~finite).sum()
                assert np.all(np.isfinite(ours)) and np.all((ours >= 0) & (ours <= 1))
                assert np.all(np.diff(ours) >= -1e-12)  # more effect, never less power
                if paired:
                    np.testing.assert_allclose(ours[finite], ref[finite], atol=1e-9)
                else:
                    assert np.all(ours[finite] <= ref[finite] + 1e-12)
                    if n == 50:
                        np.testing.assert_allclose(ours[finite], ref[finite], atol=0.002)
    assert nan_there > 0  # the grid reaches where the reference breaks down


def test_seeds_needed_is_the_first_n_that_reaches_the_power():
    n = seeds_needed(1.0, 0.01, paired=True)
    assert power(1.0, n, 0.01, True) >= 0.8 > power(1.0, n - 1, 0.01, True)
    assert seeds_needed(0.0, 0.01, paired=True) is None  # no difference: no number of seeds
    assert seeds_needed(0.01, 0.01, paired=True) is None  # past MAX_SEEDS
    # the case: Welch at 8.5 sd with 2 seeds run needed 13 seeds when power went NaN
    assert seeds_needed(8.5, 0.05 / 9, paired=False, start=2) == 3
    assert seeds_needed(8.5, 0.05 / 9, paired=True, start=5) == 5  # already enough


# ----------------------------------------------------------------------------- pairing


def test_the_row_behind_first_gets_its_partners_seeds_then_both_get_the_same_new_ones():
    # the case: ce {0..4}, focal {0,1,2}, 8 seeds planned -> 8 shared, not 6
    focal, ce = allocate({0, 1, 2}, {0, 1, 2, 3, 4}, 8, paired=True)
    assert focal == [3, 4, 5, 6, 7] and ce == [5, 6, 7]
    assert len(({0, 1, 2} | set(focal)) & ({0, 1, 2, 3, 4} | set(ce))) == 8
    # leaky_relu {0..5} ahead of elu {0,1,2}: elu first gets 3,4,5, which pair at once
    elu, leaky = allocate({0, 1, 2}, set(range(6)), 6, paired=True)
    assert elu == [3, 4, 5] and leaky == []
    # a row with seeds the best lacks: the best takes those before anyone trains a new seed
    row, best = allocate({0, 1, 2, 3}, {0, 1, 4}, 6, paired=True)
    assert row == [4, 5] and best == [2, 3, 5]
    # Welch (rows that do not pair): each row up to the target, partner's seeds first
    row, best = allocate({0, 1}, {5, 6, 7}, 4, paired=False)
    assert row == [5, 6] and best == [0]


def test_rows_sharing_fewer_than_two_seeds_are_planned_with_welch_as_tabled(tmp_path):
    root = make_rows(tmp_path / "s", {"ce": {0: 0.80, 1: 0.82, 2: 0.81},
                                      "focal": {5: 0.70, 6: 0.78, 7: 0.74}})
    report = report_of(root)
    table = report["table"].set_index("loss")
    assert table.at["focal", "test"] == "Welch"
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    (line,) = plan.lines.to_dict("records")
    assert line["test"] == "Welch" and math.isfinite(line["effect"])
    sd = math.sqrt((np.std([80, 82, 81], ddof=1) ** 2 + np.std([70, 78, 74], ddof=1) ** 2) / 2)
    assert line["effect"] == pytest.approx((81 - 74) / sd)
    assert line["seeds_needed"] == seeds_needed(line["effect"], 0.05 / LOOKS, paired=False, start=3)
    # the rows pair (same architecture): their seeds become shared, partner's first
    n = line["seeds_needed"]
    assert line["add_row"][:3] == [0, 1, 2] and line["add_best"][:3] == [5, 6, 7]
    assert len(({5, 6, 7} | set(line["add_row"])) & ({0, 1, 2} | set(line["add_best"]))) == n


@pytest.mark.parametrize("rows, why", [
    ({"ce": {0: 0.80}, "focal": {0: 0.70}}, "too few seeds"),
    ({"ce": {0: 0.80, 1: 0.80, 2: 0.80}, "focal": {0: 0.70, 1: 0.70}}, "no spread"),
])
def test_rows_with_too_little_to_estimate_from_are_brought_to_three_shared_seeds(tmp_path, rows, why):
    report = report_of(make_rows(tmp_path / "s", rows))
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    (line,) = plan.lines.to_dict("records")
    assert line["outcome"] == "cannot estimate" and line["seeds_needed"] is None
    focal = set(rows["focal"]) | set(line["add_row"])
    ce = set(rows["ce"]) | set(line["add_best"])
    assert len(focal & ce) == 3 and len(focal) == len(ce) == 3
    md = plan_markdown(plan, report["sweep"], 1)
    assert f"cannot estimate yet ({why}" in md and "would likely settle" not in md
    assert len(plan.commands) == (2 if why == "too few seeds" else 1)


def test_zero_spread_at_three_seeds_says_so_without_a_command(tmp_path):
    rows = {"ce": {s: 0.80 for s in range(3)}, "focal": {s: 0.70 for s in range(3)}}
    report = report_of(make_rows(tmp_path / "s", rows))
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    assert plan.lines.iloc[0]["outcome"] == "cannot estimate" and plan.commands == []
    assert "check that the seed reaches the run" in plan_markdown(plan, report["sweep"], 1)


# ----------------------------------------------------------------------------- commands


@pytest.mark.parametrize("folder", ["multirun/loss", "/tmp/a,b", "with space", "it's", "x=y", "[1]",
                                    "null", "123", 'say "hi"', "a\\b", "{k: v}", "a,b\\"])
def test_a_value_is_quoted_so_that_hydra_reads_it_back_as_it_was(folder):
    command = train_command(["+experiment=a_ce_step", "+tag='x,y'", "~probe"], [3, 4], folder)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "ablate/train.py", "-m"]
    parsed = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(argv[3:])}
    assert parsed["hydra.sweep.dir"].value() == folder and not parsed["hydra.sweep.dir"].is_sweep_override()
    assert list(parsed["seed"].sweep_iterator()) == [3, 4]
    assert parsed["+experiment"].value() == "a_ce_step" and parsed["+tag"].value() == "x,y"
    assert parsed["~probe"].is_delete()
    assert hydra_value("multirun/loss") == "multirun/loss"  # plain folders stay readable


def test_commands_keep_appended_keys_and_train_one_row_each(tmp_path):
    extra = ["+ablation=loss", "+tag='a,b'", "data=synthetic"]
    root = make_rows(tmp_path / "s,1", {"a_ce_step": {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.80, 4: 0.83},
                                        "c_focal_cosine": {0: 0.795, 1: 0.80, 2: 0.825}},
                     key="+experiment", extra=extra)
    report = report_of(root)
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    (line,) = plan.lines.to_dict("records")
    assert line["outcome"] == "add" and line["test"] == "paired"
    n = line["seeds_needed"]
    assert line["add_row"] == [3, 4, *range(5, n)] and line["add_best"] == list(range(5, n))
    commands = {argv[3]: argv for argv in map(shlex.split, plan.commands)}
    assert list(commands) == ["+experiment=a_ce_step", "+experiment=c_focal_cosine"]  # table order
    ce, focal = commands.values()
    assert focal[:-2] == ["python", "ablate/train.py", "-m", "+experiment=c_focal_cosine", *extra]
    assert ce[:-2] == ["python", "ablate/train.py", "-m", "+experiment=a_ce_step", *extra]
    assert ce[-2] == f"seed={','.join(map(str, line['add_best']))}"
    assert focal[-2] == f"seed={','.join(map(str, line['add_row']))}"
    assert focal[-1] == f'hydra.sweep.dir="{root}"'  # the comma quoted for Hydra


def test_single_runs_get_plain_runs_that_land_among_the_single_runs():
    command = train_command(["loss=focal"], [3, 4], "single runs in outputs")
    first, second = (shlex.split(c) for c in command.split(" && "))
    assert first[:4] == ["python", "ablate/train.py", "loss=focal", "seed=3"] and "-m" not in first
    (run_dir,) = [a for a in first if a.startswith("hydra.run.dir=")]
    folder = OverridesParser.create().parse_override(run_dir).value()
    assert folder.startswith("outputs/plan/") and folder.endswith("/seed=3") and second[3] == "seed=4"


def test_the_plan_lists_open_rows_only(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.80, 0.82, 0.81], "focal": [0.795, 0.81, 0.795],
                                       "mse": [0.60, 0.61, 0.59]}, key="loss")
    report = report_of(root)
    table = report["table"].set_index("loss")
    assert table.at["mse", "verdict"] == "worse" and table.at["focal", "verdict"].startswith("no evidence")
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    assert list(plan.lines["row"]) == ["loss=focal"]  # the settled row (mse) needs nothing
    assert sorted(shlex.split(c)[3] for c in plan.commands) == ["loss=ce", "loss=focal"]


def test_make_tables_plan_prints_the_plan_and_its_guard_against_peeking(tmp_path, capsys):
    root = make_sweep(tmp_path / "s", {"ce": [0.80, 0.82, 0.81], "focal": [0.795, 0.81, 0.795]}, key="loss")
    assert make_tables.main(["--root", str(root), "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"### Plan: {root}" in out and "python ablate/train.py -m loss=focal seed=3," in out
    assert "make at most 3 looks" in out


def test_an_optuna_study_is_not_planned_as_seeded_rows(tmp_path, capsys, monkeypatch):
    root = tmp_path / "study"
    (root).mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for trial, (optim, acc) in enumerate({"adam": 0.80, "sgd": 0.75, "sign_sgd": 0.60}.items()):
        # an Optuna trial: the sweeper in its choices (older records), its kind in its record
        make_run(root / str(trial), [f"optim={optim}", "seed=0"], acc=acc,
                 record={"sweep": {"kind": "optuna", "dir": str(root)}})
        hydra_yaml = root / str(trial) / ".hydra" / "hydra.yaml"
        hydra = yaml.safe_load(hydra_yaml.read_text())
        hydra["hydra"]["runtime"]["choices"]["hydra/sweeper"] = "optuna"
        hydra_yaml.write_text(yaml.safe_dump(hydra))
    # the tables' markdown only: a study's plots are plots.py's to test
    monkeypatch.setattr(make_tables, "write_reports", lambda out, runs, frames, reports, *rest: (
        "\n".join(r["markdown"] for r in reports), []))
    assert make_tables.main(["--root", str(root), "--plan"]) == 0
    out = capsys.readouterr().out
    plan = out[out.index("### Plan"):]
    assert "Optuna study" in plan and "not a row of seeds" in plan and "ablate/train.py -m" not in plan


# ----------------------------------------------------------------------------- end to end

# +ablation=loss shrunk to seconds a run: synthetic data, a narrow CNN, 2 epochs; fp32 and one
# thread pin the arithmetic (precision=auto picks bf16 on CPUs with bf16 instructions)
SHRINK = ["data=synthetic", "data.train_size=400", "data.test_size=200", "model.filters=[8,16,32]",
          "epochs=2", "batch_size=64", "scale=0.02", "precision=fp32", "threads=1"]


def seeds_by_row(root: Path) -> dict:
    """Each row's completed seeds, by row identity."""
    runs = collect([root])[0]
    runs = runs[runs["status"] == "completed"]
    return {row: sorted(g["seed"].astype(int)) for row, g in runs.groupby("row_identity")}


@pytest.mark.slow
def test_printed_commands_run_verbatim_train_the_planned_jobs_and_pair_the_rows(tmp_path):
    root = tmp_path / "loss sweep,1"  # a space for the shell, a comma for Hydra
    run_script("ablate/train.py", "-m", "+ablation=loss", *SHRINK, "seed=0,1,2",
               f"hydra.sweep.dir={hydra_value(str(root))}")
    assert sorted(map(len, seeds_by_row(root).values())) == [3, 3, 3, 3]
    # the non-best row with the highest mean keeps only its lowest seed: too little to estimate,
    # so its plan gives it the best's seeds (pairing first), whatever this machine's accuracies
    table = report_of(root)["table"]
    behind = table[table["verdict"] != "best"].sort_values("mean").iloc[-1]
    kept = min(behind["seeds"], key=behind["seeds"].get)
    runs = collect([root])[0]
    for run_dir in runs.loc[(runs["row_identity"] == behind["row"]) & (runs["seed"] != kept), "run_dir"]:
        shutil.rmtree(run_dir)

    report = report_of(root)
    plan = plan_table(report["table"], report["sweep"], report["keys"])
    out = run_script("analysis/make_tables.py", "--root", str(root), "--plan", "--out", str(tmp_path / "t")).stdout
    printed = [line.strip() for line in out[out.index("### Plan"):].splitlines() if line.startswith("    python ")]
    assert printed == plan.commands and printed  # what the user copies is what was planned
    lines = plan.lines.set_index("identity")
    assert lines.at[behind["row"], "outcome"] == "cannot estimate"
    assert lines.at[behind["row"], "add_row"] == sorted(set(range(3)) - {kept})  # the best's seeds
    before = seeds_by_row(root)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    for command in printed:  # verbatim, through the shell, from the folder the docs run it in
        proc = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    after = seeds_by_row(root)
    # exactly the planned jobs: each row gains the seeds the plan named for it, nothing else
    best = report["table"].loc[report["table"]["verdict"] == "best", "row"].iloc[0]
    named = {row: set() for row in after}
    for row, line in lines.iterrows():
        named[row] |= set(line["add_row"])
        named[best] |= set(line["add_best"])
    assert {row: set(after[row]) - set(before[row]) for row in after} == named
    assert all(len(after[row]) == len(set(after[row])) for row in after)
    # and the compared rows end with the planned number of shared seeds
    for row, line in lines[lines["target"].notna()].iterrows():
        assert len(set(after[row]) & set(after[best])) >= line["target"]
