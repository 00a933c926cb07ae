"""Figures of one sweep, drawn by seaborn.

A grid sweep: test accuracy and a training panel per epoch, one line per variant (the mean over
its seeds with a ± 1 sd band); a variant with one epoch is a point with its ± 1 sd bar, set apart
sideways from others at that epoch. When every variant ran one epoch: a point per variant, or,
when a swept setting is a number (a learning rate), accuracy against it on a numeric axis (log
when it spans decades). An Optuna study: each trial's value against the searched setting.

One visual channel per swept key: the first picks the colour, the second the dashes and marker.
A grid position such as lr_step is shown as the setting it moves (optim.lr). The legend lists
each variant with data and its n; the caption says what is drawn."""
from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.runs import printable  # noqa: E402
from analysis.tables import HEADERS, is_setting, label  # noqa: E402
from analysis.tuning import moving_settings  # noqa: E402

DASHES = ["", (4, 1.5), (1, 1.5), (6, 1.5, 1, 1.5), (3, 1, 1, 1, 1, 1), (8, 2), (1, 3)]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DODGE = 0.12  # epochs between single-epoch points that would otherwise hide one another


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def shown_key(runs: pd.DataFrame, key: str, keys: list[str]) -> str:
    """The numeric setting a numeric grid position moves (lr_step -> optim.lr: the one setting
    that changes along it within every value of the other keys), else the key itself."""
    if runs[key].map(number).isna().any():  # a named choice (optim=adam) is shown as itself
        return key
    others = [k for k in keys if k != key]
    arms = [arm for _, arm in runs.groupby(others, sort=False)] if others else [runs]
    moved = set.intersection(*({s for s in moving_settings(arm, keys)
                                if all(number(c.get(s)) is not None for c in arm["config"])} for arm in arms))
    return moved.pop() if len(moved) == 1 else key


def log_scale(values) -> bool:
    values = np.asarray(values, dtype=float)
    return len(values) > 1 and (values > 0).all() and values.max() / values.min() >= 20


def percent_axis(ax) -> None:
    """Room above and below the data, so a line at 100% stays off the frame; a ± sd band past
    0 or 100 is cut at that margin (the means never are)."""
    low, high = ax.get_ylim()
    margin = 0.05 * (high - low)
    ax.set_ylim(max(low, -margin), min(high, 100 + margin))


def fence_outliers(ax, drawn: pd.DataFrame, what: str) -> str:
    """A diverging variant must not squash the others: means far above the rest (past the upper
    quartile + 3 interquartile ranges) or not finite leave the axis, which spans the rest and
    their sd, and are marked at its top edge with their number. `drawn`: drawn_means' frame.
    Returns a caption note ('' when none)."""
    values = drawn["y"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) < 4:
        return ""
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    fence = q3 + 3 * max(q3 - q1, 0.05 * abs(median))
    out, kept = drawn[~(drawn["y"] <= fence)], drawn[drawn["y"] <= fence]  # above, or not finite
    if out.empty:
        return ""
    low, high = kept["lo"].min(), kept["hi"].max()
    span = max(high - low, 1e-9)
    top = high + 0.15 * span
    ax.set_ylim(low - 0.05 * span, top)
    sns.scatterplot(x=out["x"].to_numpy(), y=[top] * len(out), marker="^", color="black", s=60,
                    clip_on=False, legend=False, ax=ax, zorder=5)
    for x, y in zip(out["x"], out["y"]):
        ax.annotate(f"{y:.3g}", (x, top), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7)
    return (f"▲ on the top edge: {len(out)} mean{'s' * (len(out) != 1)} of {what} above the axis "
            "(diverging), its number beside it")


