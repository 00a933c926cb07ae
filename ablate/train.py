"""Train one configuration: `python ablate/train.py [-m] group=option key=value ...`.

The Hydra entry point: it holds and accepts the job's folder, writes .hydra/, and hands the job
to ablate.compose, which builds, trains and records it."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablate.callbacks import JobOutcome
from ablate.compose import (REPO, Interrupted, Job, finished_record, finished_twin, pick_device,
                            raise_interrupted, read_record, record_failure, resume_advice, run,
                            settle_precision)
from ablate.data import DataError
from ablate.folder import FolderRefused, accept, locked, logging_to, write_hydra
from ablate.record import WriteError
from ablate.validation import ConfigError, validate

log = logging.getLogger("ablate")


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="config")
def main(cfg: DictConfig) -> JobOutcome:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    if not in_sweep and hc.sweeper.get("params"):  # e.g. +ablation=activation without -m
        _leave_nothing(run_dir)
        sys.exit(f"error: this config is a sweep ({', '.join(hc.sweeper.params)} swept by "
                 f"hydra.sweeper.params); run it with -m: python ablate/train.py -m {' '.join(hc.overrides.task)}")
    handlers = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with locked(run_dir):
            settle_precision(cfg, hc.job.num if in_sweep else None)
            if not in_sweep:  # refused before anything is written (a sweep records the failure)
                _check(cfg, run_dir)
            twin = finished_twin(run_dir, cfg) if in_sweep else None
            if twin is not None:  # this config already ran in the sweep, in a folder named otherwise
                log.info("%s: the same config already completed in %s; skipping", run_dir, twin)
                return JobOutcome.of(read_record(twin), "skipped")
            accept(run_dir, cfg)
            # Only now is anything written: the folder is this run's, and this config's.
            write_hydra(run_dir, cfg, HydraConfig.instance().cfg, hc.overrides.task)
            with logging_to(run_dir / f"{hc.job.name}.log"):
                return _run_job(cfg, hc, run_dir, in_sweep)
    except FolderRefused as err:
        if in_sweep:
            log.error("refused: %s", err)
            return JobOutcome("refused", str(err))
        sys.exit(f"error: {err}")
    except Interrupted as err:  # before the job itself started, e.g. while .hydra/ was written
        log.error("interrupted by %s before the job in %s started; run the same command again",
                  err, run_dir)
        sys.exit(130 if str(err) == "SIGINT" else 143)
    except WriteError as err:  # .hydra/ could not be written: the disk is full or read-only
        if in_sweep:
            log.error("%s", err)
            return JobOutcome("failed", str(err))
        sys.exit(f"error: {err}")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if not any(run_dir.iterdir()) if run_dir.is_dir() else False:
            _leave_nothing(run_dir)  # a refused or skipped job leaves no empty folder


def _check(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run whose config cannot train, in one line, before its folder is written to."""
    try:
        validate(cfg)
        pick_device(cfg.device)
    except ConfigError as err:
        raise FolderRefused(str(err)) from None


def _leave_nothing(run_dir: Path) -> None:
    """Remove the folder Hydra made for a job that wrote nothing into it."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _run_job(cfg: DictConfig, hc, run_dir: Path, in_sweep: bool) -> JobOutcome:
    """run() in an accepted folder; in a sweep every failure is recorded and the sweep goes on."""
    job = Job.from_hydra(cfg, hc, in_sweep)
    try:
        done = finished_record(run_dir)
        if done is not None:
            log.info("%s is already completed (test acc %.4f); skipping", run_dir, done.final_test_acc)
            return JobOutcome.of(done, "skipped")
        return JobOutcome.of(run(cfg, run_dir, job.choices, job.overrides, job.job_num, job.sweep))
    except Interrupted as err:
        log.error("interrupted by %s in %s; %s", err, run_dir, resume_advice(run_dir))
        sys.exit(130 if str(err) == "SIGINT" else 143)
    except (ConfigError, DataError, WriteError) as err:
        record_failure(job, err)
        if in_sweep:
            log.error("%s", err)
            return JobOutcome("failed", str(err))  # the record says failed; the other jobs go on
        sys.exit(f"error: {err}")
    except Exception as err:
        if not in_sweep:
            raise
        log.exception("job in %s failed; continuing with the sweep", run_dir)
        record_failure(job, err)
        return JobOutcome("failed", f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    # Call ablate.train.main, not this file's __main__ copy: the joblib launcher pickles the task
    # function for its worker processes, and cloudpickle can only send a __main__ one by value,
    # which fails on torch's module objects. An importable function is sent by name.
    from ablate.train import main as importable_main
    from ablate.validation import explained_composition_errors

    with explained_composition_errors():  # `epoch=1` (no +): a did-you-mean, not Hydra's bare error
        importable_main()
