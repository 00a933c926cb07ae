"""Pure functions from the runs DataFrame to per-sweep summary tables and their markdown."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
# Table headers in the seed report's words for the axes the user sweeps.
HEADERS = {"loss": "Loss", "model/activation": "Activation", "optim": "Optimizer",
           "sched": "Scheduler", "model": "Model", "data": "Data", "experiment": "Preset",
           "ablation": "Table"}
PLUMBING = ("seed", "data.root", "device", "save_weights", "precision", "threads")
METRIC_NAMES = {
    "test_acc_at_best_val": "test accuracy at the epoch of best validation accuracy",
    "final_test_acc": "test accuracy after the last epoch",
}


def variant_keys(runs: pd.DataFrame) -> list[str]:
    """Override keys whose values differ between runs (seed and where/how-to-run keys excluded)."""
    keys: list[str] = []
    for overrides in runs["overrides"]:
        keys += [k for k in overrides if k not in keys]
    keys = [k for k in keys if not k.startswith("hydra") and k not in PLUMBING]
    return [k for k in keys
            if len({str(o.get(k, "(default)")) for o in runs["overrides"]}) > 1]


def label(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Add one column per variant key holding the value the user typed for each run."""
    out = runs.copy()
    for k in keys:
        out[k] = [str(o.get(k, "(default)")) for o in runs["overrides"]]
    return out


def pick_metric(runs: pd.DataFrame) -> str:
    """Test accuracy at the best validation epoch when every finished run has one, else final."""
    done = runs[runs["status"] == "completed"]
    if len(done) and "test_acc_at_best_val" in done and done["test_acc_at_best_val"].notna().all():
        return "test_acc_at_best_val"
    return "final_test_acc"


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean, sample std and half-width of the Student-t confidence interval (nan when n < 2)."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    return mean, std, float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


def _status_text(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def summarize(runs: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """One row per variant: n, mean, std, 95% CI of `metric`, Welch's p-value against the best row."""
    rows = []
    grouped = runs.groupby(keys, sort=False, dropna=False) if keys else [((), runs)]
    for values, group in grouped:
        values = values if isinstance(values, tuple) else (values,)
        done = group[group["status"] == "completed"]
        acc = done[metric].dropna().to_numpy(dtype=float) * 100
        mean, std, half = mean_ci(acc)
        best = done["best_test_acc"].dropna().to_numpy(dtype=float) * 100
        rows.append({**dict(zip(keys, values)), "n": len(acc), "mean": mean, "std": std,
                     "ci_low": mean - half, "ci_high": mean + half,
                     "best_epoch_mean": float(best.mean()) if len(best) else math.nan,
                     "epochs": _epochs_text(done), "status": _status_text(group["status"]),
                     "_acc": acc})
    table = pd.DataFrame(rows)
    return _compare_with_best(table)


def _epochs_text(done: pd.DataFrame) -> str:
    if done.empty:
        return "-"
    lo, hi = int(done["epochs_run"].min()), int(done["epochs_run"].max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _compare_with_best(table: pd.DataFrame) -> pd.DataFrame:
    """Welch's t-test of every row against the row with the highest mean."""
    table["p_vs_best"], table["verdict"] = math.nan, ""
    if table["mean"].notna().sum() == 0:
        return table.drop(columns="_acc")
    best = table["mean"].idxmax()
    table.loc[best, "verdict"] = "best"
    for i in table.index:
        if i == best or math.isnan(table.at[i, "mean"]):
            continue
        a, b = table.at[i, "_acc"], table.at[best, "_acc"]
        if len(a) < 2 or len(b) < 2:
            table.at[i, "verdict"] = "n < 2: untested"
            continue
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
        if math.isnan(p):  # both groups without spread, e.g. identical runs
            p = 1.0 if np.mean(a) == np.mean(b) else 0.0
        table.at[i, "p_vs_best"] = p
        table.at[i, "verdict"] = "tied with best" if p >= ALPHA else "worse"
    return table.drop(columns="_acc")


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def to_markdown(table: pd.DataFrame, keys: list[str], metric: str, title: str) -> str:
    """The summary table in the seed report's style, with a footnote saying what it reports."""
    shown = pd.DataFrame({HEADERS.get(k, k): table[k] for k in keys} if keys else
                         {"Variant": ["(all runs)"] * len(table)})
    shown["Test Accuracy (%)"] = [
        f"{_fmt(m)} ± {_fmt(s)}" if not math.isnan(s) else _fmt(m)
        for m, s in zip(table["mean"], table["std"])]
    shown["95% CI"] = [f"[{_fmt(lo)}, {_fmt(hi)}]" if not math.isnan(lo) else "-"
                       for lo, hi in zip(table["ci_low"], table["ci_high"])]
    shown["n"] = table["n"]
    shown["vs best (Welch p)"] = [
        v if math.isnan(p) else f"{v} (p={p:.3f})" for v, p in zip(table["verdict"], table["p_vs_best"])]
    shown["Best-epoch test (%)"] = [_fmt(x) for x in table["best_epoch_mean"]]
    shown["Epochs"] = table["epochs"]
    shown["Runs"] = table["status"]
    note = (f"Test Accuracy = {METRIC_NAMES[metric]}, mean ± sample std over seeds (n completed "
            f"runs); 95% CI from Student's t. 'tied with best': Welch's t-test against the best "
            f"row gives p >= {ALPHA}. Best-epoch test accuracy picks the epoch on the test set "
            f"itself, so it is optimistic.")
    return f"### {title}\n\n{shown.to_markdown(index=False)}\n\n{note}\n"


def problems(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not complete, with what went wrong."""
    bad = runs[runs["status"] != "completed"]
    return bad[["run_dir", "status", "error"]].reset_index(drop=True)


def sweep_reports(runs: pd.DataFrame) -> list[dict]:
    """For each sweep: its title, variant keys, metric, summary table and markdown."""
    reports = []
    for sweep, group in runs.groupby("sweep", sort=True):
        keys = variant_keys(group)
        metric = pick_metric(group)
        table = summarize(label(group, keys), keys, metric)
        md = to_markdown(table, keys, metric, sweep)
        bad = problems(group)
        if len(bad):
            md += "\nNot completed:\n\n" + bad.fillna("").to_markdown(index=False) + "\n"
        reports.append({"sweep": sweep, "keys": keys, "metric": metric, "table": table, "markdown": md})
    return reports
