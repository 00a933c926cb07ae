"""Collect Hydra run folders into DataFrames: one row per run, one frame per CSV. Never raises:
a file that cannot be trusted marks its run `unreadable`, with the file and the reason.

Fast at scale: YAML goes through libyaml when PyYAML has it, each file is parsed once (config.yaml
with OmegaConf's own YAML rules, its interpolations resolved here when they are the plain ones
conf/ writes, by OmegaConf otherwise), and from CACHE_MIN_RUNS run folders on, what each run's
files said is cached (keyed by every file's size, mtime, ctime and inode, and by this code's
version), so a second call reads only the runs that changed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ablate import resolvers
from ablate.record import (CSV_FILES, HYDRA_CONFIG, HYDRA_RUNTIME, METRICS_FILE, RESULT_FILE,
                           SWEEP_FILE, identity, row_identity)

STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
# result.json fields analysis computes with, when present: each a number in its range
ACCURACIES = ("final_test_acc", "best_test_acc", "best_val_acc", "test_acc_at_best_val")
COUNTS = ("epochs", "epochs_run", "train_images", "val_images", "test_images")
NUMBERS = ("seed", "scale", *ACCURACIES, *COUNTS)
MAPPINGS = ("choices", "extra")
# what a run's row always has, from its folder; then what it takes from result.json as it is
COLUMNS = ("run_dir", "sweep", "sweep_kind", "status", "error", "choices", "overrides", "typed_overrides",
           "config", "identity", "row_identity", "seed", "acc", "metric", "duplicate_of")
FROM_RECORD = ("epochs_run", "final_test_acc", "best_test_acc", "best_val_acc", "train_images",
               "val_images", "data_source", "extra")


CACHE_ENV = "ABLATE_CACHE"  # the cache's folder; "off" turns it off (default ~/.cache/ablate)
CACHE_MIN_RUNS = 200  # fewer run folders under a root are read fast enough without a cache


def printable(text: str) -> str:
    """Text safe to write, print and draw: bytes of a folder name that are not UTF-8 (which Python
    carries as lone surrogates) become U+FFFD instead of failing the whole call."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Unreadable(Exception):
    """A run's file that cannot be trusted; the message names the file and says why."""


# ----------------------------------------------------------------------------- YAML, fast

_C = getattr(yaml, "__with_libyaml__", False)
SafeLoader = yaml.CSafeLoader if _C else yaml.SafeLoader  # libyaml's parser, PyYAML's constructor


def _config_loader():
    """A loader with OmegaConf.load's YAML rules (1e-3 is a float, no timestamps, a duplicate key
    is an error) on libyaml's parser; OmegaConf's own (pure Python) loader without libyaml."""
    try:
        from omegaconf._utils import get_yaml_loader
        base = get_yaml_loader()
    except Exception:  # another OmegaConf: read config.yaml with OmegaConf.load itself
        return None
    if not _C:
        return base

    class ConfigLoader(yaml.cyaml.CParser, base):
        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return ConfigLoader


