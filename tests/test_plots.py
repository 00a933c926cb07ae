"""What the plots show at a glance: points with error bars for one epoch, one visual channel per
swept key, each variant's n in the legend and only variants with data there, accuracy in %,
titles naming the sweep and n, a caption that speaks of a spread only where there is one."""
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from analysis import bn_study
from analysis.plots import curves_figure
from analysis.runs import collect
from analysis.tables import sweep_reports
from analysis.tuning import budget_curves, budget_figure
from test_analysis import make_run, make_sweep


def figure(root):
    runs, frames = collect([root])
    (report,) = sweep_reports(runs)
    return curves_figure(runs, frames["metrics"], report["keys"], report["title"]), report


def legend_texts(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def data_lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


def test_one_epoch_is_a_point_per_variant_with_an_sd_bar(tmp_path):
    root = make_sweep(tmp_path / "quick", {"relu": [0.40, 0.42, 0.41], "elu": [0.38]}, epochs=1)
    fig, report = figure(root)
    ax = fig.axes[0]
    assert data_lines(ax) == []  # no lines along a one-value epoch axis
    assert [t.get_text() for t in ax.get_xticklabels()] == ["relu", "elu"]
    assert "after epoch 1" in ax.get_ylabel() and ax.get_ylabel().endswith("(%)")
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 1  # relu's three seeds have an sd; elu's one seed has none
    point = ax.containers[0].lines[0].get_ydata()[0]
    assert point == pytest.approx(41.0)  # in %
    assert legend_texts(fig) == ["relu (n=3)", "elu (n=1)"]
    caption = fig._supxlabel.get_text()
    assert "bar: ± 1 sd" in caption and "n = 1 have no bar" in caption
    assert fig._suptitle.get_text() == f"quick — {report['title']}"
    plt.close(fig)


def test_two_keys_one_channel_each_on_lines_and_bands(tmp_path):
    root = tmp_path / "grid"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for loss in ("ce", "mse"):
        for act in ("relu", "elu"):
            for seed in range(2 if (loss, act) != ("mse", "elu") else 1):
                make_run(root / str(job), [f"loss={loss}", f"model/activation={act}", f"seed={seed}"],
                         acc=0.5 + 0.1 * seed + (loss == "ce") * 0.05, epochs=3)
                job += 1
    fig, _ = figure(root)
    ax = fig.axes[0]
    lines = data_lines(ax)  # the means and the bands' edges
    assert len({line.get_color() for line in lines}) == 2  # loss -> colour
    assert len({line.get_linestyle() for line in lines}) == 2  # activation -> line style
    # bands: filled in the line's colour, edged in its style (2 edges per banded variant)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3  # mse/elu has n=1
    assert len(lines) == 4 + 3 * 2
    assert legend_texts(fig) == ["ce, relu (n=2)", "ce, elu (n=2)", "mse, relu (n=2)", "mse, elu (n=1)"]
    handles = fig.legends[0].legend_handles
    assert handles[0].get_color() == handles[1].get_color() != handles[2].get_color()
    assert handles[0].get_linestyle() == handles[2].get_linestyle() != handles[1].get_linestyle()
    plt.close(fig)


def test_no_legend_entry_without_data_and_no_band_talk_for_single_seeds(tmp_path):
    root = make_sweep(tmp_path / "s", {"relu": [0.8], "elu": [0.7], "gelu": [0.75]})
    (root / "2" / "metrics.csv").unlink()  # gelu completed, but has no curve
    fig, _ = figure(root)
    assert legend_texts(fig) == ["relu (n=1)", "elu (n=1)"]
    caption = fig._supxlabel.get_text()
    assert "sd" not in caption and "one seed per variant" in caption
    assert not [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    plt.close(fig)


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
    plt.close(fig)


def study(root, epochs, seeds=1):
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
                acc = np.linspace(0.3, 0.6 if bn else 0.45, epochs) + 0.01 * seed
                (run / "result.json").write_text(json.dumps({"status": "completed", "epochs_run": epochs,
                                                             "final_test_acc": acc[-1], "best_test_acc": acc.max()}))
                pd.DataFrame(dict(epoch=range(1, epochs + 1), train_loss=2.0, test_acc=acc, val_acc=acc)).to_csv(
                    run / "metrics.csv", index=False)
                steps = dict(step=range(8), epoch=[1] * 4 + [2] * 4, loss=np.linspace(2.3, 1.0 + lr, 8))
                pd.DataFrame(steps).to_csv(run / "steps.csv", index=False)  # a row per step: epochs repeat
    return root


def test_bn_study_accuracy_in_percent_legend_off_the_axes_threshold_labelled(tmp_path):
    text, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=4, seeds=2)), sweep="bn")
    fig = figs["val_acc"]
    ax = fig.axes[0]
    ys = np.concatenate([line.get_ydata() for line in data_lines(ax)])
    assert 25 <= ys.min() and ys.max() <= 75  # percent, not fractions
    assert ax.get_ylabel() == "validation accuracy (%)" and ax.get_legend() is None and len(fig.legends) == 1
    threshold = [line for line in ax.get_lines() if list(line.get_ydata()) == [50, 50]]
    assert threshold and any(t.get_text() == "threshold 50%" for t in ax.texts)
    assert any("threshold 50%" in t for t in legend_texts(fig))
    assert ax.get_title() == "bn: Validation accuracy per epoch\n(8 runs: no BN 4, BN 4)"
    assert "± 1 sd" in fig._supxlabel.get_text() and any("(n=2)" in t for t in legend_texts(fig))
    assert figs["band"].axes[0].get_title().startswith("bn: Training-loss band")
    # the markdown: accuracies in %, with a caption saying what each column is
    assert "best acc (%)" in text and " 60.00 |" in text and "One row per run (8 runs" in text
    assert "0.6 " not in text.split("## Training-loss")[0]
    for f in figs.values():
        plt.close(f)


def test_bn_study_one_epoch_is_accuracy_against_the_learning_rate(tmp_path):
    _, figs = bn_study.report(bn_study.collect(study(tmp_path / "bn", epochs=1, seeds=3)), sweep="bn")
    ax = figs["val_acc"].axes[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel()
    assert "after epoch 1" in ax.get_ylabel() and len([c for c in ax.containers if c.has_yerr]) == 2
    assert legend_texts(figs["val_acc"])[:2] == ["no BN (n=3)", "BN (n=3)"]
    for f in figs.values():
        plt.close(f)
