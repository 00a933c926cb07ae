"""Analysis on hand-made run folders: tables, statistics, damaged, copied and failed runs, plots."""
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats

from analysis import make_tables
from analysis.plots import curves_figure
from analysis.reproduction import hydra_composer, reproduction_table
from analysis import runs
from analysis.runs import collect
from analysis.tables import bootstrap_interval, leftovers, sweep_reports
from ablate.record import row_identity
from conftest import compose_cfg, run_script


def make_run(run_dir, overrides, status="completed", acc=None, result="ok", epochs=2, config=None,
             record=None):
    """A run folder as train.py leaves it; result='broken' writes a truncated result.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    settings = dict(o.lstrip("+").split("=", 1) for o in overrides)
    # the resolved config: the seed at the top (as Hydra's), every other setting under set.
    config = config if config is not None else {
        "seed": int(settings.get("seed", 0)), "set": {k: v for k, v in settings.items() if k != "seed"}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {k: v for k, v in settings.items() if "." not in k and k != "seed"}
    hydra = {"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **choices}},
                       "overrides": {"task": overrides}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if result == "broken":
        (run_dir / "result.json").write_text('{"status": "compl')
    elif result == "ok":
        rec = {"status": status, "choices": choices, "overrides": overrides,
               "epochs_run": epochs if status == "completed" else 1,
               "final_test_acc": acc, "best_test_acc": acc, "error": None, **(record or {})}
        (run_dir / "result.json").write_text(json.dumps(rec))
        rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "test_acc": (acc or 0.1) * e / epochs}
                for e in range(1, epochs + 1)]
        pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    return run_dir


def make_sweep(root, accs, key="model/activation", extra=(), epochs=2):
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for value, values in accs.items():
        for seed, acc in enumerate(values):
            make_run(root / str(job), [f"{key}={value}", f"seed={seed}", *extra], acc=acc, epochs=epochs)
            job += 1
    return root


@pytest.fixture
def sweep(tmp_path):
    accs = {"relu": [0.80, 0.82, 0.81], "leaky_relu": [0.83, 0.84, 0.835], "elu": [0.70, 0.71, 0.69]}
    root = make_sweep(tmp_path / "multirun" / "acts", accs)
    make_run(root / "9", ["model/activation=relu", "seed=3"], status="diverged", acc=None)
    make_run(root / "10", ["model/activation=elu", "seed=3"], result="broken")
    make_run(root / "11", ["model/activation=elu", "seed=4"], result=None)
    return root, accs


def test_collect_reads_every_run_including_broken_ones(sweep):
    root, _ = sweep
    runs, frames = collect([root.parent])
    assert len(runs) == 12
    assert sorted(runs["status"].value_counts().items()) == [
        ("completed", 9), ("diverged", 1), ("unfinished", 1), ("unreadable", 1)]
    assert set(frames["metrics"]["run_dir"]) <= set(runs["run_dir"])


def test_table_has_one_row_per_variant_with_mean_sd_interval_and_test(sweep):
    root, accs = sweep
    (report,) = sweep_reports(collect([root.parent])[0])
    assert report["keys"] == ["model/activation"] and report["title"] == "model/activation: 3 variants x 3 seeds"
    table = report["table"].set_index("model/activation")
    assert list(table.index) == ["relu", "leaky_relu", "elu"]
    relu = np.array(accs["relu"]) * 100
    assert table.at["relu", "n"] == 3
    assert table.at["relu", "mean"] == pytest.approx(relu.mean())
    assert table.at["relu", "std"] == pytest.approx(relu.std(ddof=1))
    assert relu.min() <= table.at["relu", "ci_low"] < relu.mean() < table.at["relu", "ci_high"] <= relu.max()
    assert table.at["leaky_relu", "verdict"] == "best"
    assert table.at["elu", "verdict"] == "worse"
    # the same seeds of one architecture: paired on per-seed differences, then Holm over 2 rows
    p = stats.ttest_rel(relu, np.array(accs["leaky_relu"]) * 100).pvalue
    assert table.at["relu", "test"] == "paired" and table.at["relu", "p_vs_best"] == pytest.approx(p)
    q = table.at["elu", "p_vs_best"]
    assert table.at["relu", "p_holm"] == pytest.approx(max(p, 2 * q) if p > q else 2 * p)
    assert "1 diverged" in table.at["relu", "status"]
    # a run whose record cannot be read says nothing of which row it was: it joins none and is
    # listed with the runs that have no number
    assert "unreadable" not in " ".join(table["status"])
    assert "unreadable" in report["markdown"] and "result.json: not valid JSON" in report["markdown"]


def test_markdown_names_the_axis_and_lists_runs_without_a_number(sweep):
    root, _ = sweep
    md = sweep_reports(collect([root.parent])[0])[0]["markdown"]
    assert md.splitlines()[2].startswith("| Activation ")
    assert "| leaky_relu " in md and "paired p=" in md and "Holm p=" in md and "bootstrap" in md
    assert "Runs without a number" in md and "diverged" in md and "unreadable" in md and "no result.json" in md


def test_a_run_still_training_says_how_far_it_got(tmp_path):
    root = make_sweep(tmp_path / "s", {"relu": [0.5]})
    make_run(root / "1", ["model/activation=elu", "seed=0"], status="running",
             config={"seed": 0, "epochs": 100, "set": {"model/activation": "elu"}},
             record={"epochs_run": 37})
    report = sweep_reports(collect([root])[0])[0]
    assert "37 of 100 epochs run" in report["markdown"]
    (left,) = leftovers(collect([root])[0]).to_dict("records")
    assert (left["status"], left["why"]) == ("running", "37 of 100 epochs run")


# ----------------------------------------------------------------------------- damaged folders

def damage(run_dir, how):
    result, metrics = run_dir / "result.json", run_dir / "metrics.csv"
    record = json.loads(result.read_text())
    if how == "list":
        result.write_text(json.dumps([record]))
    elif how == "string number":
        result.write_text(json.dumps({**record, "final_test_acc": "0.9"}))
    elif how == "string choices":
        result.write_text(json.dumps({**record, "choices": "loss=ce"}))
    elif how == "bad metrics":
        metrics.write_text("epoch,train_loss,test_acc\n1,abc,0.5\n")
    elif how == "bad hydra":
        (run_dir / ".hydra" / "hydra.yaml").write_text("hydra: [unclosed\n")
    elif how == "bad config":
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n  oops: [\n")
    elif how == "truncated":
        result.write_text(result.read_text()[:20])


WHERE = {"list": "result.json", "string number": "final_test_acc", "string choices": "choices",
         "bad metrics": "metrics.csv", "bad hydra": "hydra.yaml", "bad config": "config.yaml",
         "truncated": "result.json"}


@pytest.mark.parametrize("how", list(WHERE))
def test_a_damaged_file_marks_its_run_unreadable_with_file_and_reason(tmp_path, how):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82], "mse": [0.7, 0.72]}, key="loss")
    damage(root / "0", how)
    runs, _ = collect([root])
    bad = runs.set_index("run_dir").loc[str(root / "0")]
    assert bad["status"] == "unreadable" and WHERE[how] in bad["error"]
    (report,) = sweep_reports(runs)
    table = report["table"].set_index("loss")
    assert table.at["ce", "n"] == 1 and table.at["mse", "n"] == 2  # the good runs still tabulate
    assert "(default)" not in report["markdown"]  # a run without readable overrides joins no row


def test_make_tables_exits_0_and_lists_every_damaged_run(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82, 0.81], "mse": [0.7, 0.72, 0.71]}, key="loss")
    for job, how in zip([0, 1, 3, 4], ["list", "string number", "bad metrics", "bad hydra"]):
        damage(root / str(job), how)
    proc = run_script("analysis/make_tables.py", "--root", str(root))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stdout.count("| unreadable ") == 4 and "| mse " in proc.stdout


def test_completed_run_with_nan_accuracy_is_shown_not_dropped(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.8, 0.82, float("nan")]}, key="loss")
    (report,) = sweep_reports(collect([root])[0])
    row = report["table"].iloc[0]
    assert row["n"] == 2 and row["status"] == "2 completed, 1 completed without accuracy"
    assert "completed, but final_test_acc is nan" in report["markdown"]


# ----------------------------------------------------------------------------- copies, intervals

def test_copies_of_one_run_count_once_and_are_flagged(tmp_path):
    root = make_sweep(tmp_path / "s", {"ce": [0.8], "mse": [0.7, 0.72, 0.71]}, key="loss")
    import shutil
    shutil.copytree(root / "0", root / "0_copy")
    runs, frames = collect([root])
    assert runs.set_index("run_dir").at[str(root / "0_copy"), "status"] == "duplicate"
    assert str(root / "0_copy") not in set(frames["metrics"]["run_dir"])
    (report,) = sweep_reports(runs)
    ce = report["table"].set_index("loss").loc["ce"]
    assert ce["n"] == 1 and math.isnan(ce["p_vs_best"]) and "1 duplicate" in ce["status"]
    assert f"copy of {root / '0'}" in report["markdown"]


def test_interval_stays_within_0_and_100():
    lo, hi = bootstrap_interval(np.array([100.0, 100.0, 90.0]))
    assert 90 <= lo < hi <= 100
    values = np.array([91.0, 95.0, 99.0, 100.0])
    lo, hi = bootstrap_interval(values)
    assert values.min() <= lo < values.mean() < hi <= 100
    assert bootstrap_interval(values) == (lo, hi)  # fixed resampling seed: same table every time


# ----------------------------------------------------------------------------- failed runs

def test_failed_runs_add_no_columns_or_rows_and_show_a_short_error(tmp_path):
    out = tmp_path / "outputs"
    for seed, acc in enumerate([0.6, 0.62]):
        make_run(out / f"d/{seed}", [f"seed={seed}", "epochs=2"], acc=acc)
    make_run(out / "d/bad", ["optim.lr=-1", "epochs=2"], status="failed",
             record={"error": "ConfigError: invalid config: optim.lr=-1 must be a number > 0; " + "x" * 400})
    (report,) = sweep_reports(collect([out])[0])
    header = report["markdown"].splitlines()[2]
    assert report["keys"] == [] and "optim.lr" not in header and header.count("Epochs") == 1
    assert len(report["table"]) == 1 and report["table"]["n"].tolist() == [2]
    line = next(l for l in report["markdown"].splitlines() if "| failed " in l)
    assert "optim.lr=-1 must be" in line and len(line) < 250


# ----------------------------------------------------------------------------- output folder

def test_each_call_writes_one_self_contained_folder_and_counts_right(tmp_path, capsys):
    a = make_sweep(tmp_path / "a", {"ce": [0.8, 0.82], "mse": [0.7, 0.72]}, key="loss")
    b = make_sweep(tmp_path / "b", {"relu": [0.8, 0.81]})
    assert make_tables.main(["--root", str(a)]) == 0
    assert "wrote tables.md and 1 plot to" in capsys.readouterr().err
    first = sorted(p.name for p in (a / "tables").iterdir())
    assert first == [".written", "a.png", "tables.md"]
    assert make_tables.main(["--root", str(b)]) == 0  # another root: its own folder
    assert (b / "tables" / "tables.md").exists() and sorted(p.name for p in (a / "tables").iterdir()) == first
    shared = tmp_path / "report"
    make_tables.main(["--root", str(a), "--out", str(shared)])
    make_tables.main(["--root", str(b), "--out", str(shared)])  # the previous call's files go
    assert sorted(p.name for p in shared.iterdir()) == [".written", "b.png", "tables.md"]
    assert "| model/activation=relu " in (shared / "tables.md").read_text()
    old = tmp_path / "old"  # written before manifests: its tables.md and plots are ours to replace
    old.mkdir()
    for name in ("tables.md", "reproduction.md", "stale.png"):
        (old / name).write_text("old")
    make_tables.main(["--root", str(b), "--out", str(old)])
    assert sorted(p.name for p in old.iterdir()) == [".written", "b.png", "tables.md"]
    (shared / "bn").mkdir()  # another tool's subfolder, e.g. bn_study --out report/bn
    make_tables.main(["--root", str(a), "--out", str(shared)])
    assert (shared / "bn").is_dir() and sorted(p.name for p in shared.glob("*.png")) == ["a.png"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="did not write"):
        make_tables.main(["--root", str(b), "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_make_tables_without_runs_says_so(tmp_path):
    proc = run_script("analysis/make_tables.py", "--root", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no runs found" in proc.stderr


# ----------------------------------------------------------------------------- plots

def test_plot_title_one_legend_and_train_accuracy_when_losses_differ(tmp_path):
    root = make_sweep(tmp_path / "s", {v: [0.8, 0.81, 0.82] for v in ("ce", "focal", "mse", "label_smoothing")},
                      key="loss")
    runs, frames = collect([root])
    (report,) = sweep_reports(runs)
    assert report["title"] == "loss: 4 variants x 3 seeds"
    fig = curves_figure(runs, frames["metrics"], report["keys"], report["title"])
    assert fig._suptitle.get_text() == "s — loss: 4 variants x 3 seeds"  # the sweep, what it swept, n
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "ce (n=3)"
    assert fig.axes[1].get_ylabel() == "train accuracy (%)"
    assert "± 1 sd over the n seeds" in fig._supxlabel.get_text()
    plt.close(fig)
    one_loss = make_sweep(tmp_path / "t", {"relu": [0.8, 0.81], "elu": [0.7, 0.71]})
    runs, frames = collect([one_loss])
    fig = curves_figure(runs, frames["metrics"], ["model/activation"], "x")
    assert fig.axes[1].get_ylabel() == "train loss"
    plt.close(fig)


# ----------------------------------------------------------------------------- reproduction

def real_run(path, overrides, acc, seed=0, source="cifar10", images=(50_000, 0)):
    """A run whose config.yaml is the real composed config, as Hydra writes it."""
    cfg = compose_cfg([*overrides, f"seed={seed}"])
    return make_run(path, [*overrides, f"seed={seed}"], acc=acc, config=OmegaConf.to_container(cfg),
                    record={"data_source": source, "train_images": images[0], "val_images": images[1],
                            "epochs_run": cfg.epochs})


def test_reproduction_compares_like_with_like(tmp_path):
    out = tmp_path / "outputs"
    for seed, acc in enumerate([0.91, 0.92]):
        real_run(out / f"best{seed}", ["+experiment=best"], acc, seed)
    real_run(out / "lr", ["+experiment=best", "optim.lr=0.01"], 0.5)
    real_run(out / "synth", ["+experiment=best", "data=synthetic"], 0.99, source="synthetic")
    real_run(out / "short", ["+experiment=best", "epochs=3", "data.train_size=10000"], 0.4,
             images=(10_000, 0))
    runs, _ = collect([out])
    seed_rows = [{"table": "best", "row": "best", "accuracy": 91.53, "epochs": 100,
                  "match": {"experiment": "best"}}]
    table = reproduction_table(runs, seed_rows, hydra_composer()).set_index("Runs", drop=False)
    exact = table[(table["Runs"] == "as preset") & (table["Scale"] == "full scale")].iloc[0]
    assert exact["n"] == 2 and exact["Difference (pts)"] == f"{91.5 - 91.53:+.2f}"
    variant = table[table["Runs"].str.startswith("variant")].iloc[0]
    assert variant["Runs"] == "variant: optim.lr=0.01" and variant["n"] == 1
    synth = table[table["Scale"] == "synthetic data"].iloc[0]
    short = table[table["Scale"].str.startswith("reduced")].iloc[0]
    assert short["Scale"] == "reduced: 3 epochs, 10000 train images" and short["n"] == 1
    for row in (variant, synth, short):
        assert row["Difference (pts)"] == "- (not comparable)"
    assert len(table) == 4  # nothing pooled across scales, sources or settings


# ----------------------------------------------------------------------------- reading at scale



@pytest.mark.parametrize("text", [
    "seed: 0\nn: 3\nname: run_${n}\n", "seed: 0\nb: ${nope.x}\n", "seed: 0\na: ${b}\nb: ${a}\n",
    "seed: 0\na: ???\nb: ${a}\n", "seed: 0\na: {b: 1}\nc: ${a}\n", "seed: 0\n'a.b': 1\nc: ${a.b}\n",
    "seed: 0\nh: ${oc.env:HOME}\n", "seed: 0\nscale: 0.5\nepochs: ${scaled:7}\nx: ${epochs}\n",
    "seed: 0\ns: 0.25\nscale: ${s}\nepochs: ${scaled:8}\n", "seed: 0\nlr: 1e-3\nwhen: 2024-01-01\n"])
def test_unusual_configs_get_the_identity_omegaconf_gives(tmp_path, text):
    run = make_run(tmp_path / "r", ["seed=0"], acc=0.5)
    (run / ".hydra" / "config.yaml").write_text(text)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        tree = OmegaConf.to_container(cfg, resolve=False)
    row = collect([tmp_path])[0].iloc[0]
    assert row["status"] == "completed" and row["identity"] == f"{row_identity(tree)}:0"
    assert row["row_identity"] == row_identity(tree)


def test_stacking_gives_what_concatenating_frames_gives():
    a = pd.DataFrame({"epoch": [1, 2], "test_acc": [0.1, 0.2]})
    b = pd.DataFrame({"epoch": [1.0], "grad_norm": [3.0], "test_acc": [0.3]})
    c = pd.DataFrame({"epoch": [3], "lr": [0.5]})
    for frames in ([a, b], [a, a], [a, c], [b, c]):
        pieces = [(f"run{i}", {k: f[k].to_numpy() for k in f}) for i, f in enumerate(frames)]
        expected = pd.concat([f.assign(run_dir=f"run{i}") for i, f in enumerate(frames)], ignore_index=True)
        pd.testing.assert_frame_equal(runs.stack(pieces), expected, check_like=True)
