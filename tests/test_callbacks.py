"""Loop callbacks from the config (+callbacks=...) and the TensorBoard logger, on tiny CPU runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from ablate.record import TENSORBOARD_DIR, RunRecord
from ablate.train import run
from conftest import REPO, TINY, compose_cfg

TINY_VAL = [*TINY, "data.val_size=100", "device=cpu", "save_weights=false"]


def test_tensorboard_logs_one_point_per_epoch_and_the_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg([*TINY_VAL, "epochs=2", "logger=tensorboard", "+callbacks=grad_norm"])
    record = run(cfg, tmp_path, choices={"optim": "adam"}, overrides=["optim.lr=0.002"])
    assert record.status == "completed"
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR)).Reload()
    tags = events.Tags()["scalars"]
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "lr",
                 "grad_norm"):
        assert [e.step for e in events.Scalars(name)] == [1, 2], name
    metrics = pd.read_csv(tmp_path / "metrics.csv")  # written whatever the logger
    assert [e.value for e in events.Scalars("test/acc")] == pytest.approx(metrics["test_acc"].tolist())
    assert (metrics["grad_norm"] > 0).all()  # the callback's column reaches metrics.csv too
    assert events.Scalars("hparams/final_test_acc")[0].value == pytest.approx(record.final_test_acc)
    assert "hparams/best_val_acc" in tags
    # the HParams view's session: the run's choices and overrides as hyperparameters
    hparams = events.PluginTagToContent("hparams")
    assert b"optim.lr" in b"".join(hparams.values()) and b"adam" in b"".join(hparams.values())


@pytest.mark.slow
def test_tensorboard_without_the_package_fails_before_training_in_one_line(tmp_path):
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}", "HYDRA_FULL_ERROR": "0"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "ablate/train.py"), *TINY_VAL,
                           "logger=tensorboard", f"hydra.run.dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        'error: logger=tensorboard needs TensorBoard: pip install -e ".[tensorboard]"'
    assert not (out / "metrics.csv").exists()  # not one epoch trained
    assert RunRecord.load(out).status == "failed"


def test_the_logger_is_not_part_of_a_runs_identity():
    from omegaconf import OmegaConf

    from ablate.record import identity

    plain, logged = (identity(OmegaConf.to_container(compose_cfg([*TINY, *extra]), resolve=True))
                     for extra in ([], ["logger=tensorboard"]))
    assert plain == logged  # turning the live view on resumes (or skips) the same run


def test_a_callback_named_like_the_loops_own_state_is_refused():
    from ablate.validation import ConfigError, validate

    cfg = compose_cfg([*TINY, "+callbacks.model._target_=ablate.grad_norm.GradNorm"])
    with pytest.raises(ConfigError, match="callbacks.model: the name is taken"):
        validate(cfg)
