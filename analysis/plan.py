"""How many more seeds would likely settle a table's open comparisons (`make_tables.py --plan`).

For each row whose verdict against the best row is still open, a power calculation for the test
the table uses (tables.p_value: paired t on the per-seed differences when the rows pair and share
at least 2 seeds, else Welch's, for two rows of n seeds with one true spread), at the observed
difference and spread: the smallest number of seeds at which that test would reach POWER. It is an
estimate: with 2-5 seeds the observed difference and spread are themselves rough. The seeds go
pairing first (allocate), and each row gets one command that adds them.

Deciding when to stop from the data inflates false positives (each look is another chance for
noise to cross the line). The plan guards against it with a fixed number of looks: at most
LOOKS, each judged at alpha / (LOOKS x comparisons), a Bonferroni split that holds whatever
was seen at the earlier looks; the seeds it asks for are sized for that threshold.

The commands re-type each row's overrides as Hydra recorded them for its jobs (`+key=`, `~key`
kept; Hydra writes them in its own override grammar), so a job of a `+ablation=...` sweep is
re-made exactly: its recorded overrides name every swept key, and a key given on the command line
replaces the ablation file's list of values for that key (BasicSweeper), so no other row trains.
"""
from __future__ import annotations

import hashlib
import math
import shlex
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException
from scipy import special, stats

from analysis.tables import ALPHA

POWER = 0.8
LOOKS = 3          # the plan's looks: the table as it is, then at most two rounds of added seeds
MAX_SEEDS = 50     # past this, the difference is too small to settle with seeds
FIRST_SEEDS = 3    # seeds per row before a difference and its spread mean anything
WELCH_NODES = 32   # quadrature nodes over the Welch df's distribution (within 1e-14 of 200 nodes)
SINGLE = "single runs in "  # analysis.runs' name for the runs of a root that are in no sweep


def _two_tails(crit, df, nc: float):
    """P(|T| > crit) for T noncentral t(df, nc). Both tails as survival functions,
    P(T < -c | nc) = P(T > c | -nc): scipy's noncentral-t cdf (and statsmodels' power, built on
    it) is NaN far in the lower tail (df=4, nc=7.8), which would skip seed counts that already
    have the power."""
    return stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc)


def power(effect: float, n: int, alpha: float, paired: bool) -> float:
    """Power of the table's two-sided test at standardized effect `effect` with n seeds per row
    (n shared seeds when paired): the paired t-test, or Welch's t-test with equal n and spread."""
    if n < 2:
        return 0.0
    if paired:
        return float(_two_tails(stats.t.isf(alpha / 2, n - 1), n - 1, abs(effect) * math.sqrt(n)))
    # Welch with n seeds a row and one true sd: t is noncentral t(2n-2, effect*sqrt(n/2)), as for the
    # pooled test, but it is judged at the Welch-Satterthwaite df, (n-1) / (u^2 + (1-u)^2) with
    # u = s1^2 / (s1^2 + s2^2) ~ Beta((n-1)/2, (n-1)/2), independent of t. Power is the mean over u
    # (Gauss-Jacobi quadrature for that Beta weight); the pooled test's power is a few points
    # higher at 3-6 seeds.
    half = (n - 1) / 2
    x, w = special.roots_jacobi(WELCH_NODES, half - 1, half - 1)
    u = (x + 1) / 2
    crit = stats.t.isf(alpha / 2, (n - 1) / (u ** 2 + (1 - u) ** 2))
    return float(np.sum(w * _two_tails(crit, 2 * n - 2, abs(effect) * math.sqrt(n / 2))) / np.sum(w))


def seeds_needed(effect: float, alpha: float, paired: bool, start: int = 2) -> int | None:
    """The smallest n >= start with power >= POWER; None when even MAX_SEEDS will not do."""
    if not math.isfinite(effect) or effect == 0:
        return None
    for n in range(max(start, 2), MAX_SEEDS + 1):
        if power(effect, n, alpha, paired) >= POWER:
            return n
    return None


def standardized_effect(row: pd.Series, best: pd.Series, paired: bool) -> float:
    """Observed difference over its spread: per-seed differences' sd when paired, else the two
    rows' pooled sd; nan when there is no spread to measure it by."""
    a, b = row["seeds"], best["seeds"]
    if paired:
        common = sorted(set(a) & set(b))
        if len(common) < 2:
            return math.nan
        diff = np.array([b[s] - a[s] for s in common])
        sd = diff.std(ddof=1)
        return diff.mean() / sd if sd > 0 else math.nan
    if row["n"] < 2 or best["n"] < 2:
        return math.nan
    sd = math.sqrt((row["std"] ** 2 + best["std"] ** 2) / 2)
    return (best["mean"] - row["mean"]) / sd if sd > 0 else math.nan