def training_panel(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[str, str]:
    """Train loss, unless the variants use different loss functions, whose values share no scale
    (MSE on one-hot targets sits far below cross-entropy): then train accuracy."""
    losses = {(c or {}).get("loss") for c in runs["choices"]}
    if len(losses) > 1 and "train_acc" in curves and curves["train_acc"].notna().any():
        return "train_acc_pct", "train accuracy (%)"
    return "train_loss", "train loss"


def sweep_name(runs: pd.DataFrame) -> str:
    """The Optuna study's name, else the sweep's folder name ('single runs in outputs' for runs
    outside a sweep)."""
    studies = runs["study"].dropna().unique() if "study" in runs else []
    if len(studies) == 1:
        return str(studies[0])
    sweeps = list(dict.fromkeys(runs["sweep"])) if "sweep" in runs and len(runs) else []
    if len(sweeps) != 1:
        return ""
    if sweeps[0].startswith("single runs in "):
        return sweeps[0]
    return sweeps[0].replace("\\", "/").rsplit("/", 1)[-1]


def configuration(runs: pd.DataFrame) -> str:
    """What every run of a one-configuration sweep set: 'epochs=2, loss=focal', or 'defaults'."""
    shared = None
    for typed in runs["overrides"]:
        items = {(k, str(v)) for k, v in (typed or {}).items() if is_setting(k)}
        shared = items if shared is None else shared & items
    return ", ".join(f"{k}={v}" for k, v in sorted(shared or ())) or "defaults"


def variants(runs: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per run: its variant's name, its colour and style levels, and a column per shown key
    (a grid position replaced by the setting it moves, as a number); and the shown keys."""
    labelled = label(runs, keys)
    shown = [shown_key(labelled, k, keys) for k in keys]
    out = pd.DataFrame({"run_dir": labelled["run_dir"].to_numpy(),
                        "colour": labelled[keys[0]].to_numpy() if keys else "",
                        "style": labelled[keys[1]].to_numpy() if len(keys) > 1 else ""})
    for k, s in zip(keys, shown):
        out[s] = labelled[k].to_numpy() if s == k else [c.get(s) for c in labelled["config"]]
    text = [[str(v) if s == k else f"{s.rsplit('.', 1)[-1]} {v:g}" for v in out[s]] for k, s in zip(keys, shown)]
    out["name"] = [", ".join(t) for t in zip(*text)] if keys else "all runs"
    return out, shown


def looks(data: pd.DataFrame, by: str) -> tuple[dict, dict, dict]:
    """Palette, dashes and markers per level of `by`: colour from the first key, dashes and
    marker from the second."""
    rows = data.drop_duplicates(by)
    colours, styles = list(dict.fromkeys(rows["colour"])), list(dict.fromkeys(rows["style"]))
    palette = dict(zip(colours, sns.color_palette("tab10" if len(colours) <= 10 else "husl", len(colours))))
    return ({r[by]: palette[r["colour"]] for _, r in rows.iterrows()},
            {r[by]: DASHES[styles.index(r["style"]) % len(DASHES)] for _, r in rows.iterrows()},
            {r[by]: MARKERS[styles.index(r["style"]) % len(MARKERS)] for _, r in rows.iterrows()})


def spread_caption(ns: list[int], shape: str) -> str:
    """What the lines/points and bands/bars are, speaking of a spread only where there is one."""
    mark, spread = ("point", "bar") if shape == "points" else ("line", "band")
    if max(ns) < 2:
        return f"one seed per variant: each {mark} is one run (no spread to show)"
    text = f"{mark}: mean over seeds; {spread}: ± 1 sd over the n seeds of each variant (n in the legend)"
    return text + (f"; variants with n = 1 have no {spread}" if min(ns) < 2 else "")


def dodge(frame: pd.DataFrame, x: str, by: str, step: float, log: bool = False) -> pd.Series:
    """`x` moved sideways per level of `by` among the levels sharing an x value, so that equal
    values stay visible (a factor on a log axis)."""
    crowd = frame.groupby(x)[by].transform("nunique")
    rank = frame.groupby(x)[by].transform(lambda s: s.map({v: i for i, v in enumerate(dict.fromkeys(s))}))
    offset = (rank - (crowd - 1) / 2) * step
    return frame[x] * 10 ** offset if log else frame[x] + offset


def draw_curves(ax, data: pd.DataFrame, column: str, style: tuple, legend: bool) -> bool:
    """Lines with ± 1 sd bands over epochs; a variant with one epoch as a point with its bar.
    Returns whether some variant is such a point."""
    palette, dashes, markers = style
    epochs = data.groupby("label")["epoch"].transform("nunique")
    lines, single = data[epochs > 1], data[epochs == 1]
    common = dict(y=column, hue="label", style="label", palette=palette, markers=markers, errorbar="sd",
                  hue_order=list(palette), style_order=list(palette), ax=ax)
    if len(lines):
        sns.lineplot(data=lines, x="epoch", dashes=dashes, markersize=5, legend=legend and "full", **common)
    if len(single):
        sns.lineplot(data=single.assign(x=dodge(single, "epoch", "label", DODGE)), x="x",
                     err_style="bars", err_kws={"capsize": 4}, markersize=7,
                     legend=legend and lines.empty and "full", **common)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return bool(len(single)) and bool(len(lines))


def draw_against(ax, data: pd.DataFrame, column: str, x: str, legend: bool) -> None:
    """One epoch, a numeric swept setting: mean ± 1 sd against it, a line per other variant."""
    log = log_scale(data[x].astype(float))
    hue = "label" if data["label"].nunique() > 1 else None
    palette, dashes, markers = looks(data, "label")
    sns.lineplot(data=data.assign(xd=dodge(data.assign(**{x: data[x].astype(float)}), x, "label",
                                           0.02 if log else 0, log)),
                 x="xd", y=column, hue=hue, style=hue, palette=palette if hue else None,
                 markers=markers if hue else True, dashes=False, err_style="bars", errorbar="sd",
                 err_kws={"capsize": 4}, markersize=7, legend=legend and hue is not None and "full", ax=ax)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x}{' (log scale)' if log else ''}")


def draw_points(ax, data: pd.DataFrame, column: str, legend: bool) -> None:
    """One epoch: a point per variant with its ± 1 sd bar."""
    palette, _, markers = looks(data, "label")
    sns.pointplot(data=data, x="name", y=column, hue="label", palette=palette, hue_order=list(palette),
                  markers=[markers[k] for k in palette], linestyle="none", errorbar="sd", capsize=0.15,
                  order=list(dict.fromkeys(data["name"])), legend=legend, ax=ax)
    crowded = data["name"].nunique() > 4
    ax.tick_params(axis="x", labelrotation=30 if crowded else 0)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right" if crowded else "center")
    ax.set_xlabel(None)


def seeds_text(data: pd.DataFrame, by: str) -> pd.Series:
    """Per level of `by`: its n, as '3', or '2-3' when its points differ."""
    per = data.groupby([by, "point"])["run_dir"].nunique().groupby(level=0)
    return per.min().astype(str).where(per.min() == per.max(), per.min().astype(str) + "-" + per.max().astype(str))


def drawn_means(data: pd.DataFrame, column: str, x: str | None) -> pd.DataFrame:
    """What a panel draws per label and x: mean (y) and mean ± 1 sd (lo, hi), with x the
    category's place (0, 1, 2, ...) for points by name."""
    by = ["name"] if x is None else ["label", x]
    drawn = data.groupby(by, sort=False)[column].agg(y="mean", sd="std").reset_index()
    drawn["x"] = range(len(drawn)) if x is None else drawn[x]
    sd = drawn["sd"].fillna(0)
    return drawn.assign(lo=drawn["y"] - sd, hi=drawn["y"] + sd)


def curves_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], title: str):
    """Two panels (test accuracy, and train loss or train accuracy) with one legend; an Optuna
    study gets study_figure. See the module's docstring for what is drawn."""
    if "sweep_kind" in runs and (runs["sweep_kind"] == "optuna").any():
        return study_figure(runs, keys)
    name = sweep_name(runs)
    runs = runs[(runs["status"] == "completed") & runs["acc"].notna()]
    table, shown = variants(runs, keys)
    data = curves.merge(table, on="run_dir")
    data = data.assign(test_acc_pct=data["test_acc"] * 100,
                       train_acc_pct=data["train_acc"] * 100 if "train_acc" in data else np.nan)
    one_epoch = data["epoch"].nunique() == 1
    numeric = [s for s, k in zip(shown, keys) if (s != k or data[s].map(number).notna().all())
               and data[s].nunique() >= 3] if one_epoch else []
    x = numeric[0] if numeric else None
    if x:  # the line runs along the number; colour and marker name the other keys
        data[x] = data[x].astype(float)
        others = [s for s in shown if s != x]
        data["name"] = [", ".join(map(str, v)) for v in zip(*(data[s] for s in others))] if others else "all runs"
    data["point"] = data[x] if x else data["epoch"]
    ns = seeds_text(data, "name")
    data["label"] = [f"{v} (n={ns[v]})" for v in data["name"]]
    right = training_panel(runs, curves)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    notes, dots = [], False
    for i, (ax, (column, ylabel)) in enumerate(zip(axes, [("test_acc_pct", "test accuracy (%)"), right])):
        legend = i == 1 and bool(keys)
        if x:
            draw_against(ax, data, column, x, legend)
        elif one_epoch:
            draw_points(ax, data, column, legend)
        else:
            dots = draw_curves(ax, data, column, looks(data, "label"), legend)
        after = f" after epoch {int(data['epoch'].iloc[0])}" if one_epoch else ""
        ax.set_ylabel(ylabel.replace(" (", f"{after} (") if "(" in ylabel else ylabel + after)
        if column.endswith("_pct"):
            percent_axis(ax)
        else:
            notes.append(fence_outliers(ax, drawn_means(data, column, x or (None if one_epoch else "epoch")),
                                        ylabel))
        if not keys and one_epoch:
            ax.set_xticks([])  # one configuration: nothing to name on the x axis (the title does)
        ax.grid(alpha=0.3)
    drawn = axes[1].get_legend()
    if drawn is not None:  # seaborn's legend, moved to the figure: one for both panels, off the axes
        fig.legend(drawn.legend_handles, [t.get_text() for t in drawn.get_texts()], loc="outside right upper",
                   fontsize=8, title_fontsize=8, title=" / ".join(HEADERS.get(k, k) for k in shown if k != x) or None)
        drawn.remove()
    runs_n = data["run_dir"].nunique()
    what = title if keys else f"one configuration: {configuration(runs)} ({runs_n} run{'s' * (runs_n != 1)})"
    fig.suptitle(printable(textwrap.fill(f"{name} — {what}" if name else what, 110)))
    counts = data.groupby(["name", "point"])["run_dir"].nunique()
    caption = spread_caption([int(v) for v in counts] or [0], "points" if one_epoch else "lines")
    if not keys and counts.max() < 2:
        caption = "one run: no spread to show"
    if dots:
        caption += "; a variant with one epoch: a point with its ± 1 sd bar, set apart sideways from others there"
    if right[0] == "train_acc_pct":
        caption += "; right: train accuracy, as the variants' losses are on different scales"
    fig.supxlabel("; ".join([caption, *filter(None, notes)]), fontsize=8, color="0.3", wrap=True)
    return fig


