"""What the plots show, read back from the figures seaborn drew: a point per variant with its sd bar
for one epoch, one visual channel per swept key, each variant's n in the legend, accuracy in % with
a line at 100% off the frame, mixed epoch counts with their bars set apart, an Optuna study on a
log axis under its name, tuned optimizers by learning rate with a diverging loss fenced off, one
configuration named in the title, the BN study's threshold only near its data."""
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.collections import LineCollection, PolyCollection

from ablate.record import METRIC_COLUMNS
from analysis import bn_study
from analysis.plots import curves_figure
from analysis.runs import collect
from analysis.tables import sweep_reports
from analysis.tuning import budget_curves, budget_figure
from test_analysis import make_run, make_sweep


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def complete_metrics(root) -> None:
    """Every column a run's metrics.csv has (ablate.record.METRIC_COLUMNS); made-up runs leave
    out the ones these tests do not look at."""
    for path in root.rglob("metrics.csv"):
        frame = pd.read_csv(path)
        frame.reindex(columns=list(dict.fromkeys([*METRIC_COLUMNS, *frame.columns]))).to_csv(path, index=False)


def figure(root):
    complete_metrics(root)
    runs, frames = collect([root])
    (report,) = sweep_reports(runs)
    return curves_figure(runs, frames["metrics"], report["keys"], report["title"]), report


def legend_texts(fig) -> list[str]:
    (legend,) = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for t in legend.get_texts()]


def data_lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


def bands(ax):
    """The ± sd bands drawn (seaborn leaves an empty one for a variant with n = 1)."""
    return [c for c in ax.collections if isinstance(c, PolyCollection)
            and any(np.isfinite(p.vertices).all() and np.ptp(p.vertices[:, 1]) > 0 for p in c.get_paths())]


def caption(fig) -> str:
    return fig._supxlabel.get_text()


def with_curve(run_dir, test_acc, train_loss=None):
    """Replace a made-up run's metrics.csv by these per-epoch values."""
    epochs = range(1, len(test_acc) + 1)
    pd.DataFrame({"epoch": epochs, "test_acc": test_acc, "train_acc": test_acc,
                  "train_loss": train_loss or [1.0] * len(test_acc)}).to_csv(run_dir / "metrics.csv", index=False)


def grid(root) -> None:
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")


def test_one_epoch_is_a_point_per_variant_with_an_sd_bar(tmp_path):
    root = make_sweep(tmp_path / "quick", {"relu": [0.40, 0.42, 0.41], "elu": [0.38]}, epochs=1)
    fig, report = figure(root)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["relu", "elu"]
    assert "after epoch 1" in ax.get_ylabel() and ax.get_ylabel().endswith("(%)")
    points = [line for line in ax.get_lines() if line.get_marker() not in ("None", "", None)]
    ys = [y for p in points for y in p.get_ydata() if np.isfinite(y)]
    assert sorted(ys) == pytest.approx([38.0, 41.0])  # in %, the mean
    bars = [y[np.isfinite(y)] for y in (np.asarray(line.get_ydata(), float) for line in ax.get_lines()
                                        if line.get_marker() in ("None", "", None)) if np.isfinite(y).any()]
    (bar,) = bars  # relu's three seeds have an sd (a bar with caps); elu's one seed has none
    assert (bar.min(), bar.max()) == pytest.approx((41 - 1, 41 + 1))
    assert legend_texts(fig) == ["relu (n=3)", "elu (n=1)"]
    assert "bar: ± 1 sd" in caption(fig) and "n = 1 have no bar" in caption(fig)
    assert fig._suptitle.get_text() == f"quick — {report['title']}"