def allocate(row: set, best: set, target: int, paired: bool) -> tuple[list[int], list[int]]:
    """Seeds to train for each of two rows so that both end with `target` shared seeds (paired)
    or `target` seeds each (Welch). Pairing first: each row first gets the seeds its partner
    already has (one run buys a pair), the row behind before the best; then both get the same new
    seeds, the smallest neither has."""
    add_row, add_best = [], []
    if paired:
        missing = max(target - len(row & best), 0)
        add_row = sorted(best - row)[:missing]
        add_best = sorted(row - best)[:missing - len(add_row)]
        fresh = missing - len(add_row) - len(add_best)
        new = [s for s in range(len(row | best) + fresh) if s not in row | best][:fresh]
        return add_row + new, add_best + new
    need_row, need_best = max(target - len(row), 0), max(target - len(best), 0)
    add_row = sorted(best - row)[:need_row]
    add_best = sorted(row - best)[:need_best]
    taken = row | best
    new = [s for s in range(len(taken) + target) if s not in taken]
    return add_row + new[:need_row - len(add_row)], add_best + new[:need_best - len(add_best)]


def hydra_value(text: str) -> str:
    """`text` as a value in Hydra's override grammar: as is when Hydra reads it back unchanged,
    else quoted (a sweep folder with a comma would otherwise be a sweep over two folders)."""
    try:
        parsed = OverridesParser.create().parse_override(f"key={text}")
        if not parsed.is_sweep_override() and parsed.value() == text:
            return text
    except HydraException:  # anything Hydra cannot read unquoted
        pass
    return QuotedString(text=text, quote=Quote.double).with_quotes()


def train_command(overrides: list[str], seeds: list[int], sweep: str) -> str:
    """The shell command that trains `seeds` of the row with these overrides into `sweep`."""
    train = ["python", "ablate/train.py"]
    if sweep.startswith(SINGLE):  # single runs: one plain run per seed, each in a folder of its own
        root = sweep[len(SINGLE):]
        return " && ".join(shlex.join([
            *train, *overrides, f"seed={s}",
            f"hydra.run.dir={hydra_value(f'{root}/plan/{fingerprint(overrides)}/seed={s}')}"])
            for s in seeds)
    return shlex.join([*train, "-m", *overrides, f"seed={','.join(map(str, seeds))}",
                       f"hydra.sweep.dir={hydra_value(sweep)}"])


def fingerprint(overrides: list[str]) -> str:
    """A short folder name for a row of single runs (its overrides can be long)."""
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:10]


def is_open(verdict: str) -> bool:
    return verdict.startswith(("no evidence", "untested"))


@dataclass
class Plan:
    lines: pd.DataFrame                  # one per open row: its numbers and the seeds each side gets
    commands: list[str] = field(default_factory=list)  # one per row that gets seeds
    best: str = "the best"               # the best row's label
    note: str = ""                       # why there is nothing to plan, when there is not


def plan_line(row: pd.Series, best: pd.Series, alpha: float) -> dict:
    """What it would take to settle one row against the best: the test, its effect, the seeds."""
    pairs = row["pairing"] is not None and row["pairing"] == best["pairing"]
    a, b = set(row["seeds"]), set(best["seeds"])
    paired = row["test"].startswith("paired")  # the table's own choice (tables.p_value)
    effect = standardized_effect(row, best, paired)
    have = len(a & b) if paired else min(len(a), len(b))
    line = {"row": row["label"], "identity": row["row"], "n": int(row["n"]), "best_n": int(best["n"]),
            "shared": len(a & b), "pairs": pairs,
            "difference": best["mean"] - row["mean"], "test": "paired" if paired else "Welch",
            "effect": effect, "seeds_needed": None, "outcome": "", "target": None,
            "add_row": [], "add_best": []}
    if math.isnan(effect):
        line["outcome"] = "cannot estimate"
        target = FIRST_SEEDS
    else:
        need = seeds_needed(effect, alpha, paired, start=have)
        line["seeds_needed"] = need
        line["outcome"] = "too small" if need is None else "enough" if need <= have else "add"
        if line["outcome"] != "add":
            return line
        target = need
    # rows that pair end up sharing their seeds, so the next table can use the paired test
    line["target"] = target
    line["add_row"], line["add_best"] = allocate(a, b, target, paired or pairs)
    return line


