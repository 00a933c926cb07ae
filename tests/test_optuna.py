"""hydra/sweeper=optuna through the preset conf/experiment/optuna_lr.yaml: every trial an
ordinary run folder, the study in <sweep>/optuna.db, continued by the same command, a diverging
trial recorded without ending the study; a sweep that cannot tune refused in one line before
any trial trains, and a trial that a killed sweep left running marked failed."""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from ablate.folder import locked
from ablate.record import RunRecord
from conftest import REPO, run_script

optuna = pytest.importorskip("optuna", reason='Optuna is not installed (pip install -e ".[tune]")')
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason='hydra-optuna-sweeper is not installed (pip install -e ".[tune]")')

TUNE = ["-m", "+experiment=optuna_lr", "data=synthetic", "data.train_size=200", "data.test_size=100",
        "data.val_size=50", "epochs=1", "model.filters=[8,16,32]", "threads=1"]


def tune(*overrides: str) -> list[str]:
    """TUNE with `overrides` in place of its own settings of the same keys."""
    keys = {o.partition("=")[0] for o in overrides}
    return [a for a in TUNE if a.partition("=")[0] not in keys] + list(overrides)


def study(sweep):
    optuna.logging.set_verbosity(logging.WARNING)
    return optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep / 'optuna.db'}")


