"""Hydra callbacks: a sweep ends with a one-line account of its jobs."""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("ablate")


class SweepSummary(Callback):
    """Count the sweep's records by status; exit non-zero when a job failed, so scripts notice."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        statuses = Counter()
        for result in sweep.glob("*/result.json"):
            try:
                statuses[json.loads(result.read_text()).get("status", "unknown")] += 1
            except (OSError, ValueError):
                statuses["unreadable"] += 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        log.info("sweep %s: %s; tables: python analysis/make_tables.py --root %s",
                 sweep, counts or "no records", sweep)
        if statuses["failed"] or statuses["unreadable"]:
            log.error("some jobs failed; their result.json holds the error")
            sys.exit(1)