def test_two_keys_one_channel_each_on_lines_and_bands(tmp_path):
    root = tmp_path / "grid"
    grid(root)
    job = 0
    for loss in ("ce", "mse"):
        for act in ("relu", "elu"):
            for seed in range(2 if (loss, act) != ("mse", "elu") else 1):
                make_run(root / str(job), [f"loss={loss}", f"model/activation={act}", f"seed={seed}"],
                         acc=0.5 + 0.1 * seed + (loss == "ce") * 0.05, epochs=3)
                job += 1
    fig, _ = figure(root)
    ax = fig.axes[0]
    lines = data_lines(ax)
    assert len(lines) == 4
    assert len({line.get_color() for line in lines}) == 2  # loss -> colour
    assert len({line.get_linestyle() for line in lines}) == 2  # activation -> dashes
    assert len({line.get_marker() for line in lines}) == 2  # and marker
    assert len(bands(ax)) == 3  # mse/elu has n=1: no band
    assert legend_texts(fig) == ["ce, relu (n=2)", "ce, elu (n=2)", "mse, relu (n=2)", "mse, elu (n=1)"]
    assert all(ax.get_legend() is None for ax in fig.axes)  # one legend for both panels
    handles = fig.legends[0].legend_handles
    assert handles[0].get_color() == handles[1].get_color() != handles[2].get_color()
    assert handles[0].get_linestyle() == handles[2].get_linestyle() != handles[1].get_linestyle()
    assert fig.legends[0].get_title().get_text() == "Loss / Activation"


def test_no_legend_entry_without_data_and_no_band_talk_for_single_seeds(tmp_path):
    root = make_sweep(tmp_path / "s", {"relu": [0.8], "elu": [0.7], "gelu": [0.75]})
    (root / "2" / "metrics.csv").unlink()  # gelu completed, but has no curve
    fig, _ = figure(root)
    assert legend_texts(fig) == ["relu (n=1)", "elu (n=1)"]
    assert "sd" not in caption(fig) and "one seed per variant" in caption(fig)
    assert not bands(fig.axes[0])


def test_a_line_at_100_percent_is_inside_the_axes_and_never_cut(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [1.0, 1.0], "mse": [0.9, 0.95]}, key="loss", epochs=3)
    for job in ("0", "1"):
        with_curve(root / job, [0.9, 1.0, 1.0])
    fig, _ = figure(root)
    ax = fig.axes[0]
    top = max(line.get_ydata().max() for line in data_lines(ax))
    assert top == pytest.approx(100.0)
    low, high = ax.get_ylim()
    assert high > 100 + 0.02 * (high - low)  # a margin above the 100% line: not on the frame
    assert low <= min(line.get_ydata().min() for line in data_lines(ax))


def test_mixed_epoch_counts_keep_each_one_epoch_variants_sd_bar_side_by_side(tmp_path):
    # like +ablation=loss at a small scale: presets of 1 and of 3 epochs in one table
    root = tmp_path / "presets"
    grid(root)
    for job, (preset, epochs, accs) in enumerate([("a", 3, [0.6, 0.62]), ("b", 1, [0.3, 0.34]),
                                                  ("c", 1, [0.3, 0.34])]):
        for seed, acc in enumerate(accs):
            make_run(root / f"{job}{seed}", [f"+experiment={preset}", f"seed={seed}"], acc=acc, epochs=epochs)
    fig, _ = figure(root)
    ax = fig.axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection) and len(c.get_segments())]
    segments = [s for c in bars for s in c.get_segments()]
    assert len(segments) == 2  # b and c: one ± 1 sd bar each
    xs = sorted(s[0][0] for s in segments)
    assert xs[0] != xs[1] and all(abs(x - 1) < 0.2 for x in xs)  # at epoch 1, apart
    sd = np.std([30, 34], ddof=1)
    for s in segments:
        assert sorted(s[:, 1]) == pytest.approx([32 - sd, 32 + sd])
    assert "band: ± 1 sd" in caption(fig) and "one epoch: a point with its ± 1 sd bar" in caption(fig)
    assert len(bands(ax)) == 1  # a's band


