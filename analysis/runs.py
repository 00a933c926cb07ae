"""Collect run folders into DataFrames: one row per run, from its result.json, and one frame per
CSV (metrics.csv, ...). The record (ablate.record.RunRecord) says what the run was, written once
by the run: resolved config, row identity, seed, sweep, data fingerprint; nothing here re-derives
them (records of older versions, without their config: from .hydra/ through OmegaConf, noted).
Never raises: a file that cannot be trusted makes its run `unreadable`, naming file and reason."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ablate.record import (CSV_FILES, HYDRA_CONFIG, HYDRA_RUNTIME, METRIC_COLUMNS, METRICS_FILE,
                           RESULT_FILE, SWEEP_FILE, row_identity)

STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
# result.json fields analysis computes with, when present: each a number in its range
ACCURACIES = ("final_test_acc", "best_test_acc", "best_val_acc", "test_acc_at_best_val")
COUNTS = ("epochs", "epochs_run", "train_images", "val_images", "test_images")
NUMBERS = ("seed", "scale", *ACCURACIES, *COUNTS)
MAPPINGS = ("choices", "extra", "config", "sweep")
OWN_ACCURACIES = ("train_acc", "test_acc", "val_acc")  # the loop's; a callback's *_acc may be in %
COLUMNS = ("run_dir", "sweep", "sweep_kind", "study", "job", "status", "error", "note", "choices",
           "overrides", "typed_overrides", "config", "identity", "row_identity", "seed", "acc",
           "metric", "duplicate_of")
FROM_RECORD = ("epochs_run", "final_test_acc", "best_test_acc", "best_val_acc", "train_images",
               "val_images", "data_source", "extra")


def printable(text: str) -> str:
    """Text safe to print and draw: a folder name's bytes that are not UTF-8 become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Unreadable(Exception):
    """A run's file that cannot be trusted; the message names the file and says why."""


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under `root` that a run used (it holds result.json or .hydra/config.yaml)."""
    def is_run(path: str) -> bool:
        return any(os.path.exists(os.path.join(path, name)) for name in (RESULT_FILE, HYDRA_CONFIG))

    if is_run(os.fspath(root)):
        return [Path(root)]
    found, stack = [], [os.fspath(root)]
    while stack:  # no links, no hidden folders; a run folder holds no other runs
        here = stack.pop()
        with contextlib.suppress(OSError), os.scandir(here) as entries:
            for path in [e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]:
                (found.append(Path(path)) if is_run(path) else stack.append(path))
    return sorted(found, key=natural)


def natural(path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def parse_override(text: str) -> tuple[str, str]:
    """'+experiment=loss_a' -> ('experiment', 'loss_a'); '~key' -> ('key', '<deleted>')."""
    key, _, value = text.lstrip("+~").partition("=")
    return (key, "<deleted>") if text.startswith("~") else (key, value)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; lists stay values."""
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {sys.intern(f"{prefix}{k}"): v})
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_result(run_dir: Path) -> dict | None:
    """result.json checked field by field; None when there is none (the run never got going)."""
    path = run_dir / RESULT_FILE
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise Unreadable(f"{RESULT_FILE}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise Unreadable(f"{RESULT_FILE}: holds a JSON {type(record).__name__}, not an object")
    if record.get("status") not in STATUSES:
        raise Unreadable(f"{RESULT_FILE}: status {record.get('status')!r} is none of {', '.join(STATUSES)}")
    for key in NUMBERS:
        value = record.get(key)
        if value is None or key in ACCURACIES and _is_number(value) and math.isnan(value):
            continue  # no accuracy (a run can end without one): the row says so
        why = ("not a finite number" if not _is_number(value) or not math.isfinite(value) else
               "not an accuracy in [0, 1]" if key in ACCURACIES and not 0 <= value <= 1 else
               "not a count (a whole number >= 0)" if key in COUNTS and (value < 0 or value != int(value)) else
               "not > 0" if key == "scale" and value <= 0 else None)
        if why:
            raise Unreadable(f"{RESULT_FILE}: {key} is {value!r}, {why}")
    for key in (key for key in MAPPINGS if record.get(key) is not None and not isinstance(record[key], dict)):
        raise Unreadable(f"{RESULT_FILE}: {key} is a {type(record[key]).__name__}, not a mapping")
    if not all(isinstance(o, str) for o in record.get("overrides") or []):
        raise Unreadable(f"{RESULT_FILE}: overrides are not all strings")
    return record


def read_hydra(run_dir: Path) -> dict:
    """What an older record lacks, from .hydra/ through OmegaConf: the resolved config, the group
    choices and the overrides as typed."""
    from omegaconf import OmegaConf

    import ablate.resolvers  # noqa: F401  (${scaled:N} in the config)

    name = HYDRA_CONFIG
    try:  # OmegaConf raises many kinds of errors on a damaged file
        config = OmegaConf.load(run_dir / name)
        try:
            tree = OmegaConf.to_container(config, resolve=True)
        except Exception:  # an interpolation only Hydra could resolve: as written
            tree = OmegaConf.to_container(config, resolve=False)
        hydra = OmegaConf.load(run_dir / (name := HYDRA_RUNTIME)).hydra
        choices, typed = OmegaConf.to_container(hydra.runtime.choices), [str(o) for o in hydra.overrides.task]
    except Exception as err:
        raise Unreadable(f"{name}: {type(err).__name__}: {(str(err) or '?').splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise Unreadable(f"{HYDRA_CONFIG}: holds a {type(tree).__name__}, not a mapping")
    return {"config": tree, "overrides": typed, "choices": {
        k: str(v) for k, v in choices.items() if not k.startswith("hydra") and k != "logger" and v is not None}}


def read_csv(path: Path, required: tuple[str, ...] = ()) -> tuple[dict | None, list[str]]:
    """A run's CSV as {column: array} (None when absent or empty) and notes on columns left out
    (text, in files written before callback columns were checked); Unreadable when damaged:
    cut short, a row of the wrong length, epochs not whole, once each and in order (metrics.csv;
    steps.csv has many rows an epoch), the loop's accuracies outside [0, 1]."""
    name = path.name
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError) as err:
        raise Unreadable(f"{name}: {err}") from None
    if not text:
        return None, []
    if not text.endswith("\n"):
        raise Unreadable(f"{name}: cut short (its last line is incomplete)")
    lines = list(csv.reader(io.StringIO(text))) if '"' in text else [line.split(",") for line in text.splitlines()]
    header, body = lines[0], lines[1:]
    if len(set(header)) != len(header) or "" in header:
        raise Unreadable(f"{name}: its header has an empty or repeated column name")
    if missing := [c for c in required if c not in header]:
        raise Unreadable(f"{name}: no column {missing[0]!r} in its header (cut or damaged)")
    if any(len(row) != len(header) for row in body):
        raise Unreadable(f"{name}: a row has not {len(header)} fields (cut or damaged)")
    columns, notes = {}, []
    cells = [[c or "nan" for c in row] for row in body]  # an empty cell is a missing value
    try:  # numpy parses the text, every column at once (with a column of text: one by one)
        table = list(np.array(cells, dtype=np.float64).reshape(len(body), len(header)).T)
    except ValueError:
        table = [None] * len(header)
    for i, column in enumerate(header):
        try:
            columns[sys.intern(column)] = np.array([r[i] for r in cells], dtype=np.float64) if table[i] is None else table[i]
        except ValueError:
            if column in METRIC_COLUMNS:
                raise Unreadable(f"{name}: column {column!r} holds a value that is not a number") from None
            notes.append(f"{name}: column {column!r} left out (not numbers)")
    epochs = columns.get("epoch")
    if epochs is not None:
        if not (np.isfinite(epochs) & (epochs == np.round(epochs)) & (epochs >= 0)).all():
            raise Unreadable(f"{name}: column 'epoch' holds a value that is not a whole number >= 0")
        if name == METRICS_FILE and (np.diff(epochs) <= 0).any():
            raise Unreadable(f"{name}: epoch {epochs[1:][np.diff(epochs) <= 0][0]:g} comes twice or out of order")
        columns["epoch"] = epochs.astype(np.int64)
    for column in OWN_ACCURACIES:
        values = columns.get(column)
        if values is not None and ((values < 0) | (values > 1)).any():  # NaN compares False: missing is fine
            raise Unreadable(f"{name}: {column} is {values[(values < 0) | (values > 1)][0]:g}, not an accuracy in [0, 1]")
    return columns, notes


def usable_accuracy(record: dict) -> tuple[float, str]:
    """The run's accuracy (test at the best validation epoch when it held out a split, else
    after the last epoch) and which one it is; nan when the number is missing or impossible."""
    metric = "test_acc_at_best_val" if record.get("test_acc_at_best_val") is not None else "final_test_acc"
    acc = record.get(metric)
    return (float(acc) if _is_number(acc) and math.isfinite(acc) and 0 <= acc <= 1 else math.nan), metric


def read_run(run_dir: Path, csvs: tuple[str, ...] = ("metrics",)) -> tuple[dict, dict]:
    """What a run's own files say: its row's fields (but run_dir and sweep) and each CSV as
    columns; a damaged file makes the row `unreadable` (and no CSVs), never an exception."""
    row, frames = {"status": "unfinished", "error": None, "note": None, "choices": {}, "overrides": {},
                   "typed_overrides": [], "config": {}, "sweep_info": {}}, {}
    try:
        record = read_result(run_dir)
        if record is None:
            row["error"] = f"no {RESULT_FILE} (never started, still starting, or killed)"
            return row, frames
        new = "config" in record  # the loop writes all its columns (older records: less checked)
        required = METRIC_COLUMNS if new else ("epoch", "test_acc")
        if not new:  # written before records said what the run was
            record.update(read_hydra(run_dir), row_identity=None)
            row["note"] = "an older record without its config: read from .hydra/ through OmegaConf"
        notes = []
        for name in csvs:
            frames[name], more = read_csv(run_dir / CSV_FILES[name], required if name == "metrics" else ())
            notes += more
        rows = len(frames["metrics"]["epoch"]) if frames.get("metrics") else 0  # completed: one an epoch
        if new and "metrics" in csvs and record["status"] == "completed" and rows != record.get("epochs_run", rows):
            raise Unreadable(f"{METRICS_FILE}: {rows} epochs, but the record says "
                             f"{record['epochs_run']} ran (cut or damaged)")
    except Unreadable as err:
        row.update(status="unreadable", error=str(err))
        return row, {}
    config = record.get("config") or {}
    seed = record.get("seed", config.get("seed"))
    row.update({k: record.get(k) for k in ("status", "error", *FROM_RECORD)},
               choices=record.get("choices") or {}, typed_overrides=list(record.get("overrides") or []),
               overrides=dict(parse_override(o) for o in record.get("overrides") or []),
               config=flatten(config), seed=seed, sweep_info=record.get("sweep") or {},
               note="; ".join(filter(None, [row["note"], *notes])) or None)
    row["row_identity"] = record.get("row_identity") or (row_identity(config) if config else None)
    row["identity"] = f"{row['row_identity']}:{seed}" if row["row_identity"] else None
    row["acc"], row["metric"] = usable_accuracy(record)
    if row["status"] == "completed" and math.isnan(row["acc"]):
        row.update(status="completed without accuracy",
                   error=f"completed, but {row['metric']} is {record.get(row['metric'])!r}")
    return row, frames


def place(run_dir: Path, root: Path, info: dict) -> dict:
    """The run's sweep as its record says (older: a folder holding multirun.yaml) is the folder
    holding the run; single runs form one group per root."""
    kind = info.get("kind") or ("grid" if (run_dir.parent / SWEEP_FILE).exists() else "single")
    sweep = f"single runs in {root}" if kind == "single" else str(run_dir.parent)
    return {"run_dir": str(run_dir), "sweep": sweep, "sweep_kind": kind, **{k: info.get(k) for k in ("study", "job")}}


def mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Copies of one run (same row identity and seed) in one sweep count once: the best (completed
    with an accuracy, then first by path) stays, the others become `duplicate`; `also_in` names
    the other sweeps holding a copy (a sweep's table keeps its own; pooled tables drop them)."""
    runs = runs.astype({"duplicate_of": object, "error": object, "status": object})
    runs["also_in"] = [[] for _ in range(len(runs))]
    rank = {"completed": 0, "completed without accuracy": 1}
    shared = runs["identity"].notna() & runs["identity"].duplicated(keep=False)
    for _, group in runs[shared].groupby("identity", sort=False):
        for i in group.index:  # the other sweeps holding a copy
            runs.at[i, "also_in"] = sorted(set(group["sweep"]) - {runs.at[i, "sweep"]})
        for _, copies in group.groupby("sweep", sort=False):
            order = sorted(copies.index, key=lambda i: (rank.get(runs.at[i, "status"], 2), natural(runs.at[i, "run_dir"])))
            kept = runs.at[order[0], "run_dir"]
            for i in order[1:]:
                runs.loc[i, ["duplicate_of", "status", "error"]] = \
                    [kept, "duplicate", f"copy of {kept} (same settings and seed; counted once)"]
    return runs


def stack(pieces: list[tuple[str, dict]]) -> pd.DataFrame:
    """Each run's CSV columns with its run_dir as one frame, built column by column (what
    concatenating thousands of small frames gives, in a fraction of the time)."""
    if not pieces:
        return pd.DataFrame(columns=["run_dir"])
    lengths, data = [len(next(iter(columns.values()))) if columns else 0 for _, columns in pieces], {}
    for name in dict.fromkeys(name for _, columns in pieces for name in columns):
        parts = [columns.get(name) for _, columns in pieces]
        if all(p is not None for p in parts) and len({p.dtype for p in parts}) == 1:
            data[name] = np.concatenate(parts)
        else:  # a column some runs lack, or int beside float: float with NaN where missing
            data[name] = np.concatenate([np.full(n, np.nan) if p is None else p.astype(np.float64)
                                         for p, n in zip(parts, lengths)])
    data["run_dir"] = np.repeat(np.array([run_dir for run_dir, _ in pieces], dtype=object), lengths)
    return pd.DataFrame(data).astype({"run_dir": pd.Series(["x"]).dtype})  # the dtype assign() gives text


def collect(roots: list[Path], csvs: tuple[str, ...] = ("metrics",)) -> tuple[pd.DataFrame, dict]:
    """(runs, frames): one row per run folder under `roots`, in each sweep's job order;
    frames[name] stacks every counted run's <name>.csv with a run_dir column."""
    rows, pieces = [], {name: [] for name in csvs}
    for root in roots:
        for run_dir in find_run_dirs(root):
            fields, frames = read_run(run_dir, tuple(csvs))
            rows.append({**place(run_dir, root, fields.pop("sweep_info")), **fields})
            for name in (name for name, columns in frames.items() if columns is not None):
                pieces[name].append((str(run_dir), frames[name]))
    rows.sort(key=lambda row: (row["sweep"], row["job"], row["run_dir"]) if isinstance(row["job"], int)
              else (row["sweep"], math.inf, natural(row["run_dir"])))
    runs = mark_duplicates(pd.DataFrame(rows, columns=[*COLUMNS, *FROM_RECORD]).astype({"acc": float}))
    kept = set(runs.loc[runs["status"] != "duplicate", "run_dir"])
    return runs, {name: stack([(d, c) for d, c in found if d in kept]) for name, found in pieces.items()}
