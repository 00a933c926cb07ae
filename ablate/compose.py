"""A run put together from its config: device and precision, data, model, loss, optimizer,
schedule, callbacks and the run's record; then trained (or resumed, or skipped when done).

Used by the entry point (ablate/train.py) for a run alone and by ablate/fused.py for the members
of a fused group, so both build, record and finish a run the same way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ablate.checkpoint import link_seed_name, load_checkpoint, peek_checkpoint, save_finished
from ablate.data import DataError, ImageData
from ablate.loggers import build_loggers
from ablate.loop import (Alone, Callback, FitState, Loop, Metrics, Recipe, Schedule, fit,
                         pick_precision, resolve_precision)
from ablate.record import (METRICS_FILE, RESULT_FILE, RunRecord, WriteError, from_fields, identity,
                           row_identity, write_metrics)
from ablate.savers import BestWeights, Checkpoint, StepLosses
from ablate.validation import ConfigError, dry_run, out_of_memory, validate

log = logging.getLogger("ablate")
REPO = Path(__file__).resolve().parent.parent


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; the last finished epoch is checkpointed. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way out swallows it."""


def raise_interrupted(signum, frame):
    # The first signal stops the run; later ones (a double Ctrl-C) are ignored, so that they
    # cannot cut short the record being saved on the way out and leave it saying running.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- where it runs

def cpu_name() -> str:
    """This machine's CPU model (/proc/cpuinfo), which sets a CPU run's speed and precision."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def spread_device(job_num: int | None, gpu_count: int) -> torch.device:
    """The device of a sweep's job `job_num`: jobs take the GPUs in turn; cpu when there are none."""
    if gpu_count == 0:
        return torch.device("cpu")
    return torch.device("cuda" if job_num is None else f"cuda:{job_num % gpu_count}")


