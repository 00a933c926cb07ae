"""The Optuna study of a tuning sweep (`hydra/sweeper=optuna`): checked before any trial trains.

A sweep that cannot run is refused in one line (no trials, nothing to score, a damaged study
file, a study another sweep command is using); trials that a killed sweep left RUNNING are marked
failed, so the study never counts a trial as running that nobody runs. The sweep summary
(ablate/callbacks.py) calls `open_study` when a sweep starts.
"""
from __future__ import annotations

import fcntl
import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.folder import FolderRefused, locked

# optuna 2.x (the one hydra-optuna-sweeper accepts) needs SQLAlchemy < 2, which warns once, at
# `import optuna`, that optuna uses APIs 2.0 removed (MovedIn20Warning). The pin is on purpose,
# so the warning tells a user nothing, and `python -W error` makes it an error. The variable must
# be set before SQLAlchemy is imported: the entry point and Hydra import this module (through
# ablate.callbacks) before the sweeper imports optuna, and launcher workers inherit it. The filter
# covers a SQLAlchemy that something imported earlier.
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
warnings.filterwarnings("ignore", message="Deprecated API features detected",
                        category=DeprecationWarning)

log = logging.getLogger("ablate")
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


class StudyRefused(Exception):
    """The tuning sweep cannot run as configured; the message says why and what to do."""


class StudyLock:
    """Held by the sweep command that uses a study file, for as long as it runs: a trial left
    RUNNING in a study nobody holds belongs to a sweep that is gone."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip()
            os.close(self.fd)
            raise StudyRefused(
                f"{path.with_suffix('')} is in use by another sweep command"
                f"{f' (pid {holder})' if holder else ''}; wait for it to end, or tune into "
                "another hydra.sweep.dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self.fd)  # the file stays: removing it could let two commands lock two files


def is_tuning(config: DictConfig) -> bool:
    return config.hydra.sweeper.get("_target_") == OPTUNA_SWEEPER


def sqlite_file(storage) -> Path | None:
    """The file of a `sqlite:///<path>` storage; None for another database or none."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):])
    return None


def open_study(config: DictConfig) -> StudyLock | None:
    """Refuse a tuning sweep that cannot run (StudyRefused), lock its study file and fail the
    trials a killed sweep left running. None when the sweep does not tune."""
    if not is_tuning(config):
        return None
    # alembic, which optuna imports, logs each of its plugins at INFO: seven lines that say nothing
    logging.getLogger("alembic").setLevel(logging.WARNING)
    sweeper = config.hydra.sweeper
    if sweeper.n_trials < 1:
        raise StudyRefused(f"hydra.sweeper.n_trials={sweeper.n_trials}: it is the number of trials "
                           "this command runs, so it must be at least 1")
    if not config.data.get("val_size"):
        raise StudyRefused(
            f"data.val_size={config.data.get('val_size')}: a tuning sweep scores each trial on "
            "images held out of the training set (the test set never chooses), and there are none; "
            "set data.val_size, e.g. data.val_size=5000")
    path = sqlite_file(sweeper.storage)
    if path is None:  # in memory, or a database server: nothing of ours to check or lock
        return None
    study = load_study(config, path)  # before anything is written: a refusal leaves nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = StudyLock(path.with_name(path.name + ".lock"))
    if study is not None:
        try:
            fail_abandoned_trials(study, Path(config.hydra.sweep.dir))
        except BaseException:
            lock.release()
            raise
    return lock


def load_study(config: DictConfig, path: Path):
    """The study the sweep continues; None when there is none yet (the sweeper creates it)."""
    if not path.exists():
        return None
    import optuna

    sweeper = config.hydra.sweeper
    try:
        if sweeper.study_name is None:  # a new study every time: only check the file reads
            optuna.storages.RDBStorage(sweeper.storage)
            return None
        return optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
    except KeyError:  # the file holds no study of that name
        return None
    except Exception as err:  # a damaged file fails in SQLAlchemy, sqlite3 or optuna, variously
        why = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise StudyRefused(f"{path} cannot be read as an Optuna study ({why}); move it aside to "
                           "start a new study, or set hydra.sweeper.storage to another file"
                           ) from None


def fail_abandoned_trials(study, sweep_dir: Path) -> None:
    """Mark failed each RUNNING trial of the study whose run folder nobody holds."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        folder = trial_folder(sweep_dir, trial.params)
        if folder is not None:
            try:
                with locked(folder):
                    pass
            except FolderRefused:  # its run is still going (e.g. a SLURM job whose sweep died)
                log.info("trial %d of study %s is running in %s; leaving it", trial.number,
                         study.study_name, folder)
                continue
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("trial %d of study %s (%s) was left running by a sweep that stopped; marked "
                    "failed%s", trial.number, study.study_name,
                    ", ".join(f"{k}={v}" for k, v in trial.params.items()),
                    f" (its run folder {folder} keeps what it finished)" if folder else "")


def trial_folder(sweep_dir: Path, params: dict) -> Path | None:
    """The run folder whose recorded overrides include the trial's parameters, as the sweeper
    writes them (name=value); None when the trial's run never got as far as recording them."""
    wanted = {f"{name}={value}" for name, value in params.items()}
    if not wanted:
        return None
    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        try:
            recorded = set(OmegaConf.load(overrides))
        except Exception:  # a damaged file names no trial
            continue
        if wanted <= recorded:
            return overrides.parent.parent
    return None
