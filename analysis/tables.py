"""Pure functions from the runs DataFrame to per-sweep summary tables and their markdown."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ablate.record import OPERATIONAL_KEYS

ALPHA = 0.05
LEVEL = 0.95
RESAMPLES = 10_000
# Table headers in the seed report's words for the axes the user sweeps.
HEADERS = {"loss": "Loss", "model/activation": "Activation", "optim": "Optimizer",
           "sched": "Scheduler", "model": "Model", "data": "Data", "experiment": "Preset",
           "ablation": "Table"}
# What never makes a row: the seed (a row's runs are its seeds) and the keys that cannot change a
# result, ablate.record.OPERATIONAL_KEYS (the one list of them, which also keeps them out of a run's
# identity). Everything else, precision and data.root included, tells rows apart.
PLUMBING = ("seed", *OPERATIONAL_KEYS)
METRIC_NAMES = {
    "test_acc_at_best_val": "test accuracy at the epoch of best validation accuracy",
    "final_test_acc": "test accuracy after the last epoch",
}
DONE = ("completed", "completed without accuracy")  # runs that make a table's rows


def is_setting(key: str) -> bool:
    return not key.startswith("hydra") and key not in PLUMBING


def _varying(configs: list[dict]) -> list[str]:
    """Resolved settings (flattened config keys) whose values differ between `configs`."""
    keys = sorted({k for c in configs for k in c if is_setting(k)})
    return [k for k in keys if len({str(c.get(k, "(absent)")) for c in configs}) > 1]


def variant_keys(runs: pd.DataFrame) -> list[str]:
    """The columns that tell a sweep's rows apart: the override keys whose typed values differ
    between the completed runs (other runs add no columns), then, for rows those values cannot
    tell apart (a default changed between versions, precision=auto resolved on two machines), the
    resolved settings in which they differ."""
    done = runs[runs["status"].isin(DONE)]
    keys: list[str] = []
    for overrides in done["overrides"]:
        keys += [k for k in overrides if k not in keys and is_setting(k)]
    keys = [k for k in keys if len({str(o.get(k, "(default)")) for o in done["overrides"]}) > 1]
    labelled = label(done, keys)
    for _, same in (labelled.groupby(keys, sort=False, dropna=False) if keys else [((), labelled)]):
        if same["row_identity"].nunique() > 1:
            keys += [k for k in _varying(list(same["config"])) if k not in keys]
    return keys


def label(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Add one column per variant key: the value the user typed for each run, else its resolved
    setting, else '(default)'."""
    out = runs.copy()
    for k in keys:
        out[k] = [str(o[k]) if k in o else str(c[k]) if k in (c or {}) else "(default)"
                  for o, c in zip(runs["overrides"], runs["config"])]
    return out


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (nan where undefined)."""
    mean = float(np.mean(values)) if len(values) else math.nan
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def bootstrap_interval(values: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean. It never leaves the range of the values, so an
    accuracy's interval stays within [0, 100]; with few seeds it is narrow and coarse."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)  # fixed: the same runs always give the same table
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _status_text(statuses: pd.Series) -> str:
    return ", ".join(f"{n} {s}" for s, n in statuses.value_counts().items())


def _epochs_text(done: pd.DataFrame) -> str:
    epochs = done["epochs_run"].dropna()
    if epochs.empty:
        return "-"
    lo, hi = int(epochs.min()), int(epochs.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def assign_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's row: its experiment (ablate.record.row_identity: every result-affecting setting
    but the seed) when some completed run has it, else None (listed below the table)."""
    out = runs.copy()
    rows = set(out.loc[out["status"].isin(DONE), "row_identity"].dropna())
    out["row"] = [r if r in rows else None for r in out["row_identity"]]
    return out


