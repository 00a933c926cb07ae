"""Collect Hydra run folders into DataFrames: one row per run, one frame per CSV. Never raises:
a file that cannot be trusted marks its run `unreadable`, with the file and the reason."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ablate.record import (CSV_FILES, HYDRA_CONFIG, HYDRA_RUNTIME, RESULT_FILE, SWEEP_FILE,
                           identity, row_identity)

STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
# result.json fields analysis computes with, when present: each a number in its range
ACCURACIES = ("final_test_acc", "best_test_acc", "best_val_acc", "test_acc_at_best_val")
COUNTS = ("epochs", "epochs_run", "train_images", "val_images", "test_images")
NUMBERS = ("seed", "scale", *ACCURACIES, *COUNTS)
MAPPINGS = ("choices", "extra")
# what a run's row always has, from its folder; then what it takes from result.json as it is
COLUMNS = ("run_dir", "sweep", "status", "error", "choices", "overrides", "config", "identity",
           "row_identity", "seed", "acc", "metric", "duplicate_of")
FROM_RECORD = ("epochs_run", "final_test_acc", "best_test_acc", "best_val_acc", "train_images",
               "val_images", "data_source", "extra")


class Unreadable(Exception):
    """A run's file that cannot be trusted; the message names the file and says why."""


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` that Hydra ran a job in (it holds .hydra/config.yaml)."""
    found = []
    for here, dirs, _ in os.walk(root):
        if (Path(here) / HYDRA_CONFIG).exists():
            found.append(Path(here))
            dirs[:] = []  # a run directory holds no other runs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=natural)


def natural(path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def parse_override(text: str) -> tuple[str, str]:
    """'+experiment=loss_a' -> ('experiment', 'loss_a'); '~key' -> ('key', '<deleted>')."""
    if text.startswith("~"):
        return text.lstrip("~").split("=")[0], "<deleted>"
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def flatten(tree, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def sweep_order(multirun_yaml: Path) -> dict[str, list[str]]:
    """Each key the sweep in multirun.yaml swept, with its values in the order they were typed."""
    try:
        hydra_cfg = _yaml(multirun_yaml)["hydra"]
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
        orders[row["sweep"]] = sweep_order(Path(row["sweep"]) / SWEEP_FILE)
    return tuple(values.index(row["overrides"].get(key)) if row["overrides"].get(key) in values
                 else len(values) for key, values in orders[row["sweep"]].items())


def _yaml(path: Path) -> dict:
    name = f"{path.parent.name}/{path.name}"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise Unreadable(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{name}: holds a {type(data).__name__}, not a mapping")
    return data


def read_hydra(run_dir: Path) -> dict:
    """The group choices and the overrides the user typed, from .hydra/hydra.yaml."""
    hydra = _yaml(run_dir / HYDRA_RUNTIME).get("hydra")
    try:
        choices, task = hydra["runtime"]["choices"] or {}, hydra["overrides"]["task"] or []
    except (TypeError, KeyError) as err:
        raise Unreadable(f"{HYDRA_RUNTIME}: no hydra.runtime.choices or hydra.overrides.task ({err})") from None
    if not isinstance(choices, dict) or not all(isinstance(o, str) for o in task):
        raise Unreadable(f"{HYDRA_RUNTIME}: choices is not a mapping or overrides not strings")
    return {"choices": {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None},
            "overrides": dict(parse_override(o) for o in task)}


def read_config(run_dir: Path) -> dict:
    """The run's resolved config, flattened, and its identity (what makes two runs copies)."""
    _yaml(run_dir / HYDRA_CONFIG)  # a readable mapping, or Unreadable
    try:  # OmegaConf raises many error types on what plain YAML accepts
        cfg = OmegaConf.load(run_dir / HYDRA_CONFIG)
    except Exception as err:
        raise Unreadable(f"{HYDRA_CONFIG}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only Hydra could resolve: compare as written
        tree = OmegaConf.to_container(cfg, resolve=False)
    return {"config": flatten(tree), "identity": identity(tree), "row_identity": row_identity(tree)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_result(run_dir: Path) -> dict | None:
    """result.json checked field by field; None when there is none (the run never got going)."""
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise Unreadable(f"{RESULT_FILE}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise Unreadable(f"{RESULT_FILE}: holds a JSON {type(record).__name__}, not an object")
    if record.get("status") not in STATUSES:
        raise Unreadable(f"{RESULT_FILE}: status {record.get('status')!r} is none of {', '.join(STATUSES)}")
    for key in NUMBERS:
        value = record.get(key)
        if value is None:
            continue
        if key in ACCURACIES and _is_number(value) and math.isnan(value):
            continue  # no accuracy (a run can end without one): the row says so
        if not _is_number(value) or not math.isfinite(value):
            raise Unreadable(f"{RESULT_FILE}: {key} is {value!r}, not a finite number")
        if key in ACCURACIES and not 0 <= value <= 1:
            raise Unreadable(f"{RESULT_FILE}: {key} is {value!r}, not an accuracy in [0, 1]")
        if key in COUNTS and (value < 0 or value != int(value)):
            raise Unreadable(f"{RESULT_FILE}: {key} is {value!r}, not a count (a whole number >= 0)")
        if key == "scale" and value <= 0:
            raise Unreadable(f"{RESULT_FILE}: scale is {value!r}, not > 0")
    for key in MAPPINGS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise Unreadable(f"{RESULT_FILE}: {key} is a {type(record[key]).__name__}, not a mapping")
    return record


def read_csv(path: Path) -> pd.DataFrame | None:
    """A numeric CSV (metrics.csv, steps.csv, ...); None when absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ParserError is a ValueError
        raise Unreadable(f"{path.name}: {str(err).splitlines()[0]}") from None
    for column in frame:
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError):
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()]
            raise Unreadable(f"{path.name}: column {column!r} holds {bad.iloc[0]!r}, not a number") from None
    check_rows(frame, path.name)
    return frame


def check_rows(frame: pd.DataFrame, name: str) -> None:
    """Epochs each once and in increasing order; accuracies in [0, 1] or missing."""
    if "epoch" in frame:
        epochs = frame["epoch"]
        if epochs.isna().any() or not (epochs == epochs.round()).all() or (epochs < 0).any():
            raise Unreadable(f"{name}: column 'epoch' holds a value that is not a whole number >= 0")
        if not epochs.is_unique or not epochs.is_monotonic_increasing:
            first = epochs[epochs.duplicated() | (epochs.diff() <= 0)].iloc[0]
            raise Unreadable(f"{name}: epoch {first:g} comes twice or out of order")
    for column in frame:
        if str(column).endswith("_acc"):
            bad = frame[column][frame[column].notna() & ~frame[column].between(0, 1)]
            if len(bad):
                raise Unreadable(f"{name}: {column} is {bad.iloc[0]:g}, not an accuracy in [0, 1]")


def usable_accuracy(record: dict) -> tuple[float, str]:
    """The run's accuracy (test at the best validation epoch when it held out a split, else
    after the last epoch) and which one it is; nan when the number is missing or impossible."""
    metric = "test_acc_at_best_val" if record.get("test_acc_at_best_val") is not None else "final_test_acc"
    acc = record.get(metric)
    ok = _is_number(acc) and math.isfinite(acc) and 0 <= acc <= 1
    return (float(acc) if ok else math.nan), metric


def load_run(run_dir: Path, root: Path, csvs: tuple[str, ...] = ("metrics",)) -> tuple[dict, dict]:
    """One run's row and its CSV frames; a damaged file makes the row `unreadable`, never an exception."""
    multirun = (run_dir.parent / SWEEP_FILE).exists()
    row: dict = {"run_dir": str(run_dir), "status": "unfinished", "error": None,
                 "choices": {}, "overrides": {}, "config": {},
                 # a sweep is the folder Hydra wrote multirun.yaml into; single runs form one group
                 "sweep": str(run_dir.parent) if multirun else f"single runs in {root}"}
    frames: dict = {}
    try:
        row.update(read_hydra(run_dir))
        row.update(read_config(run_dir))
        row["seed"] = row["config"].get("seed")
        record = read_result(run_dir)
        for name in csvs:
            frames[name] = read_csv(run_dir / CSV_FILES[name])
    except Unreadable as err:
        row.update(status="unreadable", error=str(err))
        return row, {}
    if record is None:
        row["error"] = f"no {RESULT_FILE} (never started, still starting, or killed)"
        return row, frames
    row.update({k: record.get(k) for k in ("status", "error", *FROM_RECORD)})
    row["acc"], row["metric"] = usable_accuracy(record)
    if row["status"] == "completed" and math.isnan(row["acc"]):
        row.update(status="completed without accuracy",
                   error=f"completed, but {row['metric']} is {record.get(row['metric'])!r}")
    return row, frames


def mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Copies of one run (same result-affecting settings, seed included) in one sweep count once:
    the best copy (completed with an accuracy, then the first by path) stays, the others become
    `duplicate`. A sweep's table is about that sweep, so copies in other sweeps never take its
    rows; `also_in` names those other sweeps (tables pooling across sweeps drop them)."""
    runs = runs.astype({"duplicate_of": object, "error": object, "status": object})
    runs["also_in"] = [[] for _ in range(len(runs))]
    rank = {"completed": 0, "completed without accuracy": 1}
    for _, group in runs[runs["identity"].notna()].groupby("identity", sort=False):
        if len(group) < 2:
            continue
        for i in group.index:
            runs.at[i, "also_in"] = sorted(set(group["sweep"]) - {runs.at[i, "sweep"]})
        for _, copies in group.groupby("sweep", sort=False):
            order = sorted(copies.index, key=lambda i: (rank.get(runs.at[i, "status"], 2),
                                                        natural(runs.at[i, "run_dir"])))
            kept = runs.at[order[0], "run_dir"]
            for i in order[1:]:
                runs.at[i, "duplicate_of"] = kept
                runs.at[i, "error"] = f"copy of {kept} (same settings and seed; counted once)"
                runs.at[i, "status"] = "duplicate"
    return runs


def collect(roots: list[Path], csvs: tuple[str, ...] = ("metrics",)) -> tuple[pd.DataFrame, dict]:
    """(runs, frames): one row per run folder under `roots`; frames[name] stacks every usable run's
    <name>.csv with a run_dir column (an empty frame when there is none)."""
    rows, stacked = [], {name: [] for name in csvs}
    for root in roots:
        for run_dir in find_run_dirs(root):
            row, frames = load_run(run_dir, root, csvs)
            rows.append(row)
            for name, frame in frames.items():
                if frame is not None:
                    stacked[name].append(frame.assign(run_dir=str(run_dir)))
    orders: dict = {}  # job folders are named, not numbered: keep the order the sweep typed
    rows.sort(key=lambda row: (row["sweep"], _position(row, orders)))
    runs = pd.DataFrame(rows, columns=[*COLUMNS, *FROM_RECORD])
    runs["acc"] = runs["acc"].astype(float)
    runs = mark_duplicates(runs)
    kept = set(runs.loc[runs["status"] != "duplicate", "run_dir"])
    return runs, {name: (pd.concat(f, ignore_index=True).pipe(lambda d: d[d["run_dir"].isin(kept)])
                         if f else pd.DataFrame(columns=["run_dir"])) for name, f in stacked.items()}
