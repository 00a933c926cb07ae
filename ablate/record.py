"""A run folder's files: their names (every one, here only), the typed run record (result.json)
and per-epoch metrics (metrics.csv), written atomically. Torch-free: analysis/ reads through it."""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

# The files of a run folder (beside the job's <job name>.log).
HYDRA_DIR = ".hydra"                 # Hydra's record of the job, written by the run (ablate.folder)
HYDRA_CONFIG = f"{HYDRA_DIR}/config.yaml"        # the composed config
HYDRA_RUNTIME = f"{HYDRA_DIR}/hydra.yaml"        # Hydra's own: the group choices, the overrides
HYDRA_OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"  # the overrides as typed
LOCK_FILE = ".lock"                  # held while a process works in the folder
RESULT_FILE = "result.json"          # the RunRecord
METRICS_FILE = "metrics.csv"         # one row per epoch
CHECKPOINT_FILE = "checkpoint.pt"    # resume state; a few kilobytes once the run completed
BEST_WEIGHTS = "best_model.pth"      # the best epoch's weights (plus a seed-style hard link)
SWA_WEIGHTS = "swa_model.pth"        # the averaged model's weights (swa.start_epoch set)
STEPS_FILE = "steps.csv"             # every step's training loss (log_steps: true)
LANDSCAPE_FILE = "landscape.csv"     # the loss-landscape probe's rows (probe: landscape)
TENSORBOARD_DIR = "tensorboard"      # event files (logger: tensorboard)
# The per-run tables analysis stacks, by the frame name it gives them.
CSV_FILES = {"metrics": METRICS_FILE, "steps": STEPS_FILE, "landscape": LANDSCAPE_FILE}
SWEEP_FILE = "multirun.yaml"         # in a sweep folder (the run folders' parent), by Hydra
# Keys that say where or how a run executes, not what it computes. They are recorded but kept
# out of a run's identity: re-running a finished sweep with more threads or another launcher is
# the same experiment (thread counts change CPU float rounding, which is noise, not a setting).
OPERATIONAL_KEYS = ("device", "threads", "cuda_memory_fraction", "compile", "save_weights",
                    "log_steps", "logger", "data.download")


def operational(key: str) -> bool:
    """Whether a dotted key is, or lies under, one of OPERATIONAL_KEYS (logger.mlflow.experiment)."""
    return any(key == k or key.startswith(f"{k}.") for k in OPERATIONAL_KEYS)


def settings(config: dict) -> dict:
    """A resolved run config without its operational keys (and without Hydra's own node)."""
    kept = copy.deepcopy({k: v for k, v in config.items() if k != "hydra"})
    for key in OPERATIONAL_KEYS:
        *parents, last = key.split(".")
        node = kept
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return kept


