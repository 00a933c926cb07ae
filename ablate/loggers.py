"""Live views of a run (conf/logger/): TensorBoard event files, MLflow runs, W&B runs.

metrics.csv and result.json are written whatever the logger (ablate.loop.Metrics); a logger only
adds a view, and is operational (not part of a run's identity). `logger=[tensorboard,mlflow]`
turns on several: each option nests under its own key (cfg.logger.mlflow), and build_loggers
makes one callback per key, for a run alone and for every member of a fused group.

A tracker (MLflow, W&B) is checked when it is built, before training: a missing package or an
unreachable store is one line. Once the run trains, a tracker that fails stops logging and says
so in the record (extra.tracker_<name>); the run itself goes on.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import numbers
import os
import re
import shutil
import time
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ablate.loop import Callback, Loop
from ablate.record import (HYDRA_DIR, METRICS_FILE, OPERATIONAL_KEYS, RESULT_FILE, TENSORBOARD_DIR,
                           RunRecord, settings)
from ablate.validation import ConfigError

log = logging.getLogger(__name__)
# The record's final numbers shown beside the hyperparameters (TensorBoard's HParams view) or as
# a tracker run's summary.
FINAL_METRICS = ("final_test_acc", "best_test_acc", "best_val_acc", "test_acc_at_best_val",
                 "final_train_loss")


def extra(name: str) -> str:
    return f'pip install -e ".[{name}]"'


def first_line(err: BaseException) -> str:
    """An error's message in one line (a tracker's may carry a server's whole reply)."""
    return next(iter(str(err).strip().splitlines()), "")


def build_loggers(cfg: DictConfig) -> dict[str, Callback]:
    """One callback per option of cfg.logger (`logger=[tensorboard,mlflow]`), keyed
    logger.<option>: the key names its state (a tracker's run id) in the checkpoint."""
    loggers = {}
    for key in cfg.get("logger") or {}:
        try:
            loggers[f"logger.{key}"] = instantiate(cfg.logger[key])
        except InstantiationException as err:  # the constructor's own one-line message
            if isinstance(err.__cause__, ConfigError):
                raise err.__cause__ from None
            raise ConfigError(f"logger.{key}: {err.__cause__ or err}") from None
    return loggers


def tag(column: str) -> str:
    """metrics.csv's column as a TensorBoard tag: train_loss -> train/loss, so splits group."""
    split, _, metric = column.partition("_")
    return f"{split}/{metric}" if split in ("train", "val", "test") and metric else column


def curves(row: dict) -> dict[str, float]:
    """The numbers of a metrics.csv row that are drawn against the epoch (val_* are None
    without a validation split)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("epoch", "seconds") and isinstance(v, numbers.Real)}


def final_numbers(record: RunRecord) -> dict[str, float]:
    """The record's accuracies so far and its numeric extras (e.g. swa_test_acc)."""
    final = {k: getattr(record, k) for k in FINAL_METRICS if getattr(record, k) is not None}
    final.update({k: v for k, v in record.extra.items()
                  if isinstance(v, numbers.Real) and not isinstance(v, bool)})
    return final


def described(record: RunRecord) -> dict:
    """What a tracker shows as the run's settings: the resolved config as trained, without its
    operational keys (the identity's settings, seed included), plus the group choices by name
    (loss: focal) and the overrides as typed."""
    return {**settings(record.config), "choices": dict(record.choices),
            "overrides": " ".join(record.overrides)}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty one (no choices) adds nothing
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sweep_name(record: RunRecord, run_dir: Path) -> str:
    """The sweep's folder (multirun/loss: under the working directory, as typed); for a run
    alone, the folder holding its folder (outputs/2026-12-06)."""
    folder = Path(record.sweep.get("dir") or run_dir.resolve().parent).resolve()
    if folder.is_relative_to(Path.cwd()) and folder != Path.cwd():
        return str(folder.relative_to(Path.cwd()))
    return str(folder)


def row_name(record: RunRecord, limit: int = 128) -> str:
    """The run's row in the words typed: its overrides without the seed and the operational keys
    (what its seeds share), at most `limit` characters (a cut one ends in a hash of the whole)."""
    kept = [o for o in record.overrides
            if o.lstrip("+~").split("=", 1)[0] not in ("seed", *OPERATIONAL_KEYS)
            and not o.lstrip("+~").startswith("logger.")]
    name = " ".join(kept) or "defaults"
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


