"""Training curves of one sweep: test accuracy and a training panel per epoch, one line per variant."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.tables import HEADERS, label  # noqa: E402


def training_panel(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[str, str]:
    """Train loss, unless the variants use different loss functions, whose values share no scale
    (MSE on one-hot targets sits far below cross-entropy): then train accuracy."""
    losses = {(c or {}).get("loss") for c in runs["choices"]}
    if len(losses) > 1 and "train_acc" in curves and curves["train_acc"].notna().any():
        return "train_acc_pct", "train accuracy (%)"
    return "train_loss", "train loss"


def curves_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], title: str):
    """Two panels sharing one legend outside the axes; each variant's seeds drawn as mean ± sd.
    With two swept keys the first picks the colour and the second the dashes, so 15 variants
    read as 3 colours x 5 line styles rather than 15 colours."""
    runs = runs[(runs["status"] == "completed") & runs["acc"].notna()]
    labelled = label(runs, keys)
    labelled["variant"] = labelled[keys].astype(str).agg(", ".join, axis=1) if keys else "all runs"
    n = labelled.groupby("variant")["run_dir"].count()
    if len(keys) == 2:
        hue, style = keys
        ns = sorted(set(n))
        n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}"
    else:
        labelled["variant"] = [f"{v} (n={n[v]})" for v in labelled["variant"]]
        hue, style, n_text = "variant", None, "n in the legend"
    data = curves.merge(labelled[["run_dir", "variant", *keys]], on="run_dir")
    data = data.assign(test_acc_pct=data["test_acc"] * 100,
                       train_acc_pct=data["train_acc"] * 100 if "train_acc" in data else None)
    right = training_panel(runs, curves)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    for ax, (column, name) in zip(axes, [("test_acc_pct", "test accuracy (%)"), right]):
        sns.lineplot(data=data, x="epoch", y=column, hue=hue, hue_order=list(dict.fromkeys(labelled[hue])),
                     style=style, errorbar="sd", marker="o", ax=ax, legend=ax is axes[0])
        ax.set(xlabel="epoch", ylabel=name)
        if name.endswith("(%)"):  # a band of mean ± sd may pass 100; accuracy cannot
            ax.set_ylim(top=min(ax.get_ylim()[1], 100))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    names = [HEADERS.get(x, x) for x in names]  # section titles of a two-key legend
    fig.legend(handles, names, loc="outside right upper", fontsize=8,
               title=None if style else " / ".join(HEADERS.get(k, k) for k in keys) or None)
    fig.suptitle(title)
    fig.supxlabel(f"line: mean over seeds; band: ± 1 sd over the n seeds of each variant ({n_text})"
                  + ("; right: train accuracy, as the variants' losses are on different scales"
                     if right[0] == "train_acc_pct" else ""),
                  fontsize=8, color="0.3")  # a caption: constrained layout keeps it off the axes
    return fig