def optuna_study(root, lrs, values, study="optuna_lr"):
    """Trials as the Optuna sweeper leaves them: hydra/sweeper=optuna, one lr override each."""
    grid(root)
    for i, (lr, value) in enumerate(zip(lrs, values)):
        run = make_run(root / f"optim.lr={lr}", [f"optim.lr={lr}"], acc=value, epochs=2,
                       config={"seed": 0, "optim": {"lr": lr}},
                       status="completed" if value is not None else "diverged",
                       record={"best_val_acc": value, "test_acc_at_best_val": value, "val_images": 500,
                               "sweep": {"kind": "optuna", "study": study}})
        hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["runtime"]["choices"]["hydra/sweeper"] = "optuna"
        hydra["hydra"]["sweeper"] = {"study_name": study}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return root


def test_optuna_study_is_a_scatter_against_a_log_lr_axis_under_the_studys_name(tmp_path):
    lrs = [1.2345678901234567e-05, 0.0003141592653589793, 0.0021, 0.013, 0.09]
    root = optuna_study(tmp_path / "tune_lr", lrs, [0.2, 0.35, 0.45, 0.4, None])
    fig, _ = figure(root)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "optim.lr" in ax.get_xlabel()
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections if hasattr(c, "get_offsets")
                         and not isinstance(c, LineCollection)])
    assert set(np.round(xs, 12)) == set(np.round(lrs[:4], 12))  # numbers, not categories
    title = fig._suptitle.get_text()
    assert title.startswith("Optuna study optuna_lr") and "single runs" not in title
    assert ax.get_legend() is None and not fig.legends  # no legend repeating the values
    assert "1 diverged" in caption(fig)
    assert max(len(re.findall(r"\d", t.get_text())) for t in ax.get_xticklabels()) <= 3  # no 19-digit labels
    assert ax.get_ylim()[1] > 45


def test_tuned_optimizers_by_learning_rate_and_a_diverging_loss_does_not_squash_the_rest(tmp_path):
    # +ablation=optimizer_tuned at one epoch: lr_step is a grid position, each optimizer reads its own lr
    root = tmp_path / "tuned"
    grid(root)
    grids = {"adam": [1e-4, 1e-3, 1e-2], "sgd": [1e-3, 1e-2, 1e-1]}
    for optim, lrs in grids.items():
        for step, lr in enumerate(lrs):
            for seed in range(2):
                run = make_run(root / f"{optim}{step}{seed}", [f"optim={optim}", f"lr_step={step}", f"seed={seed}"],
                               acc=0.4, epochs=1, config={"seed": seed, "lr_step": step, "optim": {"lr": lr}})
                loss = 900.0 if (optim, step) == ("sgd", 2) else 2.0 - step * 0.1 - seed * 0.02
                with_curve(run, [0.3 + 0.02 * step + 0.01 * seed], [loss])
    fig, _ = figure(root)
    acc, loss = fig.axes
    assert acc.get_xscale() == "log" and "optim.lr" in acc.get_xlabel()
    xs = sorted({round(float(x), 6) for line in data_lines(acc) for x in line.get_xdata()})
    assert xs[0] < 2e-4 and xs[-1] > 5e-2  # the learning rates, not lr_step 0-4
    assert legend_texts(fig) == ["adam (n=2)", "sgd (n=2)"]
    low, high = loss.get_ylim()
    assert high < 10  # the 900 does not set the scale
    drawn = np.concatenate([line.get_ydata() for line in data_lines(loss)])
    assert (drawn[drawn < 10] >= low).all() and (drawn[drawn < 10] <= high).all()
    assert any(t.get_text() == "900" for t in loss.texts)  # marked with its value
    assert "above the axis (diverging)" in caption(fig)