class TensorBoard(Callback):
    """Every epoch's losses, accuracies and learning rate (and any column other callbacks add),
    then the run's hyperparameters with its final metrics, into the run folder's TENSORBOARD_DIR."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"logger=tensorboard needs TensorBoard: {extra('tensorboard')}") from None
        self.make_writer = SummaryWriter
        self.writer = None

    def on_fit_start(self, loop: Loop) -> None:
        # A resumed run drops what it logged past its checkpoint, so an epoch is never shown twice.
        self.writer = self.make_writer(str(loop.run_dir / TENSORBOARD_DIR), purge_step=loop.state.epoch + 1)

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        for column, value in curves(row).items():
            self.writer.add_scalar(tag(column), value, row["epoch"])
        self.writer.flush()  # live: TensorBoard sees each epoch as it ends

    def on_fit_end(self, loop: Loop) -> None:
        record = loop.record
        params = {**record.choices, "seed": record.seed, "epochs": record.epochs,
                  **dict(o.lstrip("+~").split("=", 1) for o in record.overrides if "=" in o)}
        metrics = {f"hparams/{k}": v for k, v in final_numbers(record).items()}
        # run_name="." keeps them in this run's folder (torch would make a timestamped subfolder)
        self.writer.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                 for k, v in params.items()}, metrics, run_name=".")
        self.writer.close()


class Tracker(Callback):
    """A run in an experiment tracker, kept by its id: created at the run's start, continued
    when the run resumes (the id is in the checkpoint), ended with the record's status.

    Subclasses open, log_epoch and close; every call goes through `guarded`, so a tracker that
    fails mid-run stops with a warning and a note in the record, never failing the run."""

    name = ""  # the option's name, e.g. mlflow

    def __init__(self):
        self.run_id: str | None = None
        self.record: RunRecord | None = None
        self.run_dir: Path | None = None
        self.active = False  # a tracker run is open and logging
        self.logged = 0  # the last epoch the tracker holds

    @contextlib.contextmanager
    def guarded(self, doing: str):
        try:
            yield
        except Exception as err:
            reason = f"{doing}: {type(err).__name__}: {first_line(err)}"
            log.warning("%s: %s stopped logging (%s); the run goes on", self.run_dir, self.name, reason)
            self.active = False
            if self.record is not None:
                self.record.extra[f"tracker_{self.name}"] = f"stopped: {reason}"

    def on_fit_start(self, loop: Loop) -> None:
        self.record, self.run_dir = loop.record, loop.run_dir
        self.logged = loop.state.epoch  # what the checkpoint holds was logged before it was saved
        with self.guarded("starting its run"):
            self.open(resumed=self.run_id is not None)
            self.active = True
        if self.active:
            # A process that exits without on_run_end (its entry point does not call it) still
            # ends the tracker's run, with the record's status as it stands then.
            atexit.register(self.on_run_end, loop.record)

    def on_epoch_end(self, loop: Loop, row: dict) -> None:
        if self.active and row["epoch"] > self.logged:  # bit for bit the same epoch: logged once
            with self.guarded(f"logging epoch {row['epoch']}"):
                self.log_epoch(row["epoch"], curves(row))
                self.logged = row["epoch"]

    def on_run_end(self, record: RunRecord) -> None:
        atexit.unregister(self.on_run_end)
        if not self.active:
            return
        closed = False
        with self.guarded(f"ending its run as {record.status}"):
            self.close(record)
            closed = True
        self.active = False
        if not closed:  # the record was saved before this hook: save the note with it
            with contextlib.suppress(Exception):
                record.save(self.run_dir)

    def state_dict(self) -> dict | None:
        return {"run_id": self.run_id} if self.run_id else None

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")

    def open(self, resumed: bool) -> None:
        raise NotImplementedError

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, record: RunRecord) -> None:
        raise NotImplementedError


# MLflow's run status for the record's: a diverged run failed, an interrupted one was killed.
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED",
                 "interrupted": "KILLED", "running": "KILLED"}


@contextlib.contextmanager
def env_set(**values: str):
    """os.environ with `values` set for the block (MLflow reads its HTTP settings from it)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MLflow(Tracker):
    """Each run an MLflow run in the sweep's experiment: settings as params, each epoch's
    metrics.csv numbers with the epoch as step, final numbers, status, and its small files."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 artifacts: bool = True):
        super().__init__()
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(f"logger=mlflow needs MLflow: {extra('mlflow')}") from None
        self.uri = tracking_uri or mlflow.get_tracking_uri()  # $MLFLOW_TRACKING_URI or MLflow's default
        self.experiment, self.artifacts = experiment, artifacts
        self.client = MlflowClient(self.uri)
        try:  # one quick request, without MLflow's minutes of retries: a dead server says so now
            with env_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
                self.client.search_experiments(max_results=1)
        except Exception as err:
            raise ConfigError(f"logger=mlflow cannot use the tracking store {self.uri}: "
                              f"{first_line(err) or type(err).__name__}") from None

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def open(self, resumed: bool) -> None:
        from mlflow.entities import Param

        if resumed:
            self.client.get_run(self.run_id)  # still there (raises when it is not)
            self.client.update_run(self.run_id, status="RUNNING")
            # an epoch logged after the last checkpoint is trained again bit for bit: skip it
            steps = [m.step for m in self.client.get_metric_history(self.run_id, "train_loss")]
            self.logged = max([self.logged, *steps])
            return
        record = self.record
        name = self.experiment or sweep_name(record, self.run_dir)
        run = self.client.create_run(self.experiment_id(name), run_name=self.run_dir.name, tags={
            "ablate.run_dir": str(self.run_dir.resolve()), "ablate.config_hash": record.config_hash,
            "ablate.row": row_name(record), "ablate.status": record.status})
        self.run_id = run.info.run_id
        # MLflow stores a param's value up to 6000 characters (a long list of overrides is cut)
        params = [Param(k, str(v)[:6000]) for k, v in flatten(described(record)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def close(self, record: RunRecord) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, record.epochs_run)
                                                    for k, v in final_numbers(record).items()],
                              tags=[RunTag("ablate.status", record.status)]
                              + ([RunTag("ablate.error", record.error[:5000])] if record.error else []))
        if self.artifacts:
            for file in (RESULT_FILE, METRICS_FILE):
                if (self.run_dir / file).exists():
                    self.client.log_artifact(self.run_id, str(self.run_dir / file))
            if (self.run_dir / HYDRA_DIR).is_dir():
                self.client.log_artifacts(self.run_id, str(self.run_dir / HYDRA_DIR), HYDRA_DIR)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(record.status, "FAILED"))


# W&B forbids these in project names.
WANDB_UNSAFE = re.compile(r"[/\\#?%:]+")


class WandB(Tracker):
    """Each run a W&B run: project the sweep, group its row (so W&B pools its seeds), settings as
    config, each epoch's numbers with the epoch as step, final numbers as summary, small files."""

    name = "wandb"
    MODES = ("online", "offline", "disabled")

    def __init__(self, project: str | None = None, entity: str | None = None, group: str | None = None,
                 mode: str | None = None):
        super().__init__()
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"logger=wandb needs wandb: {extra('wandb')}") from None
        self.wandb, self.run = wandb, None
        self.project, self.entity, self.group = project, entity, group
        self.mode = mode or os.environ.get("WANDB_MODE") or "online"
        if self.mode not in self.MODES:
            raise ConfigError(f"logger.wandb.mode={self.mode!r}: use one of {', '.join(self.MODES)}")
        if self.mode == "online" and not wandb.login(verify=False, prompt=False):
            raise ConfigError("logger=wandb is not logged in: run `wandb login` (or set "
                              "WANDB_API_KEY), or train offline with WANDB_MODE=offline and "
                              "`wandb sync` later")

    def open(self, resumed: bool) -> None:
        record = self.record
        project = self.project or WANDB_UNSAFE.sub("-", sweep_name(record, self.run_dir)).strip("-.")
        self.run = self.wandb.init(
            project=project[:128], entity=self.entity, group=self.group or row_name(record),
            name=self.run_dir.name, id=self.run_id, resume="allow", dir=str(self.run_dir),
            config=described(record), mode=self.mode,
            reinit="create_new",  # a fused group's members are runs of one process, all open at once
            settings=self.wandb.Settings(console="off", silent=True))  # the job's .log has the console
        self.run_id = self.run.id

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.run.log({tag(k): v for k, v in values.items()}, step=epoch)

    def close(self, record: RunRecord) -> None:
        self.run.summary.update({**final_numbers(record), "status": record.status})
        # W&B uploads what its run's folder holds when the run finishes. Copied, not run.save()d:
        # save() reads a path as a glob, and a sweep job's folder (model.filters=[8,16,32]) is one.
        files = Path(self.run.dir)
        for file in (RESULT_FILE, METRICS_FILE):
            if (self.run_dir / file).exists():
                shutil.copy2(self.run_dir / file, files / file)
        if (self.run_dir / HYDRA_DIR).is_dir():
            shutil.copytree(self.run_dir / HYDRA_DIR, files / HYDRA_DIR, dirs_exist_ok=True)
        self.run.finish(exit_code=0 if record.status == "completed" else 1)
