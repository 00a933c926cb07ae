"""Stage 2 of the GPU suite: the seed report's rows at full length, as many as fit in the time left.

Each unit of work is one `python ablate/train.py -m ...` process (one row, one or more seeds)
writing into its table's sweep folder, so analysis/make_tables.py reads the tables exactly as
it reads any sweep. A small pool keeps `slots` units running at once; a unit is started only
if its estimated duration fits before the deadline, and what is still running at the deadline
gets SIGTERM (train.py then records it `interrupted`) and, after a grace period, SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    """One row of a seed-report table: the overrides that make it and what predicts its time."""

    table: str              # its sweep folder under <work>/runs
    name: str               # run folders are <name>_s<seed>
    overrides: tuple[str, ...]
    epochs: int             # the report's (the preset's) number of epochs
    model: str              # the stage-1 model whose measured speed predicts its time


def _rows(table: str, model: str, epochs: int, base: tuple[str, ...], axis: str,
          values: list[str]) -> list[Row]:
    return [Row(table, v, (*base, f"{axis}={v}"), epochs, model) for v in values]


# The order: activation, optimizer, scheduler and loss tables, then the best
# configuration, the BN study, SWA and ResNet-18 + AdamW (analysis/seed_results.yaml's rows).
TABLES: dict[str, list[Row]] = {
    "activation": _rows("activation", "cnn", 50, ("+experiment=activation_base",),
                        "model/activation", ["leaky_relu", "relu", "elu"]),
    "optimizer": _rows("optimizer", "cnn", 50, ("+experiment=optimizer_base",),
                       "optim", ["adam", "sgd", "sign_sgd"]),
    "scheduler": _rows("scheduler", "cnn_wide", 50, ("+experiment=scheduler_base",),
                       "sched", ["step", "plateau", "cosine"]),
    "loss": [Row("loss", "a_ce_step", ("+experiment=a_ce_step",), 50, "cnn"),
             Row("loss", "b_label_smoothing_cosine", ("+experiment=b_label_smoothing_cosine",), 75, "cnn"),
             Row("loss", "c_focal_cosine", ("+experiment=c_focal_cosine",), 50, "cnn"),
             Row("loss", "d_mse_relu", ("+experiment=d_mse_relu",), 100, "cnn_wide")],
    "best": [Row("best", "best", ("+experiment=best",), 100, "cnn_wide")],
    # The report's BN claim: 50% validation accuracy by epoch 10 with BN, 25 without.
    "bn_study": _rows("bn_study", "vgg_a", 30, ("+experiment=bn_landscape",),
                      "model", ["vgg_a", "vgg_a_bn"]),
    "swa": [Row("swa", "swa", ("+experiment=swa",), 50, "cnn")],
    "resnet_adamw": [Row("resnet_adamw", "resnet_adamw", ("+experiment=resnet_adamw",), 100, "resnet18")],
}

# --dry-run: the same families at a size two CPU cores train in a second.
TINY_MODEL = {
    "cnn": ("model.filters=[8,16,32]",),
    "cnn_wide": ("model.filters=[16,32,64]",),
    "vgg_a": ("model.widths=[8,8,16,16,16,16,16,16]", "model.hidden=32"),
    "resnet18": ("model.width=4",),
}


@dataclass
class Unit:
    """One train.py process: a row and the seeds it trains one after another (or fused)."""

    row: Row
    seeds: tuple[int, ...]
    estimate_s: float = 0.0   # from stage 1, times the calibration when it was started
    raw_estimate_s: float = 0.0
    status: str = "pending"   # -> skipped | running | finished | stopped
    why: str = ""
    started: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def run_dirs(self) -> list[str]:
        return [f"{self.row.name}_s{seed}" for seed in self.seeds]

    def summary(self) -> dict:
        return {"table": self.row.table, "row": self.row.name, "seeds": list(self.seeds),
                "epochs": self.row.epochs, "status": self.status, "why": self.why,
                "estimate_s": round(self.estimate_s, 1),
                "seconds": None if self.seconds is None else round(self.seconds, 1),
                "returncode": self.returncode}


def make_units(tables: list[str], seeds: list[int], seeds_per_unit: int) -> list[Unit]:
    """Units in the order they should run: table by table, row by row, seed group by seed group."""
    units = []
    for table in tables:
        for row in TABLES[table]:
            for i in range(0, len(seeds), seeds_per_unit):
                units.append(Unit(row, tuple(seeds[i:i + seeds_per_unit])))
    return units


def command(unit: Unit, work: Path, common: list[str], tiny: bool) -> list[str]:
    """The train.py command line of a unit: its row, its seeds, the shared settings, its folder."""
    row = unit.row
    extra = list(TINY_MODEL[row.model]) if tiny else []
    return [sys.executable, str(REPO / "ablate" / "train.py"), "-m", *row.overrides,
            f"seed={','.join(map(str, unit.seeds))}", *common, *extra,
            f"hydra.sweep.dir={work / 'runs' / row.table}",
            # one folder per row and seed, whichever process (or fused group) trains it
            f"hydra.sweep.subdir={row.name}_s${{seed}}"]


# ----------------------------------------------------------------------------- the pool

class Pool:
    """Run units `slots` at a time before a deadline; tell the caller when a table is done."""

    def __init__(self, units: list[Unit], slots: int, deadline: float, work: Path,
                 make_command, estimate, on_table_done, on_tick=None, log=print,
                 grace_s: float = 15.0):
        self.units, self.slots, self.deadline, self.work = units, slots, deadline, work
        self.make_command, self.estimate, self.on_table_done = make_command, estimate, on_table_done
        self.on_tick, self.log, self.grace_s = on_tick, log, grace_s
        self.ratios: list[float] = []  # actual / estimated seconds of finished units
        self.tables_done: list[str] = []
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def calibration(self) -> float:
        """Mean ratio of actual to stage-1 estimated duration so far (1 before any unit finished):
        it corrects for what stage 1 cannot see (start-up, evaluation, a busy machine)."""
        return sum(self.ratios) / len(self.ratios) if self.ratios else 1.0

    def start(self, unit: Unit) -> None:
        log_file = open(self.work / "logs" / f"{unit.row.table}_{unit.run_dirs[0]}.log", "w")
        # own process group: stopping it also stops anything the launcher started
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout's ablate, installed or not
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        unit.proc = subprocess.Popen(self.make_command(unit), cwd=REPO, env=env, stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        unit.status, unit.started = "running", time.monotonic()
        self.log(f"stage 2: start {unit.row.table}/{unit.row.name} seeds {list(unit.seeds)} "
                 f"(estimate {unit.estimate_s:.0f} s, {self.deadline - time.monotonic():.0f} s left)")

    def reap(self, unit: Unit) -> None:
        unit.returncode = unit.proc.returncode
        unit.seconds = time.monotonic() - unit.started
        if unit.status == "running":
            unit.status = "finished"
            self.ratios.append(unit.seconds / max(unit.raw_estimate_s, 1e-3))
        self.log(f"stage 2: {unit.status} {unit.row.table}/{unit.row.name} seeds "
                 f"{list(unit.seeds)} in {unit.seconds:.0f} s (exit {unit.returncode})")

    def signal_all(self, sig: int) -> None:
        for u in self.units:
            if u.proc is not None and u.proc.poll() is None:
                try:
                    os.killpg(u.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def stop_running(self, why: str) -> None:
        """SIGTERM (train.py saves its record as interrupted), then SIGKILL after the grace period."""
        running = [u for u in self.units if u.status == "running"]
        for u in running:
            u.status, u.why = "stopped", why
        self.signal_all(signal.SIGTERM)
        end = time.monotonic() + self.grace_s
        while time.monotonic() < end and any(u.proc.poll() is None for u in running):
            time.sleep(0.2)
        self.signal_all(signal.SIGKILL)
        for u in running:
            u.proc.wait()
            self.reap(u)

    def launch_what_fits(self) -> None:
        running = sum(u.status == "running" for u in self.units)
        for unit in self.units:
            if running >= self.slots:
                return
            if unit.status != "pending":
                continue
            unit.raw_estimate_s = self.estimate(unit)
            unit.estimate_s = unit.raw_estimate_s * self.calibration()
            left = self.deadline - time.monotonic()
            if unit.estimate_s > left:
                unit.status = "skipped"
                unit.why = f"estimated {unit.estimate_s:.0f} s, {left:.0f} s left"
                continue
            self.start(unit)
            running += 1

    def check_tables(self) -> None:
        for table in dict.fromkeys(u.row.table for u in self.units):
            mine = [u for u in self.units if u.row.table == table]
            if table in self.tables_done or any(u.status in ("pending", "running") for u in mine):
                continue
            self.tables_done.append(table)
            if any(u.status == "finished" for u in mine):
                self.on_table_done(table)

    def run(self) -> None:
        try:
            while True:
                for u in self.units:
                    if u.status == "running" and u.proc.poll() is not None:
                        self.reap(u)
                if time.monotonic() >= self.deadline:
                    self.stop_running("stopped at the deadline")
                    for u in self.units:
                        if u.status == "pending":
                            u.status, u.why = "skipped", "deadline reached"
                self.launch_what_fits()
                self.check_tables()
                if self.on_tick:
                    self.on_tick()  # e.g. the background analysis, started and collected in turn
                if not any(u.status in ("pending", "running") for u in self.units):
                    return
                time.sleep(0.2)
        finally:  # also on Ctrl-C or an error here: leave no training process behind
            if any(u.status == "running" for u in self.units):
                self.stop_running("the suite itself was stopped")
            for u in self.units:
                if u.status == "pending":
                    u.status, u.why = "skipped", "the suite itself was stopped"


# ----------------------------------------------------------------------------- reading the runs

def run_records(work: Path) -> list[dict]:
    """Every run's key numbers (result.json) under <work>/runs, for the suite's JSON."""
    out = []
    for result in sorted((work / "runs").glob("*/*/result.json")):
        try:
            r = json.loads(result.read_text())
        except (OSError, ValueError) as err:
            out.append({"run": f"{result.parent.parent.name}/{result.parent.name}",
                        "status": "unreadable", "error": str(err)})
            continue
        out.append({"run": f"{result.parent.parent.name}/{result.parent.name}",
                    **{k: r.get(k) for k in ("status", "seed", "epochs", "epochs_run",
                                             "final_test_acc", "best_test_acc", "best_epoch",
                                             "best_val_acc", "test_acc_at_best_val", "wall_seconds",
                                             "images_per_second", "params", "train_images",
                                             "data_source", "error")},
                    "swa_test_acc": (r.get("extra") or {}).get("swa_test_acc")})
    return out