def study_figure(runs: pd.DataFrame, keys: list[str]):
    """An Optuna study: each trial's value (its best validation accuracy, the score the study
    maximised) against the searched setting, on a log axis when it spans decades; the best trial
    marked; trials without a value as ticks on the x axis."""
    setting = lambda k: [number(c.get(k, o.get(k))) for c, o in zip(runs["config"], runs["overrides"])]  # noqa: E731
    x = next((k for k in keys if None not in setting(k)), keys[0] if keys else "optim.lr")
    # the trial's value is its best validation accuracy; a study without a split scored the test set
    score = "best_val_acc" if "best_val_acc" in runs and runs["best_val_acc"].notna().any() else "acc"
    trials = pd.DataFrame({x: setting(x),
                           "value": pd.to_numeric(runs[score], errors="coerce").to_numpy() * 100,
                           "status": runs["status"].to_numpy()})
    scored = trials[(trials["status"] == "completed") & trials["value"].notna()]
    lost = trials.drop(scored.index)
    fig, ax = plt.subplots(figsize=(8.6, 4.6), layout="constrained")
    sns.scatterplot(data=scored, x=x, y="value", s=50, color="tab:blue", legend=False, ax=ax)
    if len(lost):  # no value to place them by: a tick on the x axis at their setting
        sns.rugplot(data=lost, x=x, color="tab:red", height=0.06, lw=2, ax=ax)
    if len(scored):
        best = scored.loc[scored["value"].idxmax()]
        sns.scatterplot(x=[best[x]], y=[best["value"]], marker="*", s=260, color="tab:orange",
                        legend=False, ax=ax, zorder=4)
        ax.annotate(f"best: {x}={best[x]:.3g}, {best['value']:.2f}%", (best[x], best["value"]),
                    textcoords="offset points", xytext=(9, -4), va="top", fontsize=8)  # below: it is the top
    if log_scale(trials[x].dropna()):
        ax.set_xscale("log")
    ax.set(xlabel=f"{x}{' (log scale)' if ax.get_xscale() == 'log' else ''}",
           ylabel=f"trial value: {'best validation' if score == 'best_val_acc' else 'test'} accuracy (%)")
    percent_axis(ax)
    ax.grid(alpha=0.3)
    name = sweep_name(runs)
    fig.suptitle(printable(f"Optuna study {name}: {len(trials)} trial{'s' * (len(trials) != 1)}"))
    why = ", ".join(f"{k} {v}" for v, k in lost["status"].value_counts().items())
    fig.supxlabel("each point: one trial; ★ the best" + (f"; red ticks on the x axis: trials without a value "
                                                         f"({why})" if len(lost) else ""),
                  fontsize=8, color="0.3")
    return fig