def runs(sweep):
    return {p.parent: RunRecord.load(p.parent) for p in sweep.glob("*/result.json")}


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path):
    sweep = tmp_path / "tune"
    # SGD at lr=1e308 overflows in its first step; 1e-3 trains. The random sampler seeded 0
    # draws 1e-3, then 1e308 (optuna's grid sampler cannot be used here: its last point failing
    # ends the sweep in an error of the sweeper's own)
    proc = run_script("ablate/train.py", *TUNE, "optim=sgd", "grad_clip=null",
                      "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                      "hydra.sweeper.n_trials=2", "optim.lr=choice(1e308,0.001)",
                      f"hydra.sweep.dir={sweep}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 jobs: 1 completed, 1 diverged" in out
    records = {r.status: r for r in runs(sweep).values()}
    assert set(records) == {"completed", "diverged"}
    assert "overflowed" in records["diverged"].error

    trials = {t.state.name: t for t in study(sweep).trials}
    assert set(trials) == {"COMPLETE", "FAIL"}
    assert trials["FAIL"].params["optim.lr"] == 1e308 and trials["FAIL"].value is None
    assert trials["COMPLETE"].value == records["completed"].best_val_acc
    assert not math.isnan(study(sweep).best_value)


@pytest.mark.slow
def test_a_study_whose_every_trial_diverged_ends_in_its_summary_and_one_line(tmp_path):
    sweep = tmp_path / "tune"
    proc = run_script("ablate/train.py", *TUNE, "optim=sgd", "grad_clip=null",
                      "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                      "hydra.sweeper.n_trials=2",  # seeded: draws each of the two, once
                      "optim.lr=choice(1e308,1e300)", f"hydra.sweep.dir={sweep}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "Record does not exist" not in out
    assert "2 jobs: 2 diverged" in out
    assert out.rstrip().endswith(
        "error: no trial of study 'optuna_lr' completed, so it has no best value yet (the lines "
        "above say how each run ended); run the same command to add trials, after narrowing "
        "hydra.sweeper.params if every trial diverged")
    assert {t.state.name for t in study(sweep).trials} == {"FAIL"}


TRIALS = "it is the number of trials this command runs, so it must be at least 1"


@pytest.mark.slow
@pytest.mark.parametrize("override, damaged, says", [
    ("hydra.sweeper.n_trials=0", False, f"error: hydra.sweeper.n_trials=0: {TRIALS}"),
    ("hydra.sweeper.n_trials=-1", False, f"error: hydra.sweeper.n_trials=-1: {TRIALS}"),
    ("data.val_size=0", False,
     "error: data.val_size=0: a tuning sweep scores each trial on images held out of the training "
     "set (the test set never chooses), and there are none; set data.val_size, "
     "e.g. data.val_size=5000"),
    ("hydra.sweeper.n_trials=1", True,
     "error: {db} cannot be read as an Optuna study (file is not a database); move it aside to "
     "start a new study, or set hydra.sweeper.storage to another file"),
], ids=["no_trials", "negative_trials", "no_validation", "damaged_study"])
def test_a_sweep_that_cannot_tune_is_refused_in_one_line_before_any_trial(tmp_path, override,
                                                                         damaged, says):
    sweep = tmp_path / "tune"
    if damaged:
        sweep.mkdir()
        (sweep / "optuna.db").write_bytes(b"not a database\n" * 64)
    proc = run_script("ablate/train.py", *tune(override), f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == says.format(db=sweep / "optuna.db")  # one line, no traceback
    assert "Launching" not in proc.stdout  # no trial was started
    # nothing was written: no sweep folder, or only the damaged file, untouched
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["optuna.db", "tune"] if damaged else [])
    if damaged:
        assert (sweep / "optuna.db").read_bytes() == b"not a database\n" * 64


@pytest.mark.slow
def test_a_tuning_sweep_runs_under_python_w_error(tmp_path):
    """optuna 2.x with the pinned SQLAlchemy 1.4 warns MovedIn20Warning at import; the project
    silences that one warning, so `-W error` (every other warning an error) still tunes."""
    sweep = tmp_path / "tune"
    env = {k: v for k, v in os.environ.items() if k != "SQLALCHEMY_SILENCE_UBER_WARNING"}
    env.update(PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, "-W", "error", str(REPO / "ablate/train.py"),
                           *tune("hydra.sweeper.n_trials=1"), f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "1 job: 1 completed" in out and "MovedIn20Warning" not in out
    assert [t.state.name for t in study(sweep).trials] == ["COMPLETE"]


def wait_for(paths, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while True:
        found = list(paths())
        if found:
            return found
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"nothing to wait for appeared (the sweep exited {proc.poll()})")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_trial_killed_with_its_sweep_is_marked_failed_once_nobody_holds_its_folder(tmp_path):
    sweep = tmp_path / "tune"
    # an lr range that trains: a sampled lr near 1e-1 can diverge within a few epochs, which
    # fails the trial before the kill this test is about
    tame = "optim.lr=tag(log, interval(1e-4, 1e-3))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    killed = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"),
                               *tune("hydra.sweeper.n_trials=1", "epochs=200", tame),
                               f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        [checkpoint] = wait_for(lambda: sweep.glob("*/checkpoint.pt"), killed)
        os.kill(killed.pid, signal.SIGKILL)  # no handler runs: the study says RUNNING
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.wait()
    folder = checkpoint.parent
    [trial] = study(sweep).trials
    assert trial.state.name == "RUNNING"

    # while its folder is held (by a run of it still going), the trial is left running
    with locked(folder):
        proc = run_script("ablate/train.py", *tune("hydra.sweeper.n_trials=1", tame),
                          f"hydra.sweep.dir={sweep}")
    assert "marked failed" not in proc.stdout + proc.stderr
    assert [t.state.name for t in study(sweep).trials] == ["RUNNING", "COMPLETE"]

    # nobody holds it now: the next start marks it failed before its own trial, and says so
    proc = run_script("ablate/train.py", *tune("hydra.sweeper.n_trials=1", tame),
                      f"hydra.sweep.dir={sweep}")
    out = proc.stdout + proc.stderr
    lr = trial.params["optim.lr"]
    assert (f"trial 0 of study optuna_lr (optim.lr={lr}) was left running by a sweep that "
            f"stopped; marked failed (its run folder {folder} keeps what it finished)") in out
    assert out.index("marked failed") < out.index("Launching 1 jobs")
    assert [t.state.name for t in study(sweep).trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert (folder / "checkpoint.pt").exists()  # its finished epochs, for a run of the same lr


@pytest.mark.slow
def test_a_second_command_on_a_study_in_use_is_refused(tmp_path):
    import fcntl

    sweep = tmp_path / "tune"
    sweep.mkdir()
    # what a running sweep command holds for as long as it runs (ablate/study.py StudyLock)
    with open(sweep / "optuna.db.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        proc = run_script("ablate/train.py", *tune("hydra.sweeper.n_trials=1"),
                          f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {sweep / 'optuna.db'} is in use by another sweep "
                                   "command (pid 4242); wait for it to end, or tune into another "
                                   "hydra.sweep.dir")
    assert sorted(p.name for p in sweep.iterdir()) == ["optuna.db.lock"]  # no study, no trial


@pytest.mark.slow
def test_two_studies_under_one_root_are_two_tables(tmp_path):
    """Each trial's record names its study and its sweep folder: make_tables over the root of two
    studies writes two tables, never one pooled across them."""
    for name in ("lr_a", "lr_b"):
        run_script("ablate/train.py", *tune("hydra.sweeper.n_trials=2"), f"hydra.sweeper.study_name={name}",
                   f"hydra.sweep.dir={tmp_path / name}")
    from analysis.runs import collect
    from analysis.tables import sweep_reports

    found, _ = collect([tmp_path])
    assert sorted(found["study"]) == ["lr_a", "lr_a", "lr_b", "lr_b"] and set(found["sweep_kind"]) == {"optuna"}
    assert sorted(r["sweep"] for r in sweep_reports(found)) == [str(tmp_path / "lr_a"), str(tmp_path / "lr_b")]
    out = run_script("analysis/make_tables.py", "--root", str(tmp_path)).stdout
    assert out.count("### ") >= 2 and "single runs in" not in out