def test_one_configuration_is_named_and_has_no_all_runs_legend(tmp_path):
    root = tmp_path / "one"
    grid(root)
    make_run(root / "0", ["loss=focal", "epochs=1"], acc=0.3, epochs=1)
    fig, _ = figure(root)
    ax = fig.axes[0]
    assert all(a.get_legend() is None for a in fig.axes) and not fig.legends
    assert [t.get_text() for t in ax.get_xticklabels()] == []
    assert "all runs" not in fig._suptitle.get_text()
    assert "one configuration: epochs=1, loss=focal (1 run)" in fig._suptitle.get_text()
    assert caption(fig) == "one run: no spread to show"


@pytest.mark.parametrize("runs_per_arm, labelled", [(6, ["1", "2", "3", "4", "5", "6"]),
                                                    (15, ["1", "2", "3", "5", "10", "15"]),
                                                    (22, ["1", "2", "3", "5", "10", "22"])])
def test_budget_axis_is_marked_log_and_ticks_reach_the_last_k(runs_per_arm, labelled):
    rng = np.random.default_rng(0)
    rows = [{"status": "completed", "best_val_acc": v, "overrides": {"optim": arm, "optim.lr": str(i)},
             "config": {}} for arm in ("sgd", "adam") for i, v in enumerate(rng.uniform(0.5, 0.7, runs_per_arm))]
    curves = budget_curves(pd.DataFrame(rows), ["optim", "optim.lr"], ["optim.lr"])
    curves = pd.concat([curves, pd.DataFrame({"arm": ["lost"], "k": [1], "expected_best_val": [np.nan]})])
    fig = budget_figure(curves, ["optim"], ["optim.lr"], "optim: 2 arms")
    ax = fig.axes[0]
    assert "(log scale)" in ax.get_xlabel() and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == labelled
    ticks = {*ax.get_xticks(), *ax.xaxis.get_minorticklocs()}
    assert sorted(ticks) == list(range(1, runs_per_arm + 1))  # a tick at every k drawn
    assert legend_texts(fig) == [f"sgd (N={runs_per_arm} runs)", f"adam (N={runs_per_arm} runs)"]  # not "lost"
    (first, _) = data_lines(ax)
    assert first.get_ydata()[-1] == pytest.approx(curves[curves["arm"] == "sgd"]["expected_best_val"].max())


def study(root, epochs, seeds=1, accs=(0.3, 0.6), probe=False):
    for bn in (True, False):
        for lr in (1e-3, 1e-2):
            for seed in range(seeds):
                run = root / f"{bn}_{lr}_{seed}"
                (run / ".hydra").mkdir(parents=True)
                (run / ".hydra" / "config.yaml").write_text(
                    f"seed: {seed}\nmodel:\n  batchnorm: {str(bn).lower()}\noptim:\n  lr: {lr}\n")
                (run / ".hydra" / "hydra.yaml").write_text(
                    "hydra:\n  runtime:\n    choices: {optim: adam}\n"
                    f"  overrides:\n    task: [optim.lr={lr}, seed={seed}]\n")
                acc = np.linspace(accs[0], accs[1] if bn else (accs[0] + accs[1]) / 2, epochs) + 0.01 * seed
                (run / "result.json").write_text(json.dumps({"status": "completed", "epochs_run": epochs,
                                                             "final_test_acc": acc[-1], "best_test_acc": acc.max()}))
                pd.DataFrame(dict(epoch=range(1, epochs + 1), train_loss=2.0, test_acc=acc, val_acc=acc)).reindex(
                    columns=METRIC_COLUMNS).to_csv(run / "metrics.csv", index=False)
                steps = dict(step=range(8), epoch=[1] * 4 + [2] * 4, loss=np.linspace(2.3, 1.0 + lr, 8))
                pd.DataFrame(steps).to_csv(run / "steps.csv", index=False)  # a row per step: epochs repeat
                if probe:  # the landscape probe: 3 step sizes at steps 0 and 4
                    etas = np.array([0.5, 1.0, 2.0]) * lr
                    pd.DataFrame(dict(step=[0] * 3 + [4] * 3, multiplier=[0.5, 1, 2] * 2, eta=[*etas, *etas],
                                      loss0=2.0, loss=[2.0, 2.1, 2.4, 1.5, 1.6, 1.9], grad_norm=1.0,
                                      grad_dist=[0.1, 0.2, 0.4] * 2, step_norm=[*etas, *etas])).to_csv(
                        run / "landscape.csv", index=False)
    return root