def identity(config: dict) -> str:
    """A short hash of a resolved run config's result-affecting settings (seed included)."""
    return hashlib.sha256(json.dumps(settings(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_identity(config: dict, data_fingerprint: str | None = None) -> str:
    """identity() without the seed: runs that share it are seeds of one experiment, the only runs
    a table may pool (analysis/tables.py). With the fingerprint of the images the run used, the
    data counts by content, not by where it lives: `data.root` is left out."""
    kept = {k: v for k, v in config.items() if k != "seed"}
    if data_fingerprint:
        kept["data"] = {k: v for k, v in (kept.get("data") or {}).items() if k != "root"}
        kept["data_fingerprint"] = data_fingerprint
    return identity(kept)


def differences(stored: dict, current: dict) -> list[str]:
    """The result-affecting settings in which two resolved configs differ: 'key: stored -> current'."""
    a, b = _flat(settings(stored)), _flat(settings(current))
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
            for k in sorted(a.keys() | b.keys()) if k not in a or k not in b or a[k] != b[k]]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                  "val_loss", "val_acc", "lr", "seconds")

@dataclass
class RunRecord:
    """Everything analysis needs to know about one run."""

    status: str = "running"  # -> completed | diverged | failed | interrupted
    choices: dict[str, str] = field(default_factory=dict)   # hydra.runtime.choices, e.g. loss: ce
    overrides: list[str] = field(default_factory=list)      # what the user typed, e.g. loss=ce
    seed: int = 0
    epochs: int = 0                  # configured
    epochs_run: int = 0              # completed epochs
    final_test_acc: float | None = None
    best_test_acc: float | None = None
    best_epoch: int | None = None    # epoch of best_test_acc (1-based)
    best_val_acc: float | None = None
    best_val_epoch: int | None = None
    test_acc_at_best_val: float | None = None
    final_train_loss: float | None = None
    wall_seconds: float = 0.0
    images_per_second: float | None = None  # training images per second of training time
    params: int = 0
    data_source: str = ""
    train_images: int = 0
    val_images: int = 0
    test_images: int = 0
    scale: float = 1.0               # the epochs multiplier of a quick look (1.0 = as configured)
    weights_file: str | None = None  # best weights under the seed report's naming
    device: str = ""
    precision: str = ""              # what the run computes in: fp32 | bf16 | fp16 (auto resolved)
    torch_version: str = ""
    git_commit: str | None = None
    threads: int | None = None       # CPU threads used (recorded, not part of the identity)
    cpu: str = ""                    # the CPU model: CPU speed and precision=auto depend on it
    config_hash: str = ""            # identity() of the resolved config: the folder's one config
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # study-specific numbers (e.g. SWA accuracy)
    # What the run is, written once by the run itself; analysis reads these and nothing else.
    row_identity: str = ""           # row_identity(config, data_fingerprint): the runs a table pools
    data_fingerprint: str = ""       # sha256 of the images and labels the run used (ImageData.fingerprint)
    sweep: dict[str, Any] = field(default_factory=dict)  # kind (single|grid|optuna|...), dir, job, study, launcher
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, as trained

    # (wall_seconds of the earlier starts, perf_counter() at this one) while this start's time counts;
    # not a field, so never saved.
    _clock: ClassVar[tuple[float, float] | None] = None

    def start_clock(self) -> None:
        """Count this start's wall time on top of the earlier starts' (wall_seconds so far). Every
        save writes the total, so a process killed outright, with no `finally` run, keeps its time
        up to its last save: each epoch's."""
        self._clock = (self.wall_seconds, time.perf_counter())

    def stop_clock(self) -> None:
        """Stop counting (a fused member that diverged and left its group); wall_seconds stays."""
        self._tick()
        self._clock = None

    def _tick(self) -> None:
        if self._clock is not None:
            self.wall_seconds = self._clock[0] + time.perf_counter() - self._clock[1]

    def save(self, run_dir: Path) -> None:
        self._tick()
        write_atomic(Path(run_dir) / RESULT_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "RunRecord":
        return from_fields(cls, json.loads((Path(run_dir) / RESULT_FILE).read_text()))


def from_fields(cls, data: dict):
    """The dataclass `cls` from `data`, without the keys it does not have: a record or checkpoint
    written by a newer version (one more field) still loads."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


class WriteError(OSError):
    """A run's file could not be written (disk full, read-only folder); the old file is intact."""

    def __str__(self) -> str:
        return self.strerror  # "cannot write <path>: <reason>", without OSError's [Errno N]


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary path beside `path` to write; on success it is renamed over `path`, so
    readers never see half a file. On any failure it is removed and `path` is left as it was;
    an OSError (disk full, read-only folder) becomes a one-line WriteError naming `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        # torch.save's zip writer meets an OSError and then fails again closing the archive
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        raise WriteError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from None
    finally:
        tmp.unlink(missing_ok=True)  # already gone after a successful rename


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (see `replacing`)."""
    with replacing(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename, so a power cut leaves old or new


def plain_number(value):
    """`value` as a number metrics.csv can hold: an int or float as it is, a numpy scalar or a
    one-element tensor or array as its Python number, None (no value) as None. ValueError,
    saying what it is, for anything else (text, several numbers) and for NaN or infinity."""
    if value is None or type(value) in (int, float):
        number = value
    else:
        size = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
        if size != 1 or not callable(getattr(value, "item", None)) or isinstance(value, (str, bytes)):
            shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
            raise ValueError(f"a {type(value).__name__}{shape} ({str(value)[:40]!r})")
        number = value.item()
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"a {type(value).__name__} holding {number!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"the non-finite number {number}")
    return number


def write_metrics(rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Write the per-epoch rows as metrics.csv: the standard columns, then every column a
    callback added (e.g. grad_norm) in the order they first appear, from whichever epoch on."""
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in METRIC_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*METRIC_COLUMNS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(run_dir) / METRICS_FILE, buf.getvalue())