def plan_table(table: pd.DataFrame, sweep: str, keys: list[str] = (), kind: str = "grid") -> Plan:
    """One line per open row (observed difference, seeds needed, the seeds each side gets) and
    one command per row that gets seeds."""
    if kind not in ("grid", "single"):  # a tuning sweeper's study (hydra/sweeper=optuna)
        return Plan(pd.DataFrame(), note=(
            f"This sweep is {'an Optuna' if kind == 'optuna' else f'a {kind}'} study: each trial "
            "is one run at a point the sampler chose, not a row of seeds, so there are no seeded "
            "rows to compare. Re-run its best trial and the setting it should beat as a grid sweep "
            "at several seeds (`seed=0,1,2`), then plan that table."))
    if table.empty or (table["verdict"] == "best").sum() != 1:
        return Plan(pd.DataFrame())
    table = table.assign(label=[", ".join(f"{k}={row[k]}" for k in keys) or
                                " ".join(row["typed_overrides"]) or "defaults"
                                for _, row in table.iterrows()])
    best = table[table["verdict"] == "best"].iloc[0]
    alpha = ALPHA / (LOOKS * max(len(table) - 1, 1))
    lines, adds = [], {i: set() for i in table.index}
    for i, row in table[table["verdict"].map(is_open)].iterrows():
        line = plan_line(row, best, alpha)
        adds[i] |= set(line["add_row"])
        adds[best.name] |= set(line["add_best"])
        lines.append(line)
    # one command per row: a row behind several comparisons (the best) gets the union of its seeds
    commands = [train_command(table.at[i, "typed_overrides"], sorted(seeds), sweep)
                for i, seeds in adds.items() if seeds]
    return Plan(pd.DataFrame(lines), commands, best=best["label"])


def _seeds(seeds: list[int]) -> str:
    return ",".join(map(str, seeds))


def line_text(p: pd.Series, best_label: str) -> str:
    """One plan line in words."""
    head = (f"- **{p['row']}** (n={p['n']}, best n={p['best_n']}, {p['shared']} shared): "
            f"{p['difference']:.2f} points behind the best")
    gets = "; ".join(f"{who} gets seed{'s' * (len(s) > 1)} {_seeds(s)}"
                     for who, s in ((p["row"], p["add_row"]), (best_label, p["add_best"])) if s)
    if p["outcome"] == "cannot estimate":
        why = ("too few seeds to measure its spread" if min(p["n"], p["best_n"]) < 2 or
               (p["test"] == "paired" and p["shared"] < 2) else "no spread between its seeds")
        if not gets:
            return (f"{head}: cannot estimate yet ({why}, with {FIRST_SEEDS} or more seeds per "
                    "row: check that the seed reaches the run).")
        each = "shared seeds" if p["pairs"] else "seeds each"
        return f"{head}: cannot estimate yet ({why}). Bring both rows to {FIRST_SEEDS} {each}: {gets}."
    head += f", {p['test']} effect {p['effect']:.2f} sd"
    if p["outcome"] == "too small":
        return (f"{head}: no number of seeds up to {MAX_SEEDS} would likely settle it (the "
                "observed difference is too small for its spread).")
    unit = "shared seeds" if p["test"] == "paired" else "seeds per row"
    if p["outcome"] == "enough":
        return f"{head}: {int(p['seeds_needed'])} {unit} would do; the rows already have them."
    return f"{head}: about {int(p['seeds_needed'])} {unit}: {gets}."


def plan_markdown(plan: Plan, sweep: str, comparisons: int) -> str:
    alpha = ALPHA / (LOOKS * max(comparisons, 1))
    if plan.note:
        return f"### Plan: {sweep}\n\n{plan.note}\n"
    if plan.lines.empty:
        return f"### Plan: {sweep}\n\nNo open comparison: every row is settled against the best.\n"
    out = [f"### Plan: {sweep}\n"]
    out += [line_text(p, plan.best) for _, p in plan.lines.iterrows()]
    if plan.commands:
        out.append("\nAdd them with (one command per row):\n")
        out += [f"    {c}" for c in plan.commands]
    out.append(
        f"\nSeeds at which the table's test would reach {POWER:.0%} power at the observed "
        f"difference and spread, with alpha = {ALPHA} / ({LOOKS} looks x {comparisons} comparisons) "
        f"= {alpha:.4f}: an estimate, as rough as the few seeds it starts from. Rows that pair first "
        f"get the seeds their partner has, then the same new seeds. Folders are named by config, "
        f"so each command trains only the new seeds. Choosing when to stop from the data "
        f"inflates false positives: make at most {LOOKS} looks (this table, then at most "
        f"{LOOKS - 1} rounds of added seeds) and call a row worse only when its raw p is below "
        f"{alpha:.4f}, whatever the table's Holm verdict at {ALPHA} says.\n")
    return "\n".join(out)
