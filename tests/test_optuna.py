"""hydra/sweeper=optuna through the preset conf/experiment/optuna_lr.yaml: every trial an
ordinary run folder, the study in <sweep>/optuna.db, continued by the same command, and a
diverging trial recorded without ending the study."""
from __future__ import annotations

import logging
import math

import pytest

from ablate.record import RunRecord
from conftest import run_script

optuna = pytest.importorskip("optuna", reason='Optuna is not installed (pip install -e ".[tune]")')
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason='hydra-optuna-sweeper is not installed (pip install -e ".[tune]")')

TUNE = ["-m", "+experiment=optuna_lr", "data=synthetic", "data.train_size=200", "data.test_size=100",
        "data.val_size=50", "epochs=1", "model.filters=[8,16,32]", "threads=1"]


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