ConfigLoader = _config_loader()


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` that Hydra ran a job in (it holds .hydra/config.yaml)."""
    if os.path.exists(os.path.join(root, HYDRA_CONFIG)):
        return [Path(root)]
    found: list[Path] = []

    def walk(here: str) -> None:  # os.walk's order (no links, no hidden folders), not listing runs
        try:
            with os.scandir(here) as entries:
                names = sorted(e.name for e in entries
                               if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        except OSError:
            return
        for name in names:
            path = os.path.join(here, name)
            if os.path.exists(os.path.join(path, HYDRA_CONFIG)):
                found.append(Path(path))  # a run directory holds no other runs
            else:
                walk(path)

    walk(os.fspath(root))
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
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; lists stay values. Keys are interned:
    thousands of runs share one copy of each."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {sys.intern(f"{prefix}{k}"): v})
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


def _unreadable(path: Path, err: Exception) -> Unreadable:
    return Unreadable(f"{path.parent.name}/{path.name}: {type(err).__name__}: {str(err).splitlines()[0]}")


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None


def _parse(path: Path, text: str, loader=SafeLoader):
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise _unreadable(path, err) from None


def _mapping(path: Path, data) -> dict:
    if not isinstance(data, dict):
        raise Unreadable(f"{path.parent.name}/{path.name}: holds a {type(data).__name__}, not a mapping")
    return data


def _yaml(path: Path) -> dict:
    return _mapping(path, _parse(path, _text(path)))


SAFE_TAGS = frozenset(yaml.constructor.SafeConstructor.yaml_constructors) - {None}
_PLAIN = "tag:ablate,plain"  # a plain scalar, its tag found only if it is built


class _LazyLoader(SafeLoader):
    """Leaves plain scalars' tags to be found when built: trying the resolvers' patterns on each
    of hydra.yaml's hundreds of scalars, in Python, is much of its parse."""
    unusual = False  # a plain '=' or '<<' (a value or merge tag): build it all as PyYAML does

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            if value in ("=", "<<"):
                self.unusual = True
            return _PLAIN
        return yaml.resolver.Resolver.resolve(self, kind, value, implicit)


def _nodes(top):
    """Every node under `top` once (an alias may make the graph cyclic)."""
    stack, seen = [top], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _build(loader, node):
    for n in _nodes(node):
        if n.tag == _PLAIN:
            n.tag = yaml.resolver.Resolver.resolve(loader, yaml.ScalarNode, n.value, (True, False))
    return loader.construct_document(node)


def _subtree(node, key: str):
    """The value node of `key` in a mapping node (the last, as a loader keeps), or None."""
    found = None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key \
                and key_node.tag in (_PLAIN, "tag:yaml.org,2002:str"):
            found = value_node
    return found


def _hydra_parts(path: Path, text: str) -> dict:
    """{'choices': ..., 'task': ...} from hydra.yaml: the whole file parsed (a damaged one is
    Unreadable), only those two built into Python objects (the rest is most of the time)."""
    loader = _LazyLoader(text)
    try:
        try:
            top = loader.get_single_node()
        except yaml.YAMLError as err:
            raise _unreadable(path, err) from None
        try:
            if loader.unusual:
                raise LookupError("a value or merge tag")
            if "!" in text:  # an explicit tag: one the safe loader cannot build makes it unreadable
                for node in _nodes(top):
                    if node.tag not in SAFE_TAGS and node.tag != _PLAIN:
                        raise LookupError(node.tag)
            hydra = _subtree(top, "hydra") if isinstance(top, yaml.MappingNode) else None
            runtime = _subtree(hydra, "runtime") if isinstance(hydra, yaml.MappingNode) else None
            overrides = _subtree(hydra, "overrides") if isinstance(hydra, yaml.MappingNode) else None
            choices = _subtree(runtime, "choices") if isinstance(runtime, yaml.MappingNode) else None
            task = _subtree(overrides, "task") if isinstance(overrides, yaml.MappingNode) else None
            if choices is None or task is None:
                raise LookupError("not the usual shape")
            nodes = [choices, task]
        except LookupError:  # anything unusual: build it all, for the same errors as always
            nodes = [top]
        try:
            built = [_build(loader, node) for node in nodes]
        except yaml.YAMLError as err:
            raise _unreadable(path, err) from None
    finally:
        loader.dispose()
    if len(built) == 2:
        return {"choices": built[0], "task": built[1]}
    hydra = _mapping(path, built[0]).get("hydra")
    try:
        return {"choices": hydra["runtime"]["choices"], "task": hydra["overrides"]["task"]}
    except (TypeError, KeyError) as err:
        raise Unreadable(f"{HYDRA_RUNTIME}: no hydra.runtime.choices or hydra.overrides.task ({err})") from None


def read_hydra(run_dir: Path) -> dict:
    """The group choices and the overrides the user typed, from .hydra/hydra.yaml."""
    path = run_dir / HYDRA_RUNTIME
    parts = _hydra_parts(path, _text(path))
    choices, task = parts["choices"] or {}, parts["task"] or []
    if not isinstance(choices, dict) or not all(isinstance(o, str) for o in task):
        raise Unreadable(f"{HYDRA_RUNTIME}: choices is not a mapping or overrides not strings")
    return {"choices": {sys.intern(k): sys.intern(str(v)) for k, v in choices.items()
                        if not k.startswith("hydra") and v is not None},
            "overrides": dict(parse_override(o) for o in task), "typed_overrides": list(task),
            "sweep_kind": "optuna" if choices.get("hydra/sweeper") == "optuna" else None}


class _NotPlain(Exception):
    """A config this module does not resolve itself: OmegaConf does."""


_REFERENCE = re.compile(r"\$\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")  # ${data.num_classes}
_SCALED = re.compile(r"\$\{scaled:(\d+)\}")  # ${scaled:5}, ablate.resolvers.scaled
_ODD_KEY = re.compile(r"[.\[\]${}]")


def resolve_plain(tree: dict) -> dict:
    """`tree` resolved as OmegaConf.to_container(resolve=True) would, for configs whose
    interpolations are whole values `${a.b}` (a key's value) or `${scaled:N}`; anything else
    (a value OmegaConf would refuse, text around an interpolation, another resolver, a missing
    key, '???' as a target, a cycle) raises _NotPlain. Thousands of times faster than OmegaConf."""
    active: set = set()

    def target(path: str):
        node = tree
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise _NotPlain(path)
            node = node[part]
        if path in active:
            raise _NotPlain(f"cycle at {path}")
        active.add(path)
        value = resolve(node)
        active.discard(path)
        if isinstance(value, (dict, list)) or value == "???":
            raise _NotPlain(path)
        return value

    def resolve(value):
        if isinstance(value, str):
            if "${" not in value:
                return sys.intern(value) if len(value) < 64 else value
            if m := _REFERENCE.fullmatch(value):
                return target(m[1])
            if (m := _SCALED.fullmatch(value)) and OmegaConf.has_resolver("scaled"):
                scale = tree.get("scale", 1.0)
                if isinstance(scale, str):
                    raise _NotPlain("scale")
                return resolvers.scaled(int(m[1]), _root_={"scale": scale})
            raise _NotPlain(value)
        if isinstance(value, dict):
            if not all(isinstance(k, str) and k and not _ODD_KEY.search(k) for k in value):
                raise _NotPlain("a key")
            return {sys.intern(k): resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        raise _NotPlain(type(value).__name__)

    return resolve(tree)


def resolve_omegaconf(tree: dict) -> dict:
    """`tree` resolved by OmegaConf; as written where OmegaConf cannot resolve it."""
    try:  # OmegaConf raises many error types on what plain YAML accepts
        cfg = OmegaConf.create(tree)
    except Exception as err:
        raise Unreadable(f"{HYDRA_CONFIG}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only Hydra could resolve: compare as written
        return OmegaConf.to_container(cfg, resolve=False)


def read_config(run_dir: Path) -> dict:
    """The run's resolved config, flattened, and its identity (what makes two runs copies)."""
    path = run_dir / HYDRA_CONFIG
    text = _text(path)
    if ConfigLoader is None:  # OmegaConf.load reads it; PyYAML's safe loader first, for its errors
        _mapping(path, _parse(path, text))
        try:
            tree = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as err:
            raise Unreadable(f"{HYDRA_CONFIG}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    else:  # read once, by OmegaConf's YAML rules
        if "!" in text:  # an explicit tag: PyYAML's safe loader refuses some OmegaConf's accepts
            _mapping(path, _parse(path, text))
        tree = _mapping(path, _parse(path, text, ConfigLoader))
    try:
        tree = resolve_plain(tree)
    except _NotPlain:
        tree = resolve_omegaconf(tree)
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
    try:
        if path.stat().st_size == 0:
            return None
    except OSError:
        return None
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ParserError is a ValueError
        raise Unreadable(f"{path.name}: {str(err).splitlines()[0]}") from None
    for column in frame:
        if pd.api.types.is_numeric_dtype(frame[column]):
            continue  # to_numeric would return it as it is
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError):
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()]
            raise Unreadable(f"{path.name}: column {column!r} holds {bad.iloc[0]!r}, not a number") from None
    check_rows(frame, path.name)
    return frame


def _rows_fine(frame: pd.DataFrame, per_epoch: bool = True) -> bool:
    """check_rows' checks on the NumPy arrays (a tenth of the time); False when unsure."""
    for column in frame:
        is_epoch, is_acc = column == "epoch", str(column).endswith("_acc")
        if not (is_epoch or is_acc):
            continue
        values = frame[column].to_numpy()
        if values.dtype.kind not in "if":
            return False
        if is_epoch and (np.isnan(values).any() or (values != np.round(values)).any() or (values < 0).any()
                         or per_epoch and (np.diff(values) <= 0).any()):  # strictly increasing: once, in order
            return False
        if is_acc and ((values < 0) | (values > 1)).any():  # NaN compares False: missing is fine
            return False
    return True


def check_rows(frame: pd.DataFrame, name: str) -> None:
    """Epochs whole numbers >= 0, in metrics.csv each once and in increasing order (steps.csv
    has a row per step, so many per epoch); accuracies in [0, 1] or missing."""
    per_epoch = name == METRICS_FILE
    if _rows_fine(frame, per_epoch):
        return
    if "epoch" in frame:
        epochs = frame["epoch"]
        if epochs.isna().any() or not (epochs == epochs.round()).all() or (epochs < 0).any():
            raise Unreadable(f"{name}: column 'epoch' holds a value that is not a whole number >= 0")
        if per_epoch and (not epochs.is_unique or not epochs.is_monotonic_increasing):
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


def _columns(frame: pd.DataFrame | None):
    """A run's CSV as kept (and cached): None, its columns as NumPy arrays, or the frame itself
    when a column is not a NumPy number (e.g. a header without rows)."""
    if frame is None:
        return None
    if all(dtype.kind in "biuf" and isinstance(dtype, np.dtype) for dtype in frame.dtypes):
        return {column: frame[column].to_numpy() for column in frame.columns}
    return frame


def _frame(columns) -> pd.DataFrame:
    return columns if isinstance(columns, pd.DataFrame) else pd.DataFrame(columns)


def read_run(run_dir: Path, csvs: tuple[str, ...] = ("metrics",)) -> tuple[dict, dict]:
    """What a run's own files say: its row's fields (all but run_dir and sweep) and each CSV
    (see _columns); a damaged file makes the row `unreadable` (and no CSVs), never an exception."""
    row: dict = {"status": "unfinished", "error": None, "choices": {}, "overrides": {}, "config": {}}
    frames: dict = {}
    try:
        row.update(read_hydra(run_dir))
        row.update(read_config(run_dir))
        row["seed"] = row["config"].get("seed")
        record = read_result(run_dir)
        for name in csvs:
            frames[name] = _columns(read_csv(run_dir / CSV_FILES[name]))
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


def _place(run_dir: Path, root: Path, sweeps: dict | None = None) -> dict:
    sweeps = {} if sweeps is None else sweeps  # parent -> whether it holds multirun.yaml
    if run_dir.parent not in sweeps:
        sweeps[run_dir.parent] = (run_dir.parent / SWEEP_FILE).exists()
    multirun = sweeps[run_dir.parent]
    # a sweep is the folder Hydra wrote multirun.yaml into; single runs form one group
    return {"run_dir": str(run_dir), "sweep": str(run_dir.parent) if multirun else f"single runs in {root}",
            "sweep_kind": "grid" if multirun else "single"}


def load_run(run_dir: Path, root: Path, csvs: tuple[str, ...] = ("metrics",)) -> tuple[dict, dict]:
    """One run's row and its CSV frames; a damaged file makes the row `unreadable`, never an exception."""
    fields, frames = read_run(run_dir, csvs)
    return {**_place(run_dir, root), **{k: v for k, v in fields.items() if v is not None or k != "sweep_kind"}}, {k: None if v is None else _frame(v) for k, v in frames.items()}


def mark_duplicates(runs: pd.DataFrame) -> pd.DataFrame:
    """Copies of one run (same result-affecting settings, seed included) in one sweep count once:
    the best copy (completed with an accuracy, then the first by path) stays, the others become
    `duplicate`. A sweep's table is about that sweep, so copies in other sweeps never take its
    rows; `also_in` names those other sweeps (tables pooling across sweeps drop them)."""
    runs = runs.astype({"duplicate_of": object, "error": object, "status": object})
    runs["also_in"] = [[] for _ in range(len(runs))]
    rank = {"completed": 0, "completed without accuracy": 1}
    shared = runs["identity"].notna() & runs["identity"].duplicated(keep=False)  # only these have copies
    for _, group in runs[shared].groupby("identity", sort=False):
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


# ----------------------------------------------------------------------------- the cache

def _code_version() -> str:
    """Cached entries are only good for the code (and libraries) that wrote them."""
    import omegaconf

    import ablate.record

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(ablate.record.__file__), Path(resolvers.__file__)):
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    digest.update(f"{sys.version} {np.__version__} {pd.__version__} {yaml.__version__} {_C} "
                  f"{omegaconf.__version__}".encode())
    return digest.hexdigest()[:16]


def _stat(path: str) -> tuple | None:
    """Size, mtime, ctime and inode (None: no such file): an edit, an atomic rewrite (a new
    inode) or a chmod changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _signature(run_dir: Path, csvs: tuple[str, ...]) -> tuple:
    """_stat of every file a run's row comes from."""
    here = os.fspath(run_dir)
    return (csvs, *(_stat(os.path.join(here, name))
                    for name in (HYDRA_RUNTIME, HYDRA_CONFIG, RESULT_FILE, *(CSV_FILES[c] for c in csvs))))


def _pack(frames: dict) -> dict:
    """Each CSV's columns as one structured array: one object to pickle per run, not one per column."""
    out = {}
    for name, columns in frames.items():
        if isinstance(columns, dict) and columns and all(isinstance(c, str) and c for c in columns):
            packed = np.empty(len(next(iter(columns.values()))), [(c, a.dtype) for c, a in columns.items()])
            for c, a in columns.items():
                packed[c] = a
            columns = packed
        out[name] = columns
    return out


def _unpack(frames: dict) -> dict:
    return {name: {c: columns[c] for c in columns.dtype.names} if isinstance(columns, np.ndarray) else columns
            for name, columns in frames.items()}


class Cache:
    """What each run's files said, for one root, in a pickle under ~/.cache/ablate (or $ABLATE_CACHE;
    ABLATE_CACHE=off: none). Unreadable or from other code: ignored; unwritable: not written."""

    def __init__(self, root: Path):
        setting = os.environ.get(CACHE_ENV, "")
        self.path = None
        if setting.lower() not in ("off", "0", "no", "false", "none"):
            folder = Path(setting) if setting else \
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ablate"
            key = hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:16]
            self.path = folder / f"runs-{key}.pickle"
        self.version, self.old, self.new, self.changed = _code_version(), {}, {}, False
        if self.path is not None and self.path.exists():
            with contextlib.suppress(Exception):  # a cache is never worth an error
                with open(self.path, "rb") as fh:
                    stored = pickle.load(fh)
                if stored.get("version") == self.version:
                    self.old = stored["entries"]

    def read(self, run_dir: Path, csvs: tuple[str, ...]) -> tuple[dict, dict]:
        """read_run(run_dir, csvs), from the cache when no file changed."""
        key, signature = str(run_dir), _signature(run_dir, csvs)
        entry = self.old.get(key)
        if entry is None or entry[0] != signature:
            fields, frames = read_run(run_dir, csvs)
            # a file written while it was read: read again next time
            entry = (signature if _signature(run_dir, csvs) == signature else None, fields, _pack(frames))
            self.changed = True
        self.new[key] = entry
        return entry[1], _unpack(entry[2])

    def sweep_order(self, sweep: str) -> dict:
        """sweep_order of the sweep folder's multirun.yaml (Hydra's parser is slow)."""
        path = os.path.join(sweep, SWEEP_FILE)
        key, signature = ("sweep order", sweep), _stat(path)
        entry = self.old.get(key)
        if entry is None or entry[0] != signature or signature is None:
            entry, self.changed = (signature, sweep_order(Path(path))), True
        self.new[key] = entry
        return entry[1]

    def save(self) -> None:
        if self.path is None or not (self.changed or self.new.keys() != self.old.keys()):
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                pickle.dump({"version": self.version, "entries": self.new}, fh, pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.path)
        except Exception:  # a read-only or full disk: no cache this time
            with contextlib.suppress(OSError):
                tmp.unlink()


# ----------------------------------------------------------------------------- collect

def stack(pieces: list[tuple[str, object]]) -> pd.DataFrame:
    """pd.concat of each run's frame with its run_dir column, as one frame (ignore_index), built
    column by column: the same frame as concatenating thousands of small ones, in a fraction of
    the time. pieces: (run_dir, _columns(frame)), not None."""
    if not pieces:
        return pd.DataFrame(columns=["run_dir"])
    if any(isinstance(columns, pd.DataFrame) for _, columns in pieces):  # pandas decides the dtypes
        return pd.concat([_frame(columns).assign(run_dir=run_dir) for run_dir, columns in pieces],
                         ignore_index=True)
    lengths = [len(next(iter(columns.values()))) if columns else 0 for _, columns in pieces]
    names = list(dict.fromkeys(name for _, columns in pieces for name in [*columns, "run_dir"]))
    data = {}
    for name in names:
        if name == "run_dir":
            data[name] = np.repeat(np.array([run_dir for run_dir, _ in pieces], dtype=object), lengths)
            continue
        parts = [columns.get(name) for _, columns in pieces]
        kinds = {part.dtype for part in parts if part is not None}
        if all(part is not None for part in parts) and len(kinds) == 1:
            data[name] = np.concatenate(parts)
        elif kinds <= {np.dtype("int64"), np.dtype("float64")}:  # a missing column or int with float: float
            data[name] = np.concatenate([np.full(n, np.nan) if part is None else part.astype(np.float64)
                                         for part, n in zip(parts, lengths)])
        else:  # bool beside missing values and the like: as pandas does it
            return pd.concat([_frame(columns).assign(run_dir=run_dir) for run_dir, columns in pieces],
                             ignore_index=True)
    frame = pd.DataFrame(data)
    frame["run_dir"] = frame["run_dir"].astype(pd.Series(["x"]).dtype)  # the dtype assign() gives text
    return frame


def collect(roots: list[Path], csvs: tuple[str, ...] = ("metrics",)) -> tuple[pd.DataFrame, dict]:
    """(runs, frames): one row per run folder under `roots`; frames[name] stacks every usable run's
    <name>.csv with a run_dir column (an empty frame when there is none)."""
    csvs = tuple(csvs)
    rows, pieces, sweeps = [], {name: [] for name in csvs}, {}
    orders: dict = {}  # job folders are named, not numbered: keep the order the sweep typed
    for root in roots:
        run_dirs = find_run_dirs(root)
        cache = Cache(root) if len(run_dirs) >= CACHE_MIN_RUNS else None
        for run_dir in run_dirs:
            fields, frames = cache.read(run_dir, csvs) if cache else read_run(run_dir, csvs)
            rows.append({**_place(run_dir, root, sweeps), **{k: v for k, v in fields.items() if v is not None or k != "sweep_kind"}})
            for name, columns in frames.items():
                if columns is not None:
                    pieces[name].append((str(run_dir), columns))
            if cache and rows[-1]["sweep"] not in orders and sweeps[run_dir.parent]:
                orders[rows[-1]["sweep"]] = cache.sweep_order(rows[-1]["sweep"])
        if cache:
            cache.save()
    rows.sort(key=lambda row: (row["sweep"], _position(row, orders)))
    runs = pd.DataFrame(rows, columns=[*COLUMNS, *FROM_RECORD])
    runs["acc"] = runs["acc"].astype(float)
    runs = mark_duplicates(runs)
    kept = set(runs.loc[runs["status"] != "duplicate", "run_dir"])
    frames = {}
    for name, found in pieces.items():
        stacked = stack(found)
        frames[name] = stacked[stacked["run_dir"].isin(kept)] if found else stacked
    return runs, frames
