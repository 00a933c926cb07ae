"""BN study analysis: loss band over learning rates, convergence table, Santurkar landscape panels.

    python analysis/bn_study.py --root multirun/2026-01-01/12-00-00 --out outputs/bn

collect() reads run folders; everything else is a pure function of DataFrames; main() writes
band.png, val_acc.png, landscape.png (when the probe ran) and bn_study.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from analysis.plots import dodge, percent_axis
from analysis.runs import collect as runs_collector
from analysis.runs import printable

VARIANTS = ("no BN", "BN")  # fixed order and colours in every plot
PALETTE = {"no BN": "tab:red", "BN": "tab:blue"}


# ----------------------------------------------------------------------------- collect

CSVS = ("metrics", "steps", "landscape")


def collect(root: Path) -> dict[str, pd.DataFrame]:
    """Runs (with a record) under root as runs/metrics/steps/landscape frames keyed by `run`, plus
    `skipped`: the folders left out (damaged, unfinished, copies) and why. Never raises on bad files."""
    found, frames = runs_collector([Path(root)], csvs=CSVS)
    usable = found["status"].isin(("completed", "completed without accuracy", "diverged", "failed",
                                   "interrupted"))
    lr = [cfg.get("optim.lr") for cfg in found["config"]]
    usable &= pd.Series([isinstance(x, (int, float)) for x in lr], index=found.index)
    ok = found[usable]
    runs = pd.DataFrame({
        "run": [str(Path(d).relative_to(root)) for d in ok["run_dir"]],
        "model": [c.get("model") for c in ok["choices"]], "optim": [c.get("optim") for c in ok["choices"]],
        # the label follows what was built, whichever preset or key chose it
        "variant": ["BN" if cfg.get("model.batchnorm") else "no BN" for cfg in ok["config"]],
        "lr": [float(cfg["optim.lr"]) for cfg in ok["config"]], "status": ok["status"],
        "best_test_acc": ok["best_test_acc"], "final_test_acc": ok["final_test_acc"]})
    if runs.empty:
        raise FileNotFoundError(f"no run folders with a readable result.json under {root}")
    names = dict(zip(ok["run_dir"], runs["run"]))
    out = {"runs": runs.reset_index(drop=True),
           "skipped": found.loc[~usable, ["run_dir", "status", "error"]].reset_index(drop=True)}
    for name in CSVS:
        frame = frames[name]
        frame = frame[frame["run_dir"].isin(names)]
        out[name] = frame.assign(run=frame["run_dir"].map(names)).drop(columns="run_dir")
    return out


# ----------------------------------------------------------------------------- summarize

def _with_runs(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Label rows with their run's variant and configured lr (metrics.csv's own lr column goes)."""
    return frame.drop(columns=["lr"], errors="ignore").merge(runs[["run", "variant", "lr"]], on="run")


