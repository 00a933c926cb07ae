"""The reproduction report: each row of the seed report's tables beside our runs of it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.tables import mean_ci

SEED_RESULTS = Path(__file__).with_name("seed_results.yaml")
FULL_TRAIN_IMAGES = 50_000


def load_seed_results(path: Path = SEED_RESULTS) -> list[dict]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def settings(run: pd.Series) -> dict[str, str]:
    """A run's group choices and overrides as one mapping (what the user typed wins)."""
    return {**(run.get("choices") or {}), **(run.get("overrides") or {})}


def matches(run: pd.Series, match: dict) -> bool:
    have = settings(run)
    return all(str(have.get(k)) == str(v) for k, v in match.items())


def _metric(run: pd.Series, name: str | None) -> float:
    if name:  # a study-specific number, e.g. the SWA model's accuracy
        return (run.get("extra") or {}).get(name, math.nan)
    val = run.get("test_acc_at_best_val")
    return val if val is not None and not pd.isna(val) else run.get("final_test_acc")


def _scale_note(runs: pd.DataFrame, seed_epochs: int) -> str:
    notes = []
    if (runs["epochs_run"] < seed_epochs).any():
        notes.append(f"fewer epochs than the seed's {seed_epochs}")
    images = runs["train_images"].fillna(0) + runs["val_images"].fillna(0)
    if (images < FULL_TRAIN_IMAGES).any():
        notes.append(f"training subset ({int(runs['train_images'].min())} images)")
    if "data_source" in runs and runs["data_source"].eq("synthetic").any():
        notes.append("synthetic data")
    return "reduced scale: " + ", ".join(notes) if notes else "full scale"


def reproduction_table(runs: pd.DataFrame, seed_rows: list[dict]) -> pd.DataFrame:
    """One row per seed result: its accuracy, ours (mean, 95% CI, n), epochs and the difference."""
    out = []
    done = runs[runs["status"] == "completed"]
    for row in seed_rows:
        ours = done[[matches(r, row["match"]) for _, r in done.iterrows()]] if len(done) else done
        acc = np.array([_metric(r, row.get("metric")) for _, r in ours.iterrows()], dtype=float)
        acc = acc[~np.isnan(acc)] * 100
        mean, _, half = mean_ci(acc)
        epochs = sorted({int(e) for e in ours["epochs_run"]}) if len(ours) else []
        out.append({
            "Table": row["table"], "Row": row["row"], "Seed (%)": row["accuracy"],
            "Ours (%)": "not run" if not len(acc) else
            (f"{mean:.2f} ± {half:.2f}" if not math.isnan(half) else f"{mean:.2f}"),
            "n": len(acc),
            "Epochs (ours / seed)": f"{'/'.join(map(str, epochs)) or '-'} / {row['epochs']}",
            "Difference (pts)": f"{mean - row['accuracy']:+.2f}" if len(acc) else "-",
            "Scale": _scale_note(ours, row["epochs"]) if len(acc) else "-",
        })
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame) -> str:
    return ("## Reproduction of the seed report\n\n" + table.to_markdown(index=False) +
            "\n\nOurs: mean ± half-width of the 95% Student-t interval over seeds (a single run "
            "shows no interval); test accuracy at the best validation epoch when the runs "
            "held out a validation split, else after the last epoch. The seed's numbers are "
            "single runs, best epoch on the test set.\n")