def pick_device(name: str, job_num: int | None = None) -> torch.device:
    if name == "auto":
        return spread_device(job_num, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:  # device=gpu: torch's own words, in one line
        raise ConfigError(f"device={name!r} is not a device ({str(err).splitlines()[0]}); "
                          "use auto, cpu, cuda or cuda:N") from None


def settle_precision(cfg: DictConfig, job_num: int | None = None) -> None:
    """Write what precision=auto means on this machine into cfg (bf16, fp16 or fp32), before the
    folder is accepted: its identity, .hydra/config.yaml and the tables then name the precision
    the run computes in, and a bf16 run is never resumed or pooled as an fp32 one."""
    if cfg.get("precision") != "auto":
        return
    try:
        device = pick_device(cfg.device, job_num)
    except ConfigError:
        return  # run() reports it
    with read_write(cfg), open_dict(cfg):
        cfg.precision = resolve_precision("auto", device)


def set_up(cfg: DictConfig, device: torch.device) -> None:
    """This process's threads and `device`'s settings for the run."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)  # N concurrent jobs must not each take every core
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        if device.index is not None:
            torch.cuda.set_device(device)  # keep this job's context and cuDNN handles off other GPUs
        if cfg.get("cuda_memory_fraction"):  # of the current device; a job outgrowing it fails alone
            torch.cuda.set_per_process_memory_fraction(float(cfg.cuda_memory_fraction))


def build(cfg: DictConfig, key: str, *args, **kwargs):
    """instantiate cfg[key] (calling a _partial_ one with args); a constructor's complaint about a
    value (or a size it cannot allocate) becomes a one-line ConfigError naming the key instead of
    Hydra's wrapped traceback."""
    try:
        obj = instantiate(cfg[key])
        return obj(*args, **kwargs) if args or kwargs else obj
    except Exception as err:
        # instantiate wraps a constructor's error; a _partial_ object raises its own when called
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if isinstance(cause, DataError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{key}: {cause}") from None
        if out_of_memory(cause):
            raise ConfigError(f"{key}: too big for this machine ({cause})") from None
        raise


# ----------------------------------------------------------------------------- the record

@dataclass
class Job:
    """One run to train: its composed config (without `hydra`), its folder, and what Hydra says
    it is (group choices, overrides as typed, its sweep)."""

    cfg: DictConfig
    run_dir: Path
    choices: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    job_num: int | None = None
    sweep: dict = field(default_factory=dict)

    @classmethod
    def from_hydra(cls, cfg: DictConfig, hc, multirun: bool) -> Job:
        """The job Hydra's runtime config `hc` describes (HydraConfig.get())."""
        runtime = OmegaConf.to_container(hc.runtime.choices)
        choices = {k: v for k, v in runtime.items()
                   if not k.startswith("hydra") and k != "logger" and v is not None}
        sweep = {"kind": "single"}
        if multirun:
            sweeper = runtime.get("hydra/sweeper") or "basic"
            sweep = {"kind": "grid" if sweeper == "basic" else sweeper, "dir": str(hc.sweep.dir),
                     "job": hc.job.num, "launcher": runtime.get("hydra/launcher") or "basic"}
            if sweeper == "optuna":
                sweep["study"] = hc.sweeper.get("study_name")
        return cls(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task),
                   hc.job.num if multirun else None, sweep)


def start_record(job: Job, device: torch.device, precision: str) -> RunRecord:
    """The record of `job` as it starts: what it is (its resolved config, resolved once, here),
    where it runs; its clock runs on from the wall time of earlier attempts."""
    config = OmegaConf.to_container(job.cfg, resolve=True)
    previous = read_record(job.run_dir)
    record = RunRecord(choices=job.choices, overrides=job.overrides, seed=job.cfg.seed,
                     epochs=job.cfg.epochs, device=str(device), precision=precision,
                     torch_version=str(torch.__version__), git_commit=git_commit(), cpu=cpu_name(),
                     threads=torch.get_num_threads(), config_hash=identity(config),
                     wall_seconds=previous.wall_seconds if previous else 0.0,
                     sweep=job.sweep, config=config,
                     data_fingerprint=previous.data_fingerprint if previous else "")
    record.start_clock()
    return record


def describe_data(record: RunRecord, data: ImageData, fingerprint: str, params: int) -> None:
    """The record's data (by content: rows pool runs on the same images wherever they live) and
    model size; a resumed run whose images changed is refused."""
    if record.data_fingerprint and record.data_fingerprint != fingerprint:
        raise DataError(f"the images differ from those this run started on (data fingerprint "
                        f"{fingerprint[:12]} vs {record.data_fingerprint[:12]}, data.root="
                        f"{record.config.get('data', {}).get('root')}): point data.root at the "
                        "same images, or start over in another folder")
    record.data_fingerprint = fingerprint
    record.row_identity = row_identity(record.config, fingerprint)
    record.params, record.scale, record.data_source = params, record.config.get("scale", 1.0), data.source
    record.train_images, record.val_images, record.test_images = \
        len(data.train_y), len(data.val_y), len(data.test_y)


def splits_text(data: ImageData) -> str:
    """'1000 train / 500 val / 200 test images from <source>' (val only when held out)."""
    val = f" / {len(data.val_y)} val" if len(data.val_y) else ""
    return f"{len(data.train_y)} train{val} / {len(data.test_y)} test images from {data.source}"


def read_record(run_dir: Path) -> RunRecord | None:
    """run_dir's result.json, or None when there is none or it is damaged."""
    if not (run_dir / RESULT_FILE).exists():
        return None
    try:
        return RunRecord.load(run_dir)
    except (ValueError, TypeError) as err:
        log.warning("ignoring unreadable %s/%s (%s)", run_dir, RESULT_FILE, err)
        return None


def finished_record(run_dir: Path) -> RunRecord | None:
    """The record of a run whose training is already done, or None.

    A completed record is taken as it is. When the record is lost, damaged or still says
    running (a crash after completion), the small checkpoint a completed run leaves holds
    the finished record and per-epoch rows: both are written back, nothing is trained.
    """
    previous = read_record(run_dir)
    if previous is not None and previous.status == "completed":
        return previous
    ckpt = peek_checkpoint(run_dir)
    if ckpt is None or "finished_record" not in ckpt:
        return None
    record = from_fields(RunRecord, json.loads(ckpt["finished_record"]))
    record.save(run_dir)
    write_metrics(ckpt["state"]["rows"], run_dir)
    log.info("%s: training was already done; rebuilt %s and %s from its checkpoint", run_dir,
             RESULT_FILE, METRICS_FILE)
    return record


def finished_twin(run_dir: Path, cfg: DictConfig) -> Path | None:
    """Another folder of run_dir's sweep where this very config (its identity) completed: a sweep
    re-run with a new key (seed=0,1 after no seed) names the same job's folder otherwise."""
    if finished_record(run_dir) is not None:
        return None
    digest = identity(OmegaConf.to_container(cfg, resolve=True))
    for other in sorted(run_dir.parent.iterdir()):
        path = other / RESULT_FILE
        if other == run_dir or not path.is_file():
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            record = json.loads(path.read_text())
            if record.get("config_hash") == digest and record.get("status") == "completed":
                return other
    return None


def record_failure(job: Job, err: BaseException) -> None:
    """Leave a failed record for analysis when the run died before writing its own."""
    if not (job.run_dir / RESULT_FILE).exists():
        with contextlib.suppress(WriteError):  # the error that brought us here says it already
            RunRecord(status="failed", choices=job.choices, overrides=job.overrides, sweep=job.sweep,
                      seed=job.cfg.get("seed", 0), error=f"{type(err).__name__}: {err}").save(job.run_dir)


# ----------------------------------------------------------------------------- a run alone

def saved_epoch(run_dir: Path) -> int:
    """The last finished epoch run_dir's checkpoint holds (0 when there is none)."""
    ckpt = peek_checkpoint(run_dir)
    return ckpt["state"]["epoch"] if ckpt is not None and "state" in ckpt else 0


def resume_advice(run_dir: Path) -> str:
    """What re-running an interrupted run does, from what its checkpoint holds."""
    epoch = saved_epoch(run_dir)
    if epoch == 0:
        return "no epoch had finished, so there is nothing to resume: re-run to start it"
    return f"epoch {epoch} is saved: re-run the same command to resume"


def run(cfg: DictConfig, run_dir: Path, choices: dict | None = None, overrides: list | None = None,
        job_num: int | None = None, sweep: dict | None = None) -> RunRecord:
    """Build everything from the config, train (or resume, or skip if done), and write the record.

    run_dir must be this config's (ablate.folder.accept says so) and held (ablate.folder.locked).
    """
    run_dir = Path(run_dir)
    job = Job(cfg, run_dir, choices or {}, list(overrides or ()), job_num, sweep or {"kind": "single"})
    validate(cfg)
    done = finished_record(run_dir)
    if done is not None:
        log.info("%s is already completed (test acc %.4f); skipping", run_dir, done.final_test_acc)
        return done
    device = pick_device(cfg.device, job.job_num)
    set_up(cfg, device)
    record = start_record(job, device, pick_precision(cfg.precision, device).name)
    state = parts = None
    try:
        parts = build_run(cfg, run_dir, device, record)
        state = train(cfg, parts, record, run_dir)
    except Interrupted as err:
        record.status, record.error = "interrupted", f"stopped by {err}; {resume_advice(run_dir)}"
        raise
    except Exception as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        if out_of_memory(err) and not isinstance(err, ConfigError):  # e.g. a batch too big for the GPU
            raise ConfigError(f"out of memory on {device} (lower batch_size or the model's "
                              f"size): {str(err).splitlines()[0]}") from None
        raise
    finally:
        record.save(run_dir)
        for callback in parts.callbacks.values() if parts else ():
            callback.on_run_end(record)  # trackers end their runs with the record's final status
    if record.status == "completed":  # only now, with the completed record safely on disk
        save_finished(run_dir, identity=record.config_hash, state=state, record=record)
    return record


@dataclass
class Parts:
    """What build_run makes from the config."""

    model: torch.nn.Module
    data: ImageData
    recipe: Recipe
    scheduler: object
    callbacks: dict[str, Callback]


def build_data(cfg: DictConfig, device: torch.device) -> tuple[ImageData, str]:
    """The run's images on `device`, and their fingerprint (taken where they were read)."""
    data = build(cfg, "data")
    return data.to(device), data.fingerprint()


def build_run(cfg: DictConfig, run_dir: Path, device: torch.device, record: RunRecord) -> Parts:
    """Data, model, loss, optimizer, scheduler and the loop's callbacks, checked by a dry run."""
    torch.manual_seed(cfg.seed)
    data, fingerprint = build_data(cfg, device)
    model = build(cfg, "model").to(device)
    precision = pick_precision(cfg.precision, device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):
        model.compile()  # in place, so state_dict keys (checkpoints, best weights) do not change
    loss_fn = build(cfg, "loss").to(device)
    optimizer = build(cfg, "optim", model.parameters())
    scheduler = build(cfg, "sched", optimizer)
    dry_run(cfg, model, loss_fn, data)
    describe_data(record, data, fingerprint, sum(p.numel() for p in model.parameters()))
    log.info("%s | %s | %d params | %s | %s, %s%s", run_dir, describe(record), record.params,
             splits_text(data), device, precision.name, ", channels_last" if precision.channels_last else "")
    recipe = Recipe(loss_fn, optimizer, cfg.batch_size, cfg.l1_lambda, cfg.grad_clip, precision)
    return Parts(model, data, recipe, scheduler,
                 build_callbacks(cfg, run_dir, model, recipe, Schedule(scheduler)))


def describe(record: RunRecord) -> str:
    """What the run is, in the words typed: its overrides (seed last), else its group choices."""
    typed = [o for o in record.overrides if not o.startswith("seed=")]
    return " ".join(typed or [f"{k}={v}" for k, v in record.choices.items()]) + f" seed={record.seed}"


def build_callbacks(cfg: DictConfig, run_dir: Path, model, recipe: Recipe,
                    schedule: Schedule) -> dict[str, Callback]:
    """A run's callbacks in the order they run; their keys name their state in the checkpoint.
    The members of a fused group share `schedule` (and have no `model`: SWA and the probe,
    which need one, never fuse)."""
    callbacks: dict[str, Callback] = {"scheduler": schedule}
    if cfg.get("swa") and cfg.swa.start_epoch is not None:
        # SWALR takes over from the run's scheduler; built after channels_last so its copy matches.
        callbacks = {"swa": build(cfg, "swa", model, recipe.optimizer, schedule=callbacks["scheduler"],
                                  save_weights=cfg.save_weights)}
    if cfg.save_weights:
        callbacks["best_weights"] = BestWeights()
    if cfg.log_steps:
        callbacks["steps"] = StepLosses()
    if cfg.get("probe"):  # see conf/probe/
        callbacks["probe"] = build(cfg, "probe", model=model, loss_fn=recipe.loss_fn,
                                   optimizer=recipe.optimizer, run_dir=run_dir)
    for key in cfg.get("callbacks") or {}:  # see conf/callbacks/; validate checked their names
        callbacks[key] = build(cfg.callbacks, key)
    # see conf/logger/ (logger=[tensorboard,mlflow]); after the callbacks, so they show their columns
    callbacks.update(build_loggers(cfg))
    callbacks["metrics"] = Metrics()  # after SWA's and the loggers' entries in the record
    callbacks["checkpoint"] = Checkpoint()  # last: it saves what all the others did
    return callbacks


def train(cfg: DictConfig, parts: Parts, record: RunRecord, run_dir: Path) -> FitState | None:
    """Run the loop (resuming from run_dir's checkpoint); the record says completed at the end,
    or diverged (then None is returned)."""
    loop = Loop(parts.model, parts.data, parts.recipe, run_dir, record, parts.callbacks,
                torch.Generator(device=parts.data.train_x.device).manual_seed(cfg.seed))
    if not fit(Alone(parts.model, parts.recipe), [loop], epochs=cfg.epochs,
               resumes=[load_checkpoint(run_dir)]):
        return None  # diverged: the record says why
    record.status = "completed"
    if cfg.save_weights:
        record.weights_file = link_seed_name(run_dir, parts.model, parts.recipe.loss_fn,
                                             parts.recipe.optimizer, parts.scheduler,
                                             record.test_acc_at_best_val or record.best_test_acc)
    return loop.state