def test_bn_study_accuracy_in_percent_legend_off_the_axes_threshold_labelled_inside(tmp_path):
    text, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=4, seeds=2)), sweep="bn")
    fig = figs["val_acc"]
    ax = fig.axes[0]
    ys = np.concatenate([line.get_ydata() for line in data_lines(ax) if len(set(line.get_ydata())) > 1])
    assert 25 <= ys.min() and ys.max() <= 75  # percent, not fractions
    assert ax.get_ylabel() == "validation accuracy (%)"
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1  # off the axes
    (threshold,) = [line for line in ax.get_lines() if list(line.get_ydata()) == [50, 50]]
    (note,) = [t for t in ax.texts if t.get_text() == "threshold 50%"]
    low, high = ax.get_ylim()
    assert low < 50 < high and 0.03 < (50 - low) / (high - low) < 0.97  # the label is not on the frame
    assert ax.get_title() == "bn: Validation accuracy per epoch\n(8 runs: no BN 4, BN 4)"
    assert "± 1 sd" in fig._supxlabel.get_text()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "lr 0.001 (n=2)" in texts and "BN" in texts and "no BN" in texts
    assert figs["band"].axes[0].get_title().startswith("bn: Training-loss band")
    band_texts = [t.get_text() for t in figs["band"].axes[0].get_legend().get_texts()]
    assert band_texts == ["no BN: 2 lrs", "BN: 2 lrs"]
    # the markdown: accuracies in %, with a caption saying what each column is
    assert "best acc (%)" in text and " 60.00 |" in text and "One row per run (8 runs" in text
    assert "0.6 " not in text.split("## Training-loss")[0]


def test_bn_study_axis_fits_data_far_below_the_threshold(tmp_path):
    # a tiny study: 15-22% accuracy; the 50% threshold would leave the data a third of the axis
    _, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=3, accs=(0.15, 0.22))), sweep="bn")
    fig = figs["val_acc"]
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high < 30 and low > 10
    assert not [line for line in ax.get_lines() if list(line.get_ydata()) == [50, 50]]
    assert "threshold 50%" in fig._supxlabel.get_text() and "not drawn" in fig._supxlabel.get_text()


def test_bn_study_one_epoch_is_accuracy_against_the_learning_rate(tmp_path):
    _, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=1, seeds=3)), sweep="bn")
    ax = figs["val_acc"].axes[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel()
    assert "after epoch 1" in ax.get_ylabel()
    bars = [c for c in ax.collections if isinstance(c, LineCollection) and len(c.get_segments())]
    assert sum(len(c.get_segments()) for c in bars) == 4  # a ± 1 sd bar per variant and lr
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["no BN (n=3)", "BN (n=3)"]


def test_bn_landscape_panels_band_over_step_sizes_and_runs_in_the_legend(tmp_path):
    _, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=2, probe=True)), sweep="bn")
    fig = figs["landscape"]
    loss, grad, beta = fig.axes
    # the loss band spans the probed step sizes: up to the largest one's loss
    assert any(np.isclose(c.get_paths()[0].vertices[:, 1].max(), 2.4) for c in bands(loss))
    assert max(line.get_ydata().max() for line in data_lines(beta)) == pytest.approx(0.4 / 2e-3)
    texts = [t.get_text() for t in beta.get_legend().get_texts()]
    assert texts == ["no BN, lr 0.001 (1 run)", "no BN, lr 0.01 (1 run)", "BN, lr 0.001 (1 run)",
                     "BN, lr 0.01 (1 run)"]
    assert loss.get_legend() is None and grad.get_legend() is None
