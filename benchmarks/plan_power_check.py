"""--plan's seed counts against statsmodels and a Monte Carlo of the tests themselves.

    python benchmarks/plan_power_check.py [--draws N] [--seed S]

On a grid of standardized effects (0.25 to 12 sd), per-look alphas (0.05 / (3 looks x 1 or 3
comparisons)), seeds already run (2, 3, 5) and both of the table's tests, it compares
analysis.plan.seeds_needed with

- statsmodels: `TTestPower.solve_power` (paired) and `TTestIndPower.solve_power` (Welch; statsmodels
  has no Welch power, this is the pooled two-sample t, which Welch's power approaches from below),
  rounded up to whole seeds and to at least the seeds already run; "did not converge" where the
  solver returns NaN or an n at which its own power is not 80%;
- Monte Carlo: the rejection rate of `scipy.stats.ttest_1samp` on per-seed differences (paired) and
  `ttest_ind(equal_var=False)` on two rows of n seeds (Welch), `--draws` simulated tables per seed
  count; the first count at or above 80%, "did not converge" past MAX_SEEDS;
- the power function --plan used before (the noncentral-t cdf for the lower tail), to show what
  the NaN it returned for large effects cost.

Prints, per reference, how many cases agree exactly, within one seed, and the largest difference.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from analysis.plan import LOOKS, MAX_SEEDS, POWER, seeds_needed  # noqa: E402

EFFECTS = np.round(np.arange(0.25, 12.001, 0.25), 2)
ALPHAS = {f"0.05/({LOOKS}x{k})": 0.05 / (LOOKS * k) for k in (1, 3)}
STARTS = (2, 3, 5)


def old_power(effect: float, n: int, alpha: float, paired: bool) -> float:
    """The power --plan used before: pooled df for Welch, the lower tail from nct.cdf (NaN far out)."""
    df = n - 1 if paired else 2 * n - 2
    nc = effect * math.sqrt(n if paired else n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def old_seeds(effect: float, alpha: float, paired: bool, start: int) -> int | None:
    for n in range(max(start, 2), MAX_SEEDS + 1):
        if old_power(effect, n, alpha, paired) >= POWER:  # NaN >= 0.8 is False: the old bug
            return n
    return None


def statsmodels_seeds(effect: float, alpha: float, paired: bool, start: int) -> int | None:
    """statsmodels' solve_power, rounded up; None unless it converged: a finite n at which its own
    power is 80% (at large effects it returns n whose power it computes as NaN or far below)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    test = TTestPower() if paired else TTestIndPower()
    with warnings.catch_warnings(record=True):  # non-convergence is counted, not printed
        try:
            n = float(np.asarray(test.solve_power(effect, None, alpha, POWER)).squeeze())
            converged = math.isfinite(n) and abs(test.power(effect, n, alpha) - POWER) < 1e-4
        except Exception:
            return None
    if not converged or n > MAX_SEEDS:
        return None
    return max(math.ceil(n - 1e-9), start, 2)


class MonteCarlo:
    """Simulated power of the table's tests: `draws` tables per seed count, one generator."""

    def __init__(self, draws: int, seed: int):
        self.draws, self.rng = draws, np.random.default_rng(seed)

    def power(self, effect: float, n: int, alpha: float, paired: bool) -> float:
        if paired:  # per-seed differences, mean effect x their sd
            p = stats.ttest_1samp(self.rng.normal(effect, 1, (self.draws, n)), 0, axis=1).pvalue
        else:
            p = stats.ttest_ind(self.rng.normal(effect, 1, (self.draws, n)),
                                self.rng.normal(0, 1, (self.draws, n)), axis=1, equal_var=False).pvalue
        return float((p < alpha).mean())

    def first_n(self, effect: float, alpha: float, paired: bool) -> int | None:
        """The first seed count (from 2) whose simulated power reaches POWER."""
        for n in range(2, MAX_SEEDS + 1):
            if self.power(effect, n, alpha, paired) >= POWER:
                return n
        return None


def compare(plan: list, ref: list) -> dict:
    both = [(p, r) for p, r in zip(plan, ref) if r is not None]
    diffs = [abs((p if p is not None else MAX_SEEDS + 1) - r) for p, r in both]
    return {"converged": len(both), "not": len(ref) - len(both), "exact": sum(d == 0 for d in diffs),
            "within1": sum(d <= 1 for d in diffs), "max": max(diffs, default=0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20_000, help="simulated tables per seed count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tic = time.time()
    mc = MonteCarlo(args.draws, args.seed)
    rows = {name: [] for name in ("plan", "statsmodels", "monte carlo", "old plan")}
    tests = []
    for paired in (True, False):
        for alpha in ALPHAS.values():
            for effect in EFFECTS:
                first = mc.first_n(effect, alpha, paired)  # power rises with n: later starts follow
                for start in STARTS:
                    tests.append("paired" if paired else "Welch")
                    rows["plan"].append(seeds_needed(effect, alpha, paired, start))
                    rows["statsmodels"].append(statsmodels_seeds(effect, alpha, paired, start))
                    rows["monte carlo"].append(None if first is None else max(first, start))
                    rows["old plan"].append(old_seeds(effect, alpha, paired, start))
    print(f"{len(rows['plan'])} cases: effects {EFFECTS[0]}-{EFFECTS[-1]} sd (step 0.25), alphas "
          f"{', '.join(ALPHAS)}, seeds already run {STARTS}, paired and Welch; Monte Carlo "
          f"{args.draws:,} draws per seed count (seed {args.seed}). {platform.processor() or platform.machine()}, "
          f"{time.time() - tic:.0f} s.\n")
    print("| test | reference | cases where it converges | not | plan = reference | within 1 seed | largest difference |")
    print("|---|---|---|---|---|---|---|")
    for test in ("paired", "Welch"):
        pick = [i for i, t in enumerate(tests) if t == test]
        plan = [rows["plan"][i] for i in pick]
        for name in ("statsmodels", "monte carlo"):
            c = compare(plan, [rows[name][i] for i in pick])
            print(f"| {test} | {name} | {c['converged']} | {c['not']} | {c['exact']} | {c['within1']} | {c['max']} |")
        old = [rows["old plan"][i] for i in pick]
        c = compare(old, [rows["monte carlo"][i] for i in pick])
        print(f"| {test} | monte carlo, against the old plan | {c['converged']} | {c['not']} | {c['exact']} "
              f"| {c['within1']} | {c['max']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
