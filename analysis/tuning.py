"""Fair comparisons: tune each arm on validation accuracy, report its test accuracy there, and
show how the verdict depends on the tuning budget (Dodge et al. 2019, "Show Your Work")."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.tables import (HEADERS, PLUMBING, TESTS_NOTE, bootstrap_interval, common_pairing,
                             compare_with_best, fmt, label, mean_sd, verdict_text)


class TuningError(ValueError):
    """The runs cannot be tuned as asked (no such swept key, or no validation split)."""


def check_tunable(runs: pd.DataFrame, keys: list[str], tune: list[str]) -> None:
    """Tuning needs the key swept and a validation split: choosing on the test set would report
    the best of several test scores, which overstates every arm."""
    missing = [k for k in tune if k not in keys]
    if missing:
        raise TuningError(f"--tune {', '.join(missing)}: not a swept key here "
                          f"(swept: {', '.join(keys) or 'none'})")
    done = runs[runs["status"] == "completed"]
    no_val = done[~(done["val_images"].fillna(0) > 0)]  # a split with no number is another matter
    if len(no_val):
        raise TuningError(
            f"--tune needs a validation split, and {len(no_val)} of {len(done)} completed runs have "
            f"none (data.val_size=0), e.g. {no_val['run_dir'].iloc[0]}. Choosing a value by its test "
            "accuracy and then reporting that test accuracy overstates it; re-run the sweep with "
            "data.val_size=5000 (or any size > 0).")


def moving_settings(arm: pd.DataFrame, tune: list[str]) -> list[str]:
    """Resolved settings that change along the tuned keys inside one arm (e.g. optim.lr when the
    sweep went over a grid position lr_step), so the chosen value can be shown in real units."""
    configs = list(arm["config"])
    keys = {k for c in configs for k in c} - set(PLUMBING) - set(tune)
    return sorted(k for k in keys if len({str(c.get(k)) for c in configs}) > 1)


def tuned_table(runs: pd.DataFrame, keys: list[str], tune: list[str]) -> pd.DataFrame:
    """Per arm (the other swept keys): the tuned values with the best mean validation accuracy
    over seeds, and the arm's test accuracy there (mean, sd, interval, n, per seed)."""
    check_tunable(runs, keys, tune)
    arms = [k for k in keys if k not in tune]
    usable = (runs["status"] == "completed") & runs["acc"].notna() & runs["best_val_acc"].notna()
    done = label(runs[usable], keys)
    # runs of the grid that give no number (diverged, failed, ...): the row says how many
    lost = label(runs[~usable & ~runs["status"].isin(("duplicate", "unreadable", "unfinished"))], keys)
    out = []
    for arm_values, arm in (done.groupby(arms, sort=False) if arms else [((), done)]):
        arm_values = arm_values if isinstance(arm_values, tuple) else (arm_values,)
        val = arm.groupby(tune, sort=False)["best_val_acc"].mean()
        choice = val.idxmax()  # the validation set decides; the test set is only read afterwards
        choice = choice if isinstance(choice, tuple) else (choice,)
        chosen = arm[np.logical_and.reduce([arm[k] == v for k, v in zip(tune, choice)])]
        cell = lost[np.logical_and.reduce([lost[k] == v for k, v in zip([*arms, *tune], [*arm_values, *choice])])] \
            if len(lost) else lost
        acc = chosen["acc"].to_numpy(dtype=float) * 100
        mean, sd = mean_sd(acc)
        lo, hi = bootstrap_interval(acc)
        shown = moving_settings(arm, tune)
        units = {k: chosen["config"].iloc[0].get(k) for k in shown}
        out.append({**dict(zip(arms, arm_values)), "chosen": dict(zip(tune, choice)), "units": units,
                    "grid": len(val), "val_mean": float(val.max()) * 100, "n": len(acc), "mean": mean,
                    "std": sd, "ci_low": lo, "ci_high": hi, "seeds": dict(zip(chosen["seed"], acc)),
                    "pairing": common_pairing(chosen),
                    "lost": ", ".join(f"{n} {status}" for status, n in cell["status"].value_counts().items())})
    return compare_with_best(pd.DataFrame(out))


def tuned_title(table: pd.DataFrame, arms: list[str], tune: list[str]) -> str:
    """'optim: 3 arms, each tuned over 5 values of lr_step x 3 seeds'."""
    grids, seeds = sorted(set(table["grid"])), sorted(set(table["n"]))
    span = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
    return (f"{', '.join(arms) or 'all runs'}: {len(table)} arm{'s' * (len(table) != 1)}, each tuned "
            f"over {span(grids)} values of {', '.join(tune)} x {span(seeds)} seeds")


