"""The seed report's configurations as presets, its tables as one-command sweeps, and the
reproduction report."""
import json
import re
import statistics

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ablate.train import run
from ablate.validation import validate
from conftest import CONF, REPO, TINY, compose_cfg, run_script

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Each table of the seed report and the row labels its one command must produce.
TABLES = {
    "activation": ("Activation", ["relu", "leaky_relu", "elu"]),
    "loss": ("Preset", ["a_ce_step", "b_label_smoothing_cosine", "c_focal_cosine", "d_mse_relu"]),
    "optimizer": ("Optimizer", ["adam", "sgd", "sign_sgd"]),
    "scheduler": ("Scheduler", ["step", "plateau", "cosine"]),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_builds(preset):
    cfg = compose_cfg([f"+experiment={preset}", "data=synthetic"])
    validate(cfg)
    model = instantiate(cfg.model)
    instantiate(cfg.sched)(instantiate(cfg.optim)(model.parameters()))


def test_presets_carry_the_seed_settings():
    d = compose_cfg(["+experiment=d_mse_relu"])
    assert list(d.model.filters) == [128, 256, 512] and d.epochs == 100
    assert d.model.activation._target_ == "torch.nn.ReLU" and d.loss._target_.endswith("OneHotMSELoss")
    best = compose_cfg(["+experiment=best"])
    assert best.model.activation.negative_slope == 0.05 and best.model.dropout == 0.4
    assert best.optim.lr == 2e-3 and best.loss.label_smoothing == 0.15 and best.sched.T_max == 100
    a = compose_cfg(["+experiment=a_ce_step"])
    assert a.l1_lambda == 1e-3 and a.grad_clip == 1.0 and a.sched.step_size == 20
    sched = compose_cfg(["+experiment=scheduler_base", "sched=plateau"])
    assert (sched.sched.patience, sched.sched.factor, sched.sched.min_lr) == (3, 0.2, 1e-5)


def test_scale_shortens_a_preset_and_its_schedule(tmp_path):
    cfg = compose_cfg(["+experiment=b_label_smoothing_cosine", *TINY[:3], "model.filters=[8,16,32]",
                       "scale=0.02"])
    record = run(cfg, tmp_path, choices={}, overrides=[])
    assert record.epochs == 2 and record.epochs_run == 2 and record.scale == 0.02
    assert cfg.sched.T_max == 2  # the cosine period follows the scaled epochs


def test_best_weights_also_get_the_seed_style_name(tmp_path):
    record = run(compose_cfg([*TINY, "loss=label_smoothing", "sched=cosine"]), tmp_path, {}, [])
    assert re.fullmatch(r"best_model_LeakyReLU_LabelSmoothingCrossEntropy_Adam_"
                        r"CosineAnnealingLR_\d{4}\.pth", record.weights_file)
    assert record.weights_file.endswith(f"{round(record.best_test_acc * 10000):04d}.pth")
    state = torch.load(tmp_path / record.weights_file, weights_only=True)
    assert torch.equal(state["classifier.7.bias"],
                       torch.load(tmp_path / "best_model.pth", weights_only=True)["classifier.7.bias"])


@pytest.mark.slow
def test_every_table_is_one_command_with_seeds_ci_and_a_reproduction_report(tmp_path):
    tiny = ["data=synthetic", "data.train_size=200", "data.test_size=100", "epochs=1",
            "model.filters=[8,16,32]", "seed=0,1",
            "precision=fp32"]  # pinned: the rows below read fp32, and auto is bf16 on a bf16 CPU
    for table in TABLES:
        run_script("ablate/train.py", "-m", f"+ablation={table}", *tiny,
                   f"hydra.sweep.dir={tmp_path / table}")
    out = tmp_path / "tables"
    run_script("analysis/make_tables.py", "--root", str(tmp_path), "--out", str(out))
    for table, (header, rows) in TABLES.items():
        md = (out / "tables.md").read_text().split(f"### {tmp_path / table} — ")[1].split("\n#")[0]
        lines = [ln for ln in md.splitlines() if ln.startswith("|")]
        assert lines[0].split("|")[1].strip() == header
        assert "95% bootstrap interval" in lines[0] and "vs best" in lines[0]
        assert [ln.split("|")[1].strip() for ln in lines[2:2 + len(rows)]] == rows
        assert all(ln.split("|")[4].strip() == "2" for ln in lines[2:2 + len(rows)])  # n = 2 seeds per row
    repro = (out / "reproduction.md").read_text()
    # smaller filters make these variants of the rows; synthetic data never gets a difference
    assert re.search(r"\| activation +\| LeakyReLU +\| +89\.45 \| variant: model.filters=\[8, 16, 32\] +\| "
                     r"synthetic data +\| fp32 +\| synthetic +\| +\d+\.\d+ +\| \[\d+\.\d+, \d+\.\d+\] +\| +2 \|.*\| - \(not comparable\) \|", repro)
    assert repro.count("| synthetic data ") == 13  # every table row, none pooled with other scales
    assert re.search(r"\| future work +\| SWA +\| +85\.17 \| - +\| - +\| - +\| - +\| not run ", repro)


def test_scale_shrinks_the_swa_window_with_the_epochs():
    cfg = compose_cfg(["+experiment=swa", "scale=0.06"])
    assert (cfg.epochs, cfg.swa.start_epoch, cfg.swa.anneal_epochs) == (3, 2, 1)
    validate(cfg)


def test_scale_reaches_every_epoch_valued_setting_through_the_config():
    step = compose_cfg(["+experiment=optimizer_base", "scale=0.1"])  # +ablation=optimizer's rows
    assert (step.epochs, step.sched.step_size) == (5, 2)
    plateau = compose_cfg(["sched=plateau", "scale=0.1"])
    assert (plateau.epochs, plateau.sched.patience, plateau.sched.cooldown) == (5, 1, 1)
    assert compose_cfg(["scale=0.1"]).sched.T_max == 5
    assert compose_cfg(["sched=step", "sched.step_size=7", "scale=0.1"]).sched.step_size == 7  # as typed


def test_scaled_step_lr_decays_within_a_quick_look(tmp_path):
    # a_ce_step: StepLR every 20 of 50 epochs; at scale 0.04 that is every epoch of 2.
    cfg = compose_cfg(["+experiment=a_ce_step", *TINY[:3], "model.filters=[8,16,32]", "scale=0.04"])
    run(cfg, tmp_path, choices={}, overrides=[])
    lrs = pd.read_csv(tmp_path / "metrics.csv")["lr"].tolist()
    assert lrs == pytest.approx([1e-3, 1e-4])


def test_tuned_optimizer_preset_gives_each_optimizer_its_own_grid():
    grids = {"adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "sgd": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
             "sign_sgd": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}
    for optim, grid in grids.items():
        assert 1e-3 in grid  # the seed's fixed lr: the untuned table is part of the sweep
        for step, lr in enumerate(grid):
            cfg = compose_cfg(["+experiment=optimizer_tuned", f"optim={optim}", f"lr_step={step}"])
            validate(cfg)
            assert cfg.optim.lr == pytest.approx(lr) and cfg.data.val_size > 0
    sweep = OmegaConf.load(CONF / "ablation" / "optimizer_tuned.yaml").hydra.sweeper.params
    assert sweep["optim"] == "adam,sgd,sign_sgd" and sweep["lr_step"] == "0,1,2,3,4"


# ----------------------------------------------------------------------------- the whole report

def test_report_sweep_is_every_seed_row_once_each_its_own_preset():
    from analysis.reproduction import load_seed_results
    from benchmarks import sweep_hours

    jobs = sweep_hours.expand(["+ablation=report"])  # as `ablate/train.py -m` launches them
    rows = load_seed_results()
    listed = [o.split("=", 1)[1] for job in jobs for o in job if o.startswith("+experiment=")]
    assert len(jobs) == len(listed) == len(rows) == 16  # one run per row, no seed swept
    assert sorted(listed) == sorted(r.get("preset") or r["match"]["experiment"] for r in rows)

    def resolved(overrides: list[str]) -> dict:
        return OmegaConf.to_container(compose("config", overrides), resolve=True)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for row in (r for r in rows if "preset" in r):
            typed = [f"+{k}={v}" if k == "experiment" else f"{k}={v}" for k, v in row["match"].items()]
            # the one-file preset is exactly the row the table ablations train: their runs pool
            assert resolved([f"+experiment={row['preset']}"]) == resolved(typed), row["row"]


@pytest.mark.slow
def test_report_rows_are_distinct_runs_cheapest_first_and_their_hours_come_from_records():
    from benchmarks import sweep_hours

    jobs = sweep_hours.plan(["+ablation=report"])
    assert len(jobs) == 16  # of 16 launched, one per configuration: no two rows are the same run
    costs = [j.flops for j in jobs]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    assert jobs[-1].overrides[0] == "+experiment=resnet_adamw" and jobs[-1].epochs == 100
    # hours = epochs x images x FLOPs / (the records' median images/s x their model's FLOPs): the
    # seed CNN's 50-epoch rows take as long as the committed fp32 records of that model say
    out = sweep_hours.table(jobs, sweep_hours.speeds(REPO / "docs" / "results"))
    fp32 = [json.loads((REPO / "docs/results" / name / "result.json").read_text())
            for name in ("activation_leaky_relu", "precision/precision=fp32,seed=1")]
    assert {r["precision"] for r in fp32} == {"fp32"} and {r["params"] for r in fp32} == {2_603_274}
    rate = statistics.median(r["images_per_second"] for r in fp32)
    hours = 50 * 49_920 / rate / 3600  # 390 full batches of 128 an epoch
    line = next(ln for ln in out.splitlines() if "`+experiment=activation_leaky_relu`" in ln)
    assert line.split("|")[-2].strip() == f"{hours:.1f}"  # the cpu fp32 column (sorted last)
    assert "**16 runs**" in out


@pytest.mark.slow
def test_tiny_report_rows_train_resume_fuse_and_fill_the_reproduction_report(tmp_path):
    # Overrides every report preset accepts (model sizes differ: CNN filters, ResNet width), so
    # two cheap rows at full width. fp32 pinned: auto is bf16 on a CPU with bf16 instructions.
    tiny = ["data=synthetic", "data.train_size=128", "data.test_size=64", "scale=0.02",
            "save_weights=false", "precision=fp32", "threads=2"]
    sweep = ["-m", "+ablation=report", "+experiment=activation_relu,swa", "seed=0,1",
             "hydra/launcher=fused", *tiny, f"hydra.sweep.dir={tmp_path / 'report'}"]
    first = run_script("ablate/train.py", *sweep)
    assert "4 jobs: 4 completed" in first.stdout + first.stderr
    assert "fused 2 seeds (0, 1)" in first.stdout + first.stderr  # the ReLU row's seeds, stacked
    again = run_script("ablate/train.py", *sweep)
    assert "4 jobs: 4 skipped" in again.stdout + again.stderr  # resumable: nothing retrained
    run_script("analysis/make_tables.py", "--root", str(tmp_path / "report"), "--out", str(tmp_path / "t"))
    repro = (tmp_path / "t" / "reproduction.md").read_text()
    # +experiment=activation_relu is the ReLU row itself (at synthetic scale), two seeds pooled
    assert re.search(r"\| activation +\| ReLU +\| +89\.31 \| as preset +\| synthetic data +\| fp32 "
                     r"+\| synthetic +\| +\d+\.\d+ +\| \[\d+\.\d+, \d+\.\d+\] +\| +2 \|", repro)
    assert re.search(r"\| future work +\| SWA +\| +85\.17 \| as preset +\| synthetic data ", repro)
    assert re.search(r"\| activation +\| eLU +\| +87\.45 \| - .*\| not run ", repro)


def test_committed_full_scale_records_fill_the_activation_table_and_the_headline_row():
    from analysis.reproduction import hydra_composer, load_seed_results, reproduction_table
    from analysis.runs import collect

    runs, _ = collect([REPO / "docs" / "results"])
    table = reproduction_table(runs, load_seed_results(), hydra_composer())
    rows = table[(table["Table"] == "activation")].set_index(["Row", "Precision"])
    assert (rows["Runs"] == "as preset").all() and (rows["Scale"] == "full scale").all()
    # a row trained in two precisions is two lines, never pooled
    assert sorted(rows.index) == [("LeakyReLU", "bf16"), ("LeakyReLU", "fp32"), ("ReLU", "bf16"),
                                  ("eLU", "bf16")]
    # best epoch against the seed's best epoch (like for like), last epoch beside it
    assert rows.loc[("ReLU", "bf16"), "Difference, best epoch (pts)"] == f"{85.15 - 89.31:+.2f}"
    assert rows.loc[("eLU", "bf16"), "Difference, best epoch (pts)"] == f"{84.63 - 87.45:+.2f}"
    assert rows.loc[("ReLU", "bf16"), "Difference (pts)"] == f"{85.03 - 89.31:+.2f}"
    # LeakyReLU in each precision: its completed seeds (the first record and docs/results/precision)
    leaky = runs[runs["run_dir"].str.contains("leaky_relu|precision=") & (runs["status"] == "completed")]
    for precision, done in leaky.groupby(leaky["config"].map(lambda config: config["precision"])):
        line = rows.loc[("LeakyReLU", precision)]
        assert line["n"] == len(done) == 2
        assert line["Ours (%)"] == f"{100 * done['final_test_acc'].mean():.2f}"
        assert line["Difference, best epoch (pts)"] == f"{100 * done['best_test_acc'].mean() - 89.45:+.2f}"
    assert rows.loc[("LeakyReLU", "fp32"), "Difference, best epoch (pts)"] == f"{(86.51 + 86.57) / 2 - 89.45:+.2f}"
    assert rows.loc[("LeakyReLU", "bf16"), "Difference, best epoch (pts)"] == f"{(86.10 + 86.45) / 2 - 89.45:+.2f}"
    [best] = table[table["Table"] == "best"].to_dict("records")  # 100 epochs, bf16
    assert (best["Runs"], best["Scale"], best["Precision"]) == ("as preset", "full scale", "bf16")
    assert best["Epochs (ours / seed)"] == "100 / 100"
    assert best["Difference, best epoch (pts)"] == f"{88.39 - 91.53:+.2f}"
    assert best["Difference (pts)"] == f"{88.17 - 91.53:+.2f}"
