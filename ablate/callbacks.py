"""Hydra callbacks: a sweep ends with a one-line account of its own jobs."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ablate.record import write_atomic
from ablate.study import StudyLock, StudyRefused, is_tuning, open_study

log = logging.getLogger("ablate")
FAILING = ("failed", "refused", "cancelled")  # outcomes that make a sweep exit 1


class JobOutcome(float):
    """What the task function returns: a job's validation accuracy, for sweepers that tune.

    As a number it is the run's best validation accuracy (NaN without a validation split or
    when the run did not complete), never a test accuracy, so `hydra/sweeper=optuna` selects
    on held-out training data. It also says how the job ended, for SweepSummary: `status` is
    completed | skipped | diverged | failed | refused | cancelled (a launcher's job that ended
    before its run did, e.g. by scancel), `message` the error or the reason (one line).
    """

    def __new__(cls, status: str, message: str = "", final_test_acc: float | None = None,
                val_acc: float | None = None):
        outcome = super().__new__(cls, math.nan if val_acc is None else val_acc)
        outcome.status, outcome.message = status, message
        outcome.final_test_acc, outcome.val_acc = final_test_acc, val_acc
        return outcome

    @classmethod
    def of(cls, record, status: str | None = None) -> JobOutcome:
        """The outcome a RunRecord tells (its own status unless `status` says otherwise)."""
        status = status or record.status
        val = record.best_val_acc if status in ("completed", "skipped") else None
        return cls(status, record.error or "", record.final_test_acc, val)

    def __float__(self) -> float:
        """The score a tuning sweeper reads; a job without one raises, which the Optuna sweeper
        turns into a failed trial (telling Optuna a NaN would end the whole study)."""
        value = super().__float__()
        if math.isnan(value):
            raise ValueError(f"no validation accuracy: the job {self.status}"
                             + (f" ({self.message})" if self.message else ""))
        return value

    def __reduce__(self):  # launchers pickle it back from their workers
        return JobOutcome, (self.status, self.message, self.final_test_acc, self.val_acc)

    def __repr__(self) -> str:
        return f"JobOutcome({self.status!r}, val_acc={self.val_acc})"

    def report(self) -> dict:
        return {"status": self.status, "message": self.message,
                "final_test_acc": self.final_test_acc, "val_acc": self.val_acc}


class SweepSummary(Callback):
    """Count this sweep's jobs by outcome; exit 1 when one failed or was refused, so scripts notice.

    Jobs end in the launcher's worker processes (joblib, submitit), which run a pickled copy of
    this callback: each reports to a file under the sweep folder, in a directory named when this
    sweep started, so records that earlier sweeps left in the folder are never counted.
    A tuning sweep's study is checked first (ablate/study.py): one that cannot run stops here,
    before anything is written.
    """

    reports: Path | None = None
    study: StudyLock | None = None
    running: ClassVar[tuple[SweepSummary, DictConfig] | None] = None  # for sweep_stopped

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self.study = open_study(config)
        except StudyRefused as err:
            sys.exit(f"error: {err}")
        self.reports = Path(config.hydra.sweep.dir) / ".jobs" / f"{os.getpid()}-{time.time_ns()}"
        self.reports.mkdir(parents=True, exist_ok=True)
        SweepSummary.running = (self, config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.reports is None:  # a single run
            return
        try:
            outcome = job_return.return_value  # re-raises what the task raised
        except Exception as err:
            outcome = JobOutcome("failed", f"{type(err).__name__}: {err}")
        if not isinstance(outcome, JobOutcome):  # another app's task (composed from this conf/)
            outcome = JobOutcome("completed", f"the task returned {outcome!r}")
        report = {"folder": Path(config.hydra.runtime.output_dir).name, **outcome.report()}
        write_atomic(self.reports / f"{config.hydra.job.num}.json", json.dumps(report) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.summarize(config):
            sys.exit(1)

    def summarize(self, config: DictConfig) -> bool:
        """Log the count of jobs by outcome and each failure; whether any job failed."""
        SweepSummary.running = None
        if self.study is not None:
            self.study.release()
        sweep = Path(config.hydra.sweep.dir)
        jobs = [json.loads(p.read_text()) for p in sorted(self.reports.glob("*.json"))]
        shutil.rmtree(self.reports)
        with contextlib.suppress(OSError):
            self.reports.parent.rmdir()  # .jobs/, when no other sweep is reporting into it
        counts = Counter(job["status"] for job in jobs)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        log.info("sweep %s: %d job%s: %s; tables: python analysis/make_tables.py --root %s",
                 sweep, len(jobs), "" if len(jobs) == 1 else "s", summary or "none", sweep)
        bad: dict[tuple[str, str], list[str]] = {}  # jobs that failed alike are named in one line
        for job in jobs:
            if job["status"] in FAILING:
                bad.setdefault((job["status"], job["message"]), []).append(job["folder"])
        for (status, message), folders in bad.items():
            names = folders[0] if len(folders) == 1 else f"{len(folders)} jobs ({', '.join(folders)})"
            log.error("%s %s: %s", status, names, message)
        return bool(bad)


def sweep_stopped(err: Exception) -> None:
    """When the sweeper itself raises after jobs ran, Hydra skips on_multirun_end: log the jobs'
    summary all the same. A tuning sweep in which no trial completed (Optuna's best_trial raises
    "Record does not exist.") then ends in one line, exit 1; any other error is the caller's."""
    if SweepSummary.running is None:
        return
    summary, config = SweepSummary.running
    summary.summarize(config)
    if is_tuning(config) and isinstance(err, ValueError) and str(err) == "Record does not exist.":
        name = config.hydra.sweeper.study_name
        sys.exit(f"error: no trial of {f'study {name!r}' if name else 'the study'} completed, so it has "
                 "no best value yet (the lines above say how each run ended); run the same command "
                 "to add trials, after narrowing hydra.sweeper.params if every trial diverged")
