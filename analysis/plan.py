"""How many more seeds would likely settle a table's open comparisons (`make_tables.py --plan`).

For each row whose verdict against the best row is still open, a power calculation for the test
the table uses (paired t on the per-seed differences, else Welch's, approximated by a two-sample
t with equal n), at the observed difference and spread: the smallest number of seeds per row
at which that test would reach POWER. It is an estimate: with 2-5 seeds the observed difference
and spread are themselves rough.

Deciding when to stop from the data inflates false positives (each look is another chance for
noise to cross the line). The plan guards against it with a fixed number of looks: at most
LOOKS, each judged at alpha / (LOOKS x comparisons), a Bonferroni split that holds whatever
was seen at the earlier looks; the seeds it asks for are sized for that threshold.
"""
from __future__ import annotations

import math
import shlex

import numpy as np
import pandas as pd
from scipy import stats

from analysis.tables import ALPHA

POWER = 0.8
LOOKS = 3          # the plan's looks: the table as it is, then at most two rounds of added seeds
MAX_SEEDS = 50     # past this, the difference is too small to settle with seeds


def power(effect: float, n: int, alpha: float, paired: bool) -> float:
    """Power of the two-sided t-test at standardized effect `effect` with n seeds per row."""
    df = n - 1 if paired else 2 * n - 2
    if df < 1:
        return 0.0
    nc = effect * math.sqrt(n if paired else n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(effect: float, alpha: float, paired: bool, start: int = 2) -> int | None:
    """The smallest n >= start with power >= POWER; None when even MAX_SEEDS will not do."""
    if not math.isfinite(effect) or effect == 0:
        return None
    for n in range(max(start, 2), MAX_SEEDS + 1):
        if power(abs(effect), n, alpha, paired) >= POWER:
            return n
    return None


def standardized_effect(row: pd.Series, best: pd.Series, paired: bool) -> float:
    """Observed difference over its spread: per-seed differences' sd when paired, else the two
    rows' pooled sd."""
    a, b = row["seeds"], best["seeds"]
    if paired:
        common = sorted(set(a) & set(b))
        if len(common) < 2:
            return math.nan
        diff = np.array([b[s] - a[s] for s in common])
        sd = diff.std(ddof=1)
        return diff.mean() / sd if sd > 0 else math.nan
    sd = math.sqrt((row["std"] ** 2 + best["std"] ** 2) / 2)
    return (best["mean"] - row["mean"]) / sd if sd > 0 else math.nan


def is_open(verdict: str) -> bool:
    return verdict.startswith(("no evidence", "untested"))


def row_overrides(row: pd.Series) -> list[str]:
    """The row's typed overrides (what makes it this row), seeds left out."""
    return [f"{k}={v}" for k, v in row["typed"].items()]


def plan_table(table: pd.DataFrame, sweep: str, keys: list[str] = ()) -> pd.DataFrame:
    """One line per open row: observed difference, seeds needed per row, and the command."""
    if table.empty or (table["verdict"] == "best").sum() != 1:
        return pd.DataFrame()
    best = table[table["verdict"] == "best"].iloc[0]
    open_rows = table[table["verdict"].map(is_open)]
    alpha = ALPHA / (LOOKS * max(len(table) - 1, 1))
    used = {s for seeds in table["seeds"] for s in seeds}
    next_seed = int(max(used)) + 1 if used else 0
    lines = []
    for _, row in open_rows.iterrows():
        paired = row["pairing"] is not None and row["pairing"] == best["pairing"]
        effect = standardized_effect(row, best, paired)
        have = min(row["n"], best["n"])
        need = seeds_needed(effect, alpha, paired, start=have)
        name = [f"{k}={row[k]}" for k in keys] or row_overrides(row)
        line = {"row": ", ".join(name) or "defaults", "n": int(row["n"]),
                "best_n": int(best["n"]), "difference": best["mean"] - row["mean"],
                "test": "paired" if paired else "Welch", "effect": effect,
                "seeds_needed": need, "commands": []}
        if need is not None and need > have:
            for target in (row, best):
                missing = need - int(target["n"])
                if missing <= 0:
                    continue
                seeds = ",".join(str(s) for s in range(next_seed, next_seed + missing))
                line["commands"].append(shlex.join(
                    ["python", "ablate/train.py", "-m", *row_overrides(target), f"seed={seeds}",
                     f"hydra.sweep.dir={sweep}"]))
        lines.append(line)
    return pd.DataFrame(lines)


def plan_markdown(plan: pd.DataFrame, sweep: str, comparisons: int) -> str:
    alpha = ALPHA / (LOOKS * max(comparisons, 1))
    if plan.empty:
        return f"### Plan: {sweep}\n\nNo open comparison: every row is settled against the best.\n"
    out = [f"### Plan: {sweep}\n"]
    for _, p in plan.iterrows():
        need = None if pd.isna(p["seeds_needed"]) else int(p["seeds_needed"])
        head = (f"- **{p['row']}** (n={p['n']}, best n={p['best_n']}): {p['difference']:.2f} points "
                f"behind the best, {p['test']} effect {p['effect']:.2f} sd")
        if need is None:
            out.append(f"{head}: no number of seeds up to {MAX_SEEDS} would likely settle it "
                       "(the observed difference is too small for its spread, or has no spread).")
        elif not p["commands"]:
            out.append(f"{head}: {need} seeds per row would do; the rows already have them.")
        else:
            out.append(f"{head}: about {need} seeds per row. Add them with:\n")
            out += [f"      {c}" for c in p["commands"]]
    out.append(
        f"\nSeeds per row at which the table's test would reach {POWER:.0%} power at the observed "
        f"difference and spread, with alpha = {ALPHA} / ({LOOKS} looks x {comparisons} comparisons) "
        f"= {alpha:.4f}: an estimate, as rough as the few seeds it starts from. Folders are named "
        f"by config, so each command trains only the new seeds. Choosing when to stop from the data "
        f"inflates false positives: make at most {LOOKS} looks (this table, then at most "
        f"{LOOKS - 1} rounds of added seeds) and call a row worse only when its raw p is below "
        f"{alpha:.4f}, whatever the table's Holm verdict at {ALPHA} says.\n")
    return "\n".join(out)