def tuned_markdown(table: pd.DataFrame, arms: list[str], tune: list[str], title: str) -> str:
    shown = pd.DataFrame({HEADERS.get(k, k): table[k] for k in arms} if arms else
                         {"Arm": ["(all runs)"] * len(table)})
    shown["Chosen on validation"] = [
        ", ".join(f"{k}={v}" for k, v in {**c, **u}.items()) for c, u in zip(table["chosen"], table["units"])]
    shown["Val acc (%)"] = [fmt(v) for v in table["val_mean"]]
    shown["Test Accuracy (%)"] = [f"{fmt(m)} ± {fmt(s)}" if n > 1 else fmt(m)
                                  for m, s, n in zip(table["mean"], table["std"], table["n"])]
    shown["95% bootstrap interval"] = [f"[{fmt(lo)}, {fmt(hi)}]" if not math.isnan(lo) else "-"
                                       for lo, hi in zip(table["ci_low"], table["ci_high"])]
    shown["n"] = table["n"]
    shown["Seeds without a number"] = [lost or "-" for lost in table["lost"]]
    shown["Grid"] = table["grid"]
    shown["vs best"] = [verdict_text(row) for _, row in table.iterrows()]
    note = (f"Tuned over {', '.join(tune)}: per arm, the value with the best mean validation accuracy "
            f"over seeds (Val acc), and the arm's test accuracy at the epoch of best validation "
            f"accuracy for that value (mean ± sd over seeds, 95% percentile-bootstrap interval). The "
            f"test set plays no part in the choice; seeds of the chosen value that ended without a "
            f"number (diverged, failed) are counted apart, never averaged in. vs best: {TESTS_NOTE}")
    return f"### Tuned: {title}\n\n{shown.to_markdown(index=False)}\n\n{note}\n"


def expected_max(values, k: int) -> float:
    """Expected maximum of k draws with replacement from the empirical distribution of `values`,
    exactly: with v sorted ascending, E[max] = sum_i v_i ((i/N)^k - ((i-1)/N)^k)."""
    v = np.sort(np.asarray(values, dtype=float))
    cdf = np.arange(1, len(v) + 1) / len(v)
    return float(np.sum(v * (cdf ** k - (cdf - 1 / len(v)) ** k)))


def budget_curves(runs: pd.DataFrame, keys: list[str], tune: list[str]) -> pd.DataFrame:
    """Per arm and budget k = 1..N: the expected best validation accuracy (%) when k of the arm's
    N runs (grid values x seeds, each one draw) are tried at random."""
    arms = [k for k in keys if k not in tune]
    done = label(runs[(runs["status"] == "completed") & runs["best_val_acc"].notna()], keys)
    rows = []
    for arm_values, arm in (done.groupby(arms, sort=False) if arms else [((), done)]):
        arm_values = arm_values if isinstance(arm_values, tuple) else (arm_values,)
        name = ", ".join(map(str, arm_values)) or "all runs"
        vals = arm["best_val_acc"].to_numpy(dtype=float) * 100
        rows += [{"arm": name, "k": k, "expected_best_val": expected_max(vals, k)}
                 for k in range(1, len(vals) + 1)]
    return pd.DataFrame(rows)


def budget_figure(curves: pd.DataFrame, arms: list[str], tune: list[str], title: str):
    """Expected best validation accuracy against the number of configurations tried, one line per
    arm (with its N runs in the legend); a tick at every k drawn, labelled up to the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FixedLocator, NullFormatter

    def labelled(last: int) -> list[int]:
        """Every k up to 12, else 1, 2, 3, 5, 10, 20, 50, ... and the last k (a round k too close
        to it to label apart gives way)."""
        if last <= 12:
            return list(range(1, last + 1))
        nice = [k for k in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if k < last / 1.25]
        return [*nice, last]

    fig, ax = plt.subplots(figsize=(8.6, 4.6), layout="constrained")
    drawn = curves.dropna(subset=["expected_best_val"])  # an arm without a number gets no legend entry
    runs = drawn.groupby("arm", sort=False)["k"].max()
    drawn = drawn.assign(arm=[f"{arm} (N={runs[arm]} runs)" for arm in drawn["arm"]])
    sns.lineplot(data=drawn, x="k", y="expected_best_val", hue="arm", marker="o", markersize=4,
                 palette="tab10" if len(runs) <= 10 else "husl", legend=bool(len(runs)), ax=ax)
    ax.set(xscale="log", xlabel="configurations tried (log scale): runs drawn at random from the grid x seeds",
           ylabel="expected best validation accuracy (%)")
    last = int(curves["k"].max()) if len(curves) else 1
    ax.xaxis.set_minor_locator(FixedLocator(range(1, last + 1)))  # a tick at every k drawn
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = labelled(last)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlim(0.9, last * 1.1)
    ax.grid(alpha=0.3, which="major")
    if ax.get_legend() is not None:  # outside the axes: it never hides a curve
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title_fontsize=8,
                        title=" / ".join(HEADERS.get(k, k) for k in arms) or None)
    fig.suptitle(f"Expected best validation accuracy by budget\n{title}", fontsize=11)
    fig.supxlabel(f"each point: the expected best of k runs drawn at random from the arm's N (grid of "
                  f"{', '.join(tune)} x seeds), computed exactly", fontsize=8, color="0.3")
    return fig