def summarize(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per variant with completed runs: n usable seeds, mean, sd, bootstrap interval,
    per-seed accuracies."""
    runs = assign_rows(runs)
    labelled = label(runs[runs["row"].notna()], keys)
    out = []
    for _, group in labelled.groupby("row", sort=False):
        # one number per seed: copies of a run (mark_duplicates) never count twice
        usable = group[(group["status"] == "completed") & group["acc"].notna()].drop_duplicates("seed")
        acc = usable["acc"].to_numpy(dtype=float) * 100
        mean, sd = mean_sd(acc)
        lo, hi = bootstrap_interval(acc)
        best = usable["best_test_acc"].dropna().astype(float) * 100
        typed = {k: v for k, v in group["overrides"].iloc[0].items() if is_setting(k)}
        # the overrides as typed (`+key=`, `~key` kept), seed left out: what --plan re-types
        typed_list = (usable if len(usable) else group)["typed_overrides"].iloc[0]
        as_typed = [o for o in (typed_list if isinstance(typed_list, list) else [])
                    if o.lstrip("+~").split("=")[0] != "seed"]
        out.append({**{k: group[k].iloc[0] for k in keys}, "row": group["row"].iloc[0],
                    "typed": typed, "typed_overrides": as_typed,
                    "n": len(acc), "mean": mean, "std": sd, "ci_low": lo, "ci_high": hi,
                    "best_epoch_mean": float(best.mean()) if len(best) else math.nan,
                    "epochs": _epochs_text(group[group["status"].isin(DONE)]),
                    "status": _status_text(group["status"]),
                    "seeds": dict(zip(usable["seed"], acc)),
                    "pairing": common_pairing(group)})
    return compare_with_best(pd.DataFrame(out))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan stays nan, out of the family)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))  # adjusted p never decreases
        adjusted[i] = running
    return adjusted


def pairing_key(config: dict) -> tuple:
    """What must match for one seed to mean the same initialisation and data order in two runs:
    the architecture (model settings but activation and dropout, which draw no weights), the data
    and the batch size."""
    return tuple(sorted((k, str(v)) for k, v in config.items()
                        if (k.startswith(("model.", "data.")) or k == "batch_size")
                        and not k.startswith(("model.activation", "model.dropout"))
                        and k not in PLUMBING))


def p_value(a: dict, b: dict, paired: bool) -> tuple[float, str]:
    """p-value and test name for per-seed accuracies a vs b: paired on shared seeds, else Welch."""
    common = sorted(set(a) & set(b))
    if paired and len(common) >= 2:
        x, y = np.array([a[s] for s in common]), np.array([b[s] for s in common])
        # a seed only one of the two rows has cannot be paired: say how many the test used
        name = "paired" if len(common) == max(len(a), len(b)) else \
            f"paired on the {len(common)} shared of {len(set(a) | set(b))} seeds"
        if np.all(x - y == (x - y)[0]):  # constant differences: a t-test has no spread to use
            return math.nan, name
        return float(stats.ttest_rel(x, y).pvalue), name
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    if len(x) < 2 or len(y) < 2 or (np.std(x) == 0 and np.std(y) == 0):
        return math.nan, "Welch"
    return float(stats.ttest_ind(x, y, equal_var=False).pvalue), "Welch"


def common_pairing(runs: pd.DataFrame):
    """The rows' shared pairing key, or None when its runs disagree (then no pairing)."""
    keys = {pairing_key(c) for c in runs["config"] if c}
    return keys.pop() if len(keys) == 1 else None


def compare_with_best(table: pd.DataFrame) -> pd.DataFrame:
    """Every row against the row with the highest mean: paired t-test when they share seeds and
    architecture, else Welch; p-values Holm-adjusted over the table; 'worse' only after that."""
    table = table.copy()
    table["p_vs_best"], table["p_holm"], table["test"], table["verdict"] = math.nan, math.nan, "", ""
    if table.empty or table["mean"].notna().sum() == 0:
        return table
    best = table["mean"].idxmax()
    table.loc[best, "verdict"] = "best"
    for i in table.index.drop(best):
        paired = table.at[i, "pairing"] is not None and table.at[i, "pairing"] == table.at[best, "pairing"]
        table.at[i, "p_vs_best"], table.at[i, "test"] = p_value(
            table.at[i, "seeds"], table.at[best, "seeds"], paired)
    table["p_holm"] = holm(table["p_vs_best"].tolist())
    for i in table.index.drop(best):
        p = table.at[i, "p_holm"]
        table.at[i, "verdict"] = (
            "no usable runs" if table.at[i, "n"] == 0 else "untested (too few seeds or no spread)"
            if math.isnan(p) else "worse" if p < ALPHA else "no evidence of a difference")
    return table


def verdict_text(row: pd.Series) -> str:
    """'worse (paired p=0.004, Holm p=0.008)', or the verdict alone when untested."""
    if math.isnan(row["p_vs_best"]):
        return row["verdict"] + (f" ({row['test']})" if row["test"].startswith("paired on") else "")
    return f"{row['verdict']} ({row['test']} p={row['p_vs_best']:.3f}, Holm p={row['p_holm']:.3f})"


TESTS_NOTE = (f"a paired t-test on the per-seed differences when the row shares seeds and "
              f"architecture with the best row (one seed then fixes initialisation and data order), "
              f"else Welch's t-test; raw p and Holm-adjusted p over the table's comparisons; "
              f"'worse' only when the adjusted p < {ALPHA}, otherwise 'no evidence of a difference' "
              f"(not evidence of equality; the best row was itself picked by its mean).")


def fmt(x: float, digits: int = 2) -> str:
    """A number with `digits` decimals, '-' for a missing one."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def describe(table: pd.DataFrame, keys: list[str]) -> str:
    """'loss: 4 variants x 3 seeds' (what was swept, how many runs)."""
    axis = ", ".join(keys) or "one configuration"
    ns = sorted({int(n) for n in table["n"]}) if len(table) else [0]
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    variants = f"{len(table)} variant{'s' * (len(table) != 1)}"
    return f"{axis}: {variants} x {seeds} seed{'s' * (ns != [1])}"


def metric_note(runs: pd.DataFrame) -> str:
    used = runs.loc[runs["status"] == "completed", "metric"].dropna().unique()
    return " / ".join(METRIC_NAMES.get(m, m) for m in sorted(used)) or METRIC_NAMES["final_test_acc"]


def to_markdown(table: pd.DataFrame, keys: list[str], metric: str, title: str) -> str:
    """The summary table in the seed report's style, with a footnote saying what it reports."""
    shown = pd.DataFrame({HEADERS.get(k, k): table[k] for k in keys} if keys else
                         {"Settings": [", ".join(f"{k}={v}" for k, v in typed.items()) or "defaults"
                                       for typed in table["typed"]]})
    shown["Test Accuracy (%)"] = [
        "no usable runs" if n == 0 else f"{fmt(m)} ± {fmt(s)}" if n > 1 else fmt(m)
        for m, s, n in zip(table["mean"], table["std"], table["n"])]
    shown["95% bootstrap interval"] = [f"[{fmt(lo)}, {fmt(hi)}]" if not math.isnan(lo) else "-"
                                       for lo, hi in zip(table["ci_low"], table["ci_high"])]
    shown["n"] = table["n"]
    shown["vs best"] = [verdict_text(row) for _, row in table.iterrows()]
    shown["Best-epoch test (%)"] = [fmt(x) for x in table["best_epoch_mean"]]
    shown["Epochs run"] = table["epochs"]
    shown["Runs"] = table["status"]
    note = (f"Test Accuracy = {metric}, mean ± sample sd over seeds (n = completed runs with a "
            f"usable accuracy; copies of one run count once). Interval: 95% percentile bootstrap "
            f"of the mean ({RESAMPLES:,} resamples), always inside the observed range, so within "
            f"[0, 100]; with few seeds it is narrower than it should be. vs best: {TESTS_NOTE} "
            f"Best-epoch test accuracy picks the epoch on the test set itself, so it is optimistic.")
    return f"### {title}\n\n{shown.to_markdown(index=False)}\n\n{note}\n"


def short(error, width: int = 100) -> str:
    """First line of an error, cut to `width` characters (the whole error stays in result.json)."""
    text = str(error).strip().splitlines()[0] if isinstance(error, str) and error.strip() else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def leftovers(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that give no number to the table, each with a short reason; a run still training
    (or stopped without an error) says how far it got."""
    bad = runs[~((runs["status"] == "completed") & runs["acc"].notna())]
    why = [short(e) or (f"{int(ran)} of {config['epochs']} epochs run"
                        if pd.notna(ran) and "epochs" in config else "")
           for e, ran, config in zip(bad["error"], bad["epochs_run"], bad["config"])]
    return pd.DataFrame({"run": bad["run_dir"], "status": bad["status"], "why": why}).reset_index(drop=True)


def sweep_reports(runs: pd.DataFrame) -> list[dict]:
    """For each sweep: what it is, its variant keys, summary table and markdown."""
    reports = []
    for sweep, group in runs.groupby("sweep", sort=True):
        keys = variant_keys(group)
        table = summarize(group, keys)
        title = describe(table, keys)
        md = to_markdown(table, keys, metric_note(group), f"{sweep} — {title}") if len(table) else \
            f"### {sweep}\n\nNo completed runs.\n"
        elsewhere = sorted({s for also in group.loc[group["status"] != "duplicate", "also_in"]
                            for s in also})
        if elsewhere:
            copies = sum(bool(a) for a in group.loc[group["status"] != "duplicate", "also_in"])
            md += (f"\n{copies} of these runs also exist, with the same settings and seed, in "
                   f"{', '.join(elsewhere)}; each table counts a run once.\n")
        bad = leftovers(group)
        if len(bad):
            md += "\nRuns without a number in the table:\n\n" + bad.to_markdown(index=False) + "\n"
        reports.append({"sweep": sweep, "keys": keys, "title": title, "table": table, "markdown": md})
    return reports
