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
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.runs import collect as runs_collector

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


def plot_band(band: pd.DataFrame) -> plt.Figure:
    """Both variants' min-max loss band over learning rates on one axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v in _variants(band):
        b = band[band["variant"] == v]
        ax.fill_between(b["step"], b["lo"], b["hi"], color=PALETTE[v], alpha=0.35, lw=0,
                        label=f"{v}: min-max over lrs")
        ax.plot(b["step"], b["lo"], color=PALETTE[v], lw=0.6)
        ax.plot(b["step"], b["hi"], color=PALETTE[v], lw=0.6)
    ax.set(xlabel="training step", ylabel="training loss", title="Loss band over learning rates")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_val_acc(metrics: pd.DataFrame, runs: pd.DataFrame, threshold: float = 0.5) -> plt.Figure:
    df = _with_runs(metrics, runs)
    acc = "val_acc" if df["val_acc"].notna().all() else "test_acc"
    lrs = ["{:g}".format(lr) for lr in sorted(df["lr"].unique())]
    df["lr"] = df["lr"].map("{:g}".format)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(df, x="epoch", y=acc, hue="variant", style="lr", palette=PALETTE, marker="o",
                 hue_order=_variants(df), style_order=lrs, ax=ax)
    ax.axhline(threshold, color="grey", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(ylabel=acc.replace("_", " "), title=f"{acc.split('_')[0].title()} accuracy per epoch")
    fig.tight_layout()
    return fig


def plot_landscape(panels: pd.DataFrame) -> plt.Figure:
    """Santurkar et al. Fig. 4: loss landscape, gradient predictiveness, effective beta-smoothness."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lrs = sorted(panels["lr"].unique(), reverse=True)
    for (v, lr), p in panels.groupby(["variant", "lr"], sort=False):
        label = f"{v}, lr {lr:g}" if len(lrs) > 1 else v
        i = lrs.index(lr)  # lighter bands and other dashes for each further learning rate
        kw = dict(color=PALETTE[v], alpha=0.35 / (1 + i), lw=0)
        axes[0].fill_between(p["step"], p["loss_lo"], p["loss_hi"], label=label, **kw)
        axes[1].fill_between(p["step"], p["grad_lo"], p["grad_hi"], label=label, **kw)
        axes[2].plot(p["step"], p["beta"], color=PALETTE[v], marker=".", label=label,
                     ls=["-", "--", ":", "-."][i % 4])
    axes[0].set(title="loss landscape: L(w - eta g) over eta", ylabel="loss")
    axes[1].set(title="gradient predictiveness: ||g(w - eta g) - g||", ylabel="l2 distance")
    axes[2].set(title="effective beta-smoothness", ylabel="max ||dg|| / ||eta g||")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend()
    fig.tight_layout()
    return fig


def _markdown(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_markdown(index=index, floatfmt=".4g")


def report(data: dict[str, pd.DataFrame], threshold: float = 0.5) -> tuple[str, dict[str, plt.Figure]]:
    """The markdown report and the figures, from collect()'s frames."""
    runs, figs = data["runs"], {}
    parts = ["## Convergence", _markdown(convergence_table(runs, data["metrics"], threshold))]
    if len(data["metrics"]):
        figs["val_acc"] = plot_val_acc(data["metrics"], runs, threshold)
    band = loss_band(data["steps"], runs) if len(data["steps"]) else None
    if band is not None and band["runs"].max() > 1:  # a band needs at least two learning rates
        # "early" = the first epoch's steps, whatever the data size
        early = int((data["steps"]["epoch"] == 1).groupby(data["steps"]["run"]).sum().max())
        summary = band_summary(band, early)
        parts += ["## Training-loss band over learning rates (mean max-min gap)",
                  _markdown(summary, index=True)]
        if summary.isna().any().any():
            parts.append("nan: a variant has fewer than two usable learning rates, so no band.")
        figs["band"] = plot_band(band)
    if len(data["landscape"]):
        panels = landscape_panels(data["landscape"], runs)
        parts += ["## Loss landscape (Santurkar et al.), mean over probed steps",
                  _markdown(landscape_summary(panels))]
        figs["landscape"] = plot_landscape(panels)
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
    text, figs = report(runs, args.threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bn_study.md").write_text(text)
    for name, fig in figs.items():
        fig.savefig(args.out / f"{name}.png", dpi=120)
        plt.close(fig)
    print(text)


if __name__ == "__main__":
    main()
