"""Hydra callbacks: a sweep ends with a one-line account of its own jobs."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ablate.record import write_atomic

log = logging.getLogger("ablate")
FAILING = ("failed", "refused")  # outcomes that make a sweep exit 1


@dataclass
class JobOutcome:
    """What the task function returns: completed | skipped | diverged | failed | refused."""

    status: str
    message: str = ""                  # the error or the reason for a refusal, one line
    final_test_acc: float | None = None


class SweepSummary(Callback):
    """Count this sweep's jobs by outcome; exit 1 when one failed or was refused, so scripts notice.

    Jobs end in the launcher's worker processes (joblib, submitit), which run a pickled copy of
    this callback: each reports to a file under the sweep folder, in a directory named when this
    sweep started, so records that earlier sweeps left in the folder are never counted.
    """

    reports: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.reports = Path(config.hydra.sweep.dir) / ".jobs" / f"{os.getpid()}-{time.time_ns()}"
        self.reports.mkdir(parents=True, exist_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.reports is None:  # a single run
            return
        try:
            outcome = job_return.return_value  # re-raises what the task raised
        except Exception as err:
            outcome = JobOutcome("failed", f"{type(err).__name__}: {err}")
        if not isinstance(outcome, JobOutcome):
            outcome = JobOutcome("failed", f"the task returned {outcome!r}")
        report = {"folder": Path(config.hydra.runtime.output_dir).name, **asdict(outcome)}
        write_atomic(self.reports / f"{config.hydra.job.num}.json", json.dumps(report) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = [json.loads(p.read_text()) for p in sorted(self.reports.glob("*.json"))]
        shutil.rmtree(self.reports)
        with contextlib.suppress(OSError):
            self.reports.parent.rmdir()  # .jobs/, when no other sweep is reporting into it
        counts = Counter(job["status"] for job in jobs)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        log.info("sweep %s: %d job%s: %s; tables: python analysis/make_tables.py --root %s",
                 sweep, len(jobs), "" if len(jobs) == 1 else "s", summary or "none", sweep)
        bad = [job for job in jobs if job["status"] in FAILING]
        for job in bad:
            log.error("%s %s: %s", job["status"], job["folder"], job["message"])
        if bad:
            sys.exit(1)
