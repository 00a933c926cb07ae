"""Collect Hydra run directories into DataFrames: one row per run, one row per (run, epoch)."""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


EXPECTED = ("run_dir", "sweep", "status", "error", "choices", "overrides", "seed", "epochs_run",
            "final_test_acc", "best_test_acc", "test_acc_at_best_val", "extra", "train_images",
            "val_images", "data_source")


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` that Hydra ran a job in (it holds .hydra/config.yaml)."""
    found = []
    for here, dirs, _ in os.walk(root):
        if (Path(here) / ".hydra" / "config.yaml").exists():
            found.append(Path(here))
            dirs[:] = []  # a run directory holds no other runs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=_natural)


def _natural(path: Path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def parse_override(text: str) -> tuple[str, str]:
    """'+experiment=loss_a' -> ('experiment', 'loss_a'); '~key' -> ('key', '<deleted>')."""
    if text.startswith("~"):
        return text.lstrip("~").split("=")[0], "<deleted>"
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def sweep_order(multirun_yaml: Path) -> dict[str, list[str]]:
    """Each key the sweep in multirun.yaml swept, with its values in the order they were typed."""
    try:
        hydra_cfg = _read_yaml(multirun_yaml)["hydra"]
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        lines = [*hydra_cfg["overrides"]["task"], *(f"{k}={v}" for k, v in params.items())]
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # no order to follow: the folders' own order stands
        return {}
    order = {}
    for override in overrides:
        if override.is_sweep_override():
            with contextlib.suppress(HydraException):  # glob(...) needs Hydra's config loader
                order[override.key_or_group] = list(override.sweep_string_iterator())
    return order


def _position(row: dict, orders: dict) -> tuple:
    """Where a run's values come in its sweep's lists: job folders are named, not numbered, so
    this keeps table rows in the order typed (of the sweep that last wrote multirun.yaml)."""
    if row["sweep"] not in orders:
        orders[row["sweep"]] = sweep_order(Path(row["sweep"]) / "multirun.yaml")
    return tuple(values.index(row["overrides"].get(key)) if row["overrides"].get(key) in values
                 else len(values) for key, values in orders[row["sweep"]].items())


def _read_yaml(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def load_run(run_dir: Path, root: Path) -> tuple[dict, pd.DataFrame | None]:
    """One run's row (record, choices, overrides) and its per-epoch metrics; never raises on bad files."""
    row: dict = {"run_dir": str(run_dir), "status": "unfinished", "error": None}
    try:
        hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")["hydra"]
        row["choices"] = {k: v for k, v in (hydra_cfg["runtime"]["choices"] or {}).items()
                          if not k.startswith("hydra") and v is not None}
        row["overrides"] = dict(parse_override(o) for o in hydra_cfg["overrides"]["task"])
    except Exception as err:
        row.update(choices={}, overrides={}, status="unreadable", error=f".hydra: {err}")
    # A sweep is the folder Hydra wrote multirun.yaml into; single runs under a root form one group.
    multirun = (run_dir.parent / "multirun.yaml").exists()
    row["sweep"] = str(run_dir.parent) if multirun else f"single runs in {root}"

    result = run_dir / "result.json"
    if result.exists():
        try:
            record = json.loads(result.read_text())
            row.update({k: v for k, v in record.items() if k not in ("choices", "overrides")})
            row["choices"] = record.get("choices") or row["choices"]
        except (ValueError, OSError) as err:
            row.update(status="unreadable", error=f"result.json: {err}")
    else:
        row["error"] = row["error"] or "no result.json (never started, still starting, or killed)"

    curves = None
    if (run_dir / "metrics.csv").exists():
        try:
            curves = pd.read_csv(run_dir / "metrics.csv")
            curves.insert(0, "run_dir", str(run_dir))
        except (ValueError, OSError, pd.errors.ParserError):
            curves = None
    return row, curves


def collect(roots: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves): one row per run directory found under `roots`, one row per run and epoch."""
    rows, curves = [], []
    for root in roots:
        for run_dir in find_run_dirs(root):
            row, c = load_run(run_dir, root)
            rows.append(row)
            if c is not None:
                curves.append(c)
    orders: dict = {}
    rows.sort(key=lambda row: (row["sweep"], _position(row, orders)))
    runs = pd.DataFrame(rows)
    for column in EXPECTED:  # present even when no run has a readable record
        if column not in runs:
            runs[column] = None
    return runs, (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())
