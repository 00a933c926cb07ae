"""Training curves of one sweep: test accuracy and train loss per epoch, one line per variant."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.tables import HEADERS, label  # noqa: E402


def curves_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], title: str):
    """Two panels (test accuracy, train loss vs epoch); seeds of a variant are drawn as mean ± sd."""
    labelled = label(runs, keys)
    labelled["variant"] = (labelled[keys].astype(str).agg(", ".join, axis=1) if keys
                           else "all runs")
    data = curves.merge(labelled[["run_dir", "variant"]], on="run_dir")
    data = data.assign(test_acc_pct=data["test_acc"] * 100)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    legend_title = " / ".join(HEADERS.get(k, k) for k in keys) or None
    for ax, (column, name) in zip(axes, [("test_acc_pct", "test accuracy (%)"),
                                         ("train_loss", "train loss")]):
        sns.lineplot(data=data, x="epoch", y=column, hue="variant", errorbar="sd",
                     marker="o", ax=ax)
        ax.set(xlabel="epoch", ylabel=name)
        ax.legend(title=legend_title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    return fig
