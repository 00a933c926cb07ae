"""Training curves of one sweep: test accuracy and a training panel per epoch, one line per
variant (the mean over its seeds, a ± 1 sd band where it has more than one); with one epoch, one
point per variant with a ± 1 sd bar instead of dots on an epoch axis.

One visual channel per swept key, the same on lines, bands, points and bars: with two keys the
first picks the colour and the second the line style and marker, so 15 variants read as
3 colours x 5 styles rather than 15 colours. The legend lists only variants with data, each with
its n; the caption speaks of a spread only where some variant has one."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.runs import printable  # noqa: E402
from analysis.tables import HEADERS, label  # noqa: E402

LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 2)), (0, (1, 3))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def colours(n: int) -> list:
    """Distinct colours: tab10 for up to 10, else evenly spaced hues."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def looks(variants: list[tuple], two_keys: bool) -> dict[tuple, dict]:
    """Colour, line style and marker per variant (a tuple of its keys' values)."""
    if two_keys:
        firsts = list(dict.fromkeys(v[0] for v in variants))
        seconds = list(dict.fromkeys(v[1] for v in variants))
        hue = dict(zip(firsts, colours(len(firsts))))
        return {v: {"color": hue[v[0]], "ls": LINESTYLES[seconds.index(v[1]) % len(LINESTYLES)],
                    "marker": MARKERS[seconds.index(v[1]) % len(MARKERS)]} for v in variants}
    return {v: {"color": c, "ls": "-", "marker": "o"} for v, c in zip(variants, colours(len(variants)))}