def loss_band(steps: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant and step: min and max training loss over the learning rates, and their gap."""
    df = _with_runs(steps, runs)
    df["loss"] = df["loss"].where(np.isfinite(df["loss"]))  # a diverged rate leaves the band
    band = df.groupby(["variant", "step"])["loss"].agg(lo="min", hi="max", runs="count")
    # one usable rate has no band: its width is unknown, not 0 (which would make a ratio of 0)
    band["width"] = (band["hi"] - band["lo"]).where(band["runs"] >= 2)
    return band.reset_index()


def band_summary(band: pd.DataFrame, early_steps: int) -> pd.DataFrame:
    """Mean band width per variant over the first `early_steps` steps and overall, plus no-BN/BN."""
    out = pd.DataFrame({
        f"early (steps < {early_steps})": band[band["step"] < early_steps].groupby("variant")["width"].mean(),
        "overall": band.groupby("variant")["width"].mean(),
    })
    out = out.reindex([v for v in VARIANTS if v in out.index])
    if {"BN", "no BN"} <= set(out.index):
        out.loc["no BN / BN"] = out.loc["no BN"] / out.loc["BN"]
    return out


def first_epoch_reaching(accs: pd.Series, epochs: pd.Series, threshold: float) -> int | str:
    hit = epochs[accs >= threshold]
    return int(hit.min()) if len(hit) else "never"


def convergence_table(runs: pd.DataFrame, metrics: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per variant x lr: best/final accuracy (validation when there is one), epoch to threshold, diverged."""
    rows = []
    for run in runs.itertuples():
        m = metrics[metrics["run"] == run.run].sort_values("epoch") if len(metrics) else pd.DataFrame(
            columns=["epoch", "train_loss", "val_acc", "test_acc"])  # every run killed before epoch 1
        acc_col = "val_acc" if len(m) and m["val_acc"].notna().all() else "test_acc"
        acc = m[acc_col] if len(m) else pd.Series(dtype=float)
        diverged = run.status == "diverged" or not np.isfinite(m["train_loss"].astype(float)).all()
        rows.append({"variant": run.variant, "lr": run.lr, "acc on": acc_col.split("_")[0],
                     "best acc": acc.max() if len(acc) else np.nan,
                     "final acc": acc.iloc[-1] if len(acc) else np.nan,
                     f"first epoch >= {threshold:.0%}": first_epoch_reaching(acc, m["epoch"], threshold),
                     "final test acc": run.final_test_acc, "epochs run": len(m),
                     "diverged": bool(diverged), "status": run.status})
    table = pd.DataFrame(rows)
    table["variant"] = pd.Categorical(table["variant"], VARIANTS)
    return table.sort_values(["variant", "lr"]).reset_index(drop=True)


def landscape_panels(landscape: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run and probed step: loss range, gradient-change range and effective beta over step sizes."""
    df = _with_runs(landscape, runs)
    df["beta"] = df["grad_dist"] / df["step_norm"]
    panels = df.groupby(["variant", "lr", "run", "step"]).agg(
        loss_lo=("loss", "min"), loss_hi=("loss", "max"),
        grad_lo=("grad_dist", "min"), grad_hi=("grad_dist", "max"), beta=("beta", "max"))
    return panels.reset_index()


def landscape_summary(panels: pd.DataFrame) -> pd.DataFrame:
    """Mean over probed steps, per variant and lr, of each panel's quantity."""
    df = panels.assign(loss_range=panels["loss_hi"] - panels["loss_lo"])
    means = df.groupby(["variant", "lr"])[["loss_range", "grad_hi", "beta"]].mean().reset_index()
    means["variant"] = pd.Categorical(means["variant"], VARIANTS)
    return means.sort_values(["variant", "lr"]).rename(columns={
        "loss_range": "loss range", "grad_hi": "max grad change", "beta": "effective beta"})


# ----------------------------------------------------------------------------- render

def _variants(frame: pd.DataFrame):
    return [v for v in VARIANTS if v in set(frame["variant"])]


def _counts(runs: pd.DataFrame) -> str:
    """'6 runs: BN 3, no BN 3' (what a figure is drawn from)."""
    per = runs.groupby("variant").size()
    return f"{len(runs)} run{'s' * (len(runs) != 1)}: " + ", ".join(f"{v} {per[v]}" for v in _variants(runs))


def _title(sweep: str | None, what: str, runs: pd.DataFrame | None) -> str:
    counts = f"\n({_counts(runs)})" if runs is not None else ""
    return printable(f"{sweep + ': ' if sweep else ''}{what}{counts}")


def _n(counts: pd.Series) -> str:
    """The seeds behind a legend entry: '3', or '1-3' when they differ."""
    ns = sorted({int(n) for n in counts}) or [0]
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _legend_outside(ax, title: str | None = None) -> None:
    if ax.get_legend() is not None:  # off the axes: the first epochs stay in view
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title=title, title_fontsize=8)


def plot_band(steps: pd.DataFrame, runs: pd.DataFrame, sweep: str | None = None) -> plt.Figure:
    """Per variant: the median training loss over its learning rates and the min-max band."""
    df = _with_runs(steps, runs)
    df["loss"] = df["loss"].where(np.isfinite(df["loss"]))  # a diverged rate leaves the band
    lrs = df.dropna(subset=["loss"]).groupby("variant")["lr"].nunique()
    df["variant"] = [f"{v}: {lrs[v]} lrs" if lrs.get(v, 0) > 1 else f"{v}: one usable lr, no band"
                     for v in df["variant"]]
    order = [t for v in VARIANTS for t in dict.fromkeys(df["variant"]) if t.split(":")[0] == v]
    fig, ax = plt.subplots(figsize=(9, 4.6), layout="constrained")
    sns.lineplot(data=df, x="step", y="loss", hue="variant", hue_order=order, estimator="median",
                 errorbar=("pi", 100), palette={t: PALETTE[t.split(":")[0]] for t in order}, lw=1, ax=ax)
    ax.set(xlabel="training step", ylabel="training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(_title(sweep, "Training-loss band over learning rates", runs), fontsize=11)
    _legend_outside(ax)
    fig.supxlabel("line: median over the learning rates (and seeds); band: their min-max range",
                  fontsize=8, color="0.3")
    return fig


def _threshold(ax, threshold: float) -> str:
    """Draw the table's threshold when it lies near the data (within one data span of it), with its
    label inside the axes; else say in the caption that it is off the axis."""
    low, high = ax.get_ylim()
    span, level = high - low, threshold * 100
    if not low - span <= level <= high + span:
        side = "above" if level > high else "below"
        return (f"; the threshold {threshold:.0%} (the table's first epoch >=) lies far {side} the data: "
                "not drawn")
    ax.axhline(level, color="grey", ls=":", lw=1.2)
    low, high = min(low, level), max(high, level)
    pad = 0.08 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    upper = level > (low + high) / 2  # the label on the side of the line with room
    ax.annotate(f"threshold {threshold:.0%}", (0.99, level), xycoords=("axes fraction", "data"),
                xytext=(0, -3 if upper else 3), textcoords="offset points", ha="right",
                va="top" if upper else "bottom", fontsize=8, color="0.35")
    return f"; dotted: the threshold {threshold:.0%} (the table's first epoch >=)"


def plot_val_acc(metrics: pd.DataFrame, runs: pd.DataFrame, threshold: float = 0.5,
                 sweep: str | None = None) -> plt.Figure:
    """Accuracy (%) per epoch: colour is the variant, dashes and marker the learning rate; mean
    over seeds with a ± 1 sd band where a (variant, lr) has several. With one epoch: accuracy
    against the learning rate, a point with its ± 1 sd bar per variant and rate."""
    df = _with_runs(metrics, runs)
    acc = "val_acc" if df["val_acc"].notna().all() else "test_acc"
    df = df.assign(pct=df[acc] * 100)
    seeds = df.groupby(["variant", "lr", "epoch"])["run"].nunique()
    name = {"val_acc": "validation accuracy (%)", "test_acc": "test accuracy (%)"}[acc]
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    one_epoch = df["epoch"].nunique() == 1
    if one_epoch:  # no epoch axis to draw lines along
        per = seeds.groupby(level="variant")
        df["variant"] = [f"{v} (n={_n(per.get_group(v))})" for v in df["variant"]]
        order = [t for v in VARIANTS for t in dict.fromkeys(df["variant"]) if t.split(" (")[0] == v]
        df["lr"] = dodge(df, "lr", "variant", 0.015, log=True)  # equal accuracies stay visible side by side
        sns.lineplot(data=df, x="lr", y="pct", hue="variant", hue_order=order, marker="o", markersize=7,
                     palette={t: PALETTE[t.split(" (")[0]] for t in order}, errorbar="sd",
                     err_style="bars", err_kws={"capsize": 4}, ax=ax)
        ax.set(xscale="log", xlabel="learning rate (log scale)",
               ylabel=name.replace(" (", f" after epoch {int(df['epoch'].iloc[0])} ("))
        spread = "point: mean over seeds; bar: ± 1 sd over the seeds" if seeds.max() > 1 else "each point is one run"
    else:
        per = seeds.groupby(level="lr")
        df["learning rate"] = [f"lr {lr:g} (n={_n(per.get_group(lr))})" for lr in df["lr"]]
        sns.lineplot(data=df.rename(columns={"variant": "BatchNorm"}), x="epoch", y="pct", hue="BatchNorm",
                     hue_order=_variants(df), palette=PALETTE, style="learning rate",
                     style_order=list(dict.fromkeys(df.sort_values("lr")["learning rate"])), markers=True,
                     errorbar="sd", ax=ax)
        ax.set(xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        spread = ("line: mean over seeds; band: ± 1 sd over the seeds" if seeds.max() > 1
                  else "one seed per variant and lr: each line is one run (no band)")
    percent_axis(ax)
    spread += _threshold(ax, threshold)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    what = name.split(" (")[0].capitalize()
    what = f"{what} after epoch {int(df['epoch'].iloc[0])}, by learning rate" if one_epoch else f"{what} per epoch"
    ax.set_title(_title(sweep, what, runs), fontsize=11)
    fig.supxlabel(spread, fontsize=8, color="0.3")
    return fig


def plot_landscape(landscape: pd.DataFrame, runs: pd.DataFrame, sweep: str | None = None) -> plt.Figure:
    """Santurkar et al. Fig. 4: loss landscape, gradient predictiveness, effective beta-smoothness;
    colour is the variant, dashes and markers tell its learning rates apart."""
    df = _with_runs(landscape, runs)
    beta = landscape_panels(landscape, runs)
    several = df["lr"].nunique() > 1
    label = lambda frame: [f"{v}, lr {lr:g}" if several else v  # noqa: E731
                           for v, lr in zip(frame["variant"], frame["lr"])]
    n = beta.groupby(["variant", "lr"])["run"].nunique()
    names = {f"{v}, lr {lr:g}" if several else v: f" ({k} run{'s' * (k != 1)})" for (v, lr), k in n.items()}
    df["curve"], beta["curve"] = label(df), label(beta)
    order = sorted(names, key=lambda t: (VARIANTS.index(t.split(",")[0]), t))
    common = dict(x="step", hue="curve", hue_order=order, style="curve", style_order=order,
                  palette={t: PALETTE[t.split(",")[0]] for t in order})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    sns.lineplot(data=df, y="loss", estimator="median", errorbar=("pi", 100), legend=False, ax=axes[0], **common)
    sns.lineplot(data=df, y="grad_dist", estimator="median", errorbar=("pi", 100), legend=False, ax=axes[1],
                 **common)
    sns.lineplot(data=beta, y="beta", markers=True, errorbar=None, ax=axes[2], **common)
    axes[0].set(title="loss landscape: L(w - eta g) over eta", ylabel="loss")
    axes[1].set(title="gradient predictiveness: ||g(w - eta g) - g||", ylabel="l2 distance")
    axes[2].set(title="effective beta-smoothness", ylabel="max ||dg|| / ||eta g||")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend = axes[2].get_legend()
    for text in legend.get_texts():
        text.set_text(text.get_text() + names.get(text.get_text(), ""))
    _legend_outside(axes[2])
    fig.suptitle(_title(sweep, "Loss landscape along the gradient (Santurkar et al., Fig. 4)", runs), fontsize=11)
    fig.supxlabel("line: median over the probed step sizes eta at each probed training step; band: their "
                  "min-max range (and over the seeds)", fontsize=8, color="0.3")
    return fig


def _markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """4 significant digits; a percentage column ('... (%)') with 2 decimals."""
    columns = ([frame.index.name] if index else []) + list(frame.columns)
    return frame.to_markdown(index=index, missingval="-",
                             floatfmt=[".2f" if str(c).endswith("(%)") else ".4g" for c in columns])


def _percent(table: pd.DataFrame) -> pd.DataFrame:
    """The convergence table with its accuracies (fractions) as percentages."""
    accs = {"best acc": "best acc (%)", "final acc": "final acc (%)", "final test acc": "final test acc (%)"}
    shown = table.assign(**{c: pd.to_numeric(table[c], errors="coerce") * 100 for c in accs})
    return shown.rename(columns=accs)


def report(data: dict[str, pd.DataFrame], threshold: float = 0.5,
           sweep: str | None = None) -> tuple[str, dict[str, plt.Figure]]:
    """The markdown report and the figures, from collect()'s frames; `sweep` names the study
    in titles."""
    runs, figs = data["runs"], {}
    table = convergence_table(runs, data["metrics"], threshold)
    parts = ["## Convergence", _markdown(_percent(table)),
             f"One row per run ({_counts(runs)}). best / final acc (%): accuracy on the set in "
             f"'acc on' (val: the held-out validation split; test when the run held none out), the "
             f"best over its epochs and the one after the last; first epoch >= {threshold:.0%}: the "
             f"first epoch at which that accuracy reached {threshold:.0%} (never: it did not); final "
             f"test acc (%): test accuracy after the last epoch; diverged: the loss became non-finite "
             f"or the run stopped as diverged."]
    if len(data["metrics"]):
        figs["val_acc"] = plot_val_acc(data["metrics"], runs, threshold, sweep)
    band = loss_band(data["steps"], runs) if len(data["steps"]) else None
    if band is not None and band["runs"].max() > 1:  # a band needs at least two learning rates
        # "early" = the first epoch's steps, whatever the data size
        early = int((data["steps"]["epoch"] == 1).groupby(data["steps"]["run"]).sum().max())
        summary = band_summary(band, early)
        parts += ["## Training-loss band over learning rates (mean max-min gap)",
                  _markdown(summary, index=True),
                  "Per variant and training step, the gap between the highest and the lowest training "
                  "loss over its learning rates, averaged over the first epoch's steps (early) and all "
                  "steps (overall); no BN / BN: their ratio (above 1: BN's losses depend less on the "
                  "learning rate)."]
        if summary.isna().any().any():
            parts.append("nan: a variant has fewer than two usable learning rates, so no band.")
        figs["band"] = plot_band(data["steps"], runs, sweep)
    if len(data["landscape"]):
        panels = landscape_panels(data["landscape"], runs)
        parts += ["## Loss landscape (Santurkar et al.), mean over probed steps",
                  _markdown(landscape_summary(panels)),
                  "Per variant and learning rate, means over the probed training steps of: the range "
                  "of the loss along the gradient over the probed step sizes (loss range), the largest "
                  "change of the gradient there (max grad change) and that change per unit step "
                  "(effective beta; lower: smoother)."]
        figs["landscape"] = plot_landscape(data["landscape"], runs, sweep)
    skipped = data.get("skipped", pd.DataFrame())
    if len(skipped):
        parts += ["## Run folders left out", _markdown(skipped.fillna(""))]
    return "\n\n".join(parts) + "\n", figs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a multirun sweep folder")
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs and bn_study.md go")
    parser.add_argument("--threshold", type=float, default=0.5, help="accuracy for 'epochs to'")
    args = parser.parse_args(argv)
    try:
        runs = collect(args.root)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}; run the study first (see README)") from None
    text, figs = report(runs, args.threshold, sweep=args.root.resolve().name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bn_study.md").write_text(text)
    for name, fig in figs.items():
        fig.savefig(args.out / f"{name}.png", dpi=120)
        plt.close(fig)
    print(text)


if __name__ == "__main__":
    main()