def mean_sd(data: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Mean, sample sd (nan for one value) and n of `column` per group, NaNs left out."""
    return data.groupby(by, sort=False)[column].agg(mean="mean", sd="std", n="count").reset_index()


def draw_lines(ax, stats: pd.DataFrame, key: str, x: str, style: dict) -> bool:
    """One line per `key` value over `x` (stats from mean_sd), with a ± 1 sd band drawn in the
    line's own colour and style where n > 1. Returns whether any band was drawn."""
    banded = False
    for value, s in stats.groupby(key, sort=False):
        look = style[value]
        s = s.sort_values(x)
        ax.plot(s[x], s["mean"], color=look["color"], ls=look["ls"], marker=look["marker"], ms=4, lw=1.6)
        spread = s[s["n"] > 1]
        if len(spread):
            lo, hi = spread["mean"] - spread["sd"], spread["mean"] + spread["sd"]
            ax.fill_between(spread[x], lo, hi, color=look["color"], alpha=0.15, lw=0)
            for edge in (lo, hi):  # the band's edges in the line's style: the style reads on bands too
                ax.plot(spread[x], edge, color=look["color"], ls=look["ls"], lw=0.7, alpha=0.7)
            banded = True
    return banded


def draw_points(ax, stats: pd.DataFrame, key: str, order: list, style: dict, names: list) -> bool:
    """One point per `key` value at its place in `order`, with a ± 1 sd bar where n > 1 (the
    bar in the variant's line style), the x axis labelled with `names` (tuples of values).
    Returns whether any bar was drawn."""
    barred = False
    for value, s in stats.groupby(key, sort=False):
        look, row = style[value], s.iloc[0]
        bar = row["sd"] if row["n"] > 1 else None
        drawn = ax.errorbar(order.index(value), row["mean"], yerr=bar, color=look["color"],
                            marker=look["marker"], ms=7, capsize=5, lw=1.4, ls="none")
        for line in drawn.lines[2]:
            line.set_linestyle(look["ls"])
        barred |= bar is not None
    ax.set_xticks(range(len(order)), [", ".join(map(str, v)) for v in names],
                  rotation=30 if len(order) > 4 else 0, ha="right" if len(order) > 4 else "center")
    ax.set_xlim(-0.6, len(order) - 0.4)
    return barred


def training_panel(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[str, str]:
    """Train loss, unless the variants use different loss functions, whose values share no scale
    (MSE on one-hot targets sits far below cross-entropy): then train accuracy."""
    losses = {(c or {}).get("loss") for c in runs["choices"]}
    if len(losses) > 1 and "train_acc" in curves and curves["train_acc"].notna().any():
        return "train_acc_pct", "train accuracy (%)"
    return "train_loss", "train loss"


def sweep_name(runs: pd.DataFrame) -> str:
    """The sweep's folder name ('single runs in outputs' for runs outside a sweep)."""
    sweeps = list(dict.fromkeys(runs["sweep"])) if "sweep" in runs and len(runs) else []
    if len(sweeps) != 1:
        return ""
    if sweeps[0].startswith("single runs in "):
        return sweeps[0]
    return sweeps[0].replace("\\", "/").rsplit("/", 1)[-1]


def spread_caption(ns: list[int], shape: str) -> str:
    """What the lines/points and bands/bars are, speaking of a spread only where there is one."""
    mark, spread = ("point", "bar") if shape == "points" else ("line", "band")
    if max(ns) < 2:
        return f"one seed per variant: each {mark} is one run (no spread to show)"
    text = f"{mark}: mean over seeds; {spread}: ± 1 sd over the n seeds of each variant (n in the legend)"
    return text + (f"; variants with n = 1 have no {spread}" if min(ns) < 2 else "")


def curves_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], title: str):
    """Two panels (test accuracy, and train loss or train accuracy) sharing one legend outside
    the axes; see the module's docstring for what is drawn."""
    name = sweep_name(runs)
    runs = runs[(runs["status"] == "completed") & runs["acc"].notna()]
    labelled = label(runs, keys)
    values = list(zip(*(labelled[k] for k in keys))) if keys else [("all runs",)] * len(labelled)
    known = list(dict.fromkeys(values))  # the table's order (the order typed)
    labelled["variant"] = [known.index(v) for v in values]
    data = curves.merge(labelled[["run_dir", "variant"]], on="run_dir")
    data = data.assign(test_acc_pct=data["test_acc"] * 100,
                       train_acc_pct=data["train_acc"] * 100 if "train_acc" in data else np.nan)
    order = [i for i in range(len(known)) if i in set(data["variant"])]  # variants with data only
    n = data.groupby("variant")["run_dir"].nunique()
    style = dict(zip(order, looks([known[i] for i in order], len(keys) == 2).values()))
    right = training_panel(runs, curves)
    points = data["epoch"].nunique() == 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for ax, (column, ylabel) in zip(axes, [("test_acc_pct", "test accuracy (%)"), right]):
        stats = mean_sd(data, ["variant", "epoch"], column)
        stats = stats[stats["n"] > 0]
        if points:
            draw_points(ax, stats, "variant", order, style, [known[i] for i in order])
            ax.set(xlabel=" / ".join(HEADERS.get(k, k) for k in keys) or None,
                   ylabel=ylabel.replace(" (", f" after epoch {int(data['epoch'].iloc[0])} (")
                   if "(" in ylabel else f"{ylabel} after epoch {int(data['epoch'].iloc[0])}")
        else:
            draw_lines(ax, stats, "variant", "epoch", style)
            ax.set(xlabel="epoch", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylabel.endswith("(%)"):  # a band of mean ± sd may pass 100 or 0; accuracy cannot
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, 0), min(high, 100))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=style[i]["color"], ls="none" if points else style[i]["ls"],
                      marker=style[i]["marker"], ms=6) for i in order]
    names = [f"{', '.join(map(str, known[i]))} (n={n[i]})" for i in order]
    fig.legend(handles, names, loc="outside right upper", fontsize=8,
               title=" / ".join(HEADERS.get(k, k) for k in keys) or None)
    fig.suptitle(printable(f"{name} — {title}" if name else title))
    caption = spread_caption([int(n[i]) for i in order] or [0], "points" if points else "lines")
    if right[0] == "train_acc_pct":
        caption += "; right: train accuracy, as the variants' losses are on different scales"
    fig.supxlabel(caption, fontsize=8, color="0.3")  # a caption: constrained layout keeps it off the axes
    return fig
