"""Real (tiny) training runs on CPU through the same `run` the entry point calls."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from ablate.folder import FolderRefused, accept
from ablate.loop import Diverged, check_divergence
from ablate.record import RunRecord
from ablate.train import run
from conftest import REPO, TINY, compose_cfg, run_script


def train(tmp_path, name, *overrides):
    cfg = compose_cfg([*TINY, *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir()
    record = run(cfg, run_dir, choices={"loss": cfg.loss._target_}, overrides=list(overrides))
    return record, run_dir


def test_training_learns_far_above_chance(tmp_path):
    record, run_dir = train(tmp_path, "learn", "epochs=3")
    assert record.status == "completed"
    assert record.final_test_acc > 0.6  # chance is 0.1
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]


def test_run_writes_a_complete_record_and_loadable_weights(tmp_path):
    record, run_dir = train(tmp_path, "rec")
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["status"] == "completed" and saved["epochs_run"] == 2
    assert saved["best_test_acc"] >= saved["final_test_acc"]
    assert saved["params"] == sum(p.numel() for p in instantiate(compose_cfg(TINY).model).parameters())
    assert saved["images_per_second"] > 0 and saved["torch_version"] == torch.__version__
    state = torch.load(run_dir / "best_model.pth", weights_only=True)
    assert "classifier.7.weight" in state
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_same_seed_same_metrics_bit_for_bit(tmp_path):
    _, a = train(tmp_path, "a", "seed=3")
    _, b = train(tmp_path, "b", "seed=3")
    _, c = train(tmp_path, "c", "seed=4")
    ma, mb, mc = (pd.read_csv(d / "metrics.csv").drop(columns="seconds") for d in (a, b, c))
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)
    assert not ma.equals(mc)


def test_l1_and_grad_clip_change_training(tmp_path):
    _, plain = train(tmp_path, "plain", "grad_clip=null")
    _, l1 = train(tmp_path, "l1", "grad_clip=null", "l1_lambda=0.01")
    _, clip = train(tmp_path, "clip", "grad_clip=0.01")
    losses = [pd.read_csv(d / "metrics.csv")["test_loss"].iloc[-1] for d in (plain, l1, clip)]
    assert losses[0] != losses[1] and losses[0] != losses[2]


def test_plateau_scheduler_cuts_lr_when_loss_stalls(tmp_path):
    _, run_dir = train(tmp_path, "plateau", "sched=plateau", "sched.patience=0", "sched.cooldown=0",
                       "sched.threshold=10.0", "epochs=3", "optim.lr=0.01")
    lrs = pd.read_csv(run_dir / "metrics.csv")["lr"].tolist()
    assert lrs[0] == 0.01 and lrs[2] < lrs[0]


def test_exploding_loss_is_recorded_as_diverged(tmp_path):
    record, run_dir = train(tmp_path, "div", "optim=sgd", "optim.lr=1e6", "grad_clip=null", "loss=mse")
    assert record.status == "diverged" and "nan" in record.error.lower()
    assert RunRecord.load(run_dir).status == "diverged"


@pytest.mark.parametrize("lr,words", [("1e308", "overflowed"), ("1", "exploded")])
def test_overflowing_step_or_finite_explosion_is_diverged_not_failed(tmp_path, lr, words):
    # lr=1e308 cannot even be cast to float32 in SGD's update; lr=1 without clipping keeps the
    # loss finite but an order of magnitude above where it started
    record, run_dir = train(tmp_path, "div", "optim=sgd", f"optim.lr={lr}", "grad_clip=null",
                            "epochs=1")
    assert record.status == "diverged" and words in record.error
    assert RunRecord.load(run_dir).status == "diverged"


def test_non_finite_weights_are_divergence_even_with_a_finite_loss():
    model = torch.nn.Linear(2, 2)
    check_divergence(model, epoch_loss=1.0, start_loss=2.3, epoch=1)  # healthy: no complaint
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(Diverged, match="weights became non-finite in epoch 3"):
        check_divergence(model, epoch_loss=1.0, start_loss=2.3, epoch=3)


def test_completed_run_is_skipped_when_run_again(tmp_path):
    record, run_dir = train(tmp_path, "skip")
    mtime = (run_dir / "metrics.csv").stat().st_mtime_ns
    again = run(compose_cfg(TINY), run_dir, choices={}, overrides=[])
    assert again.final_test_acc == record.final_test_acc
    assert (run_dir / "metrics.csv").stat().st_mtime_ns == mtime


def test_a_folder_accepts_its_own_config_and_refuses_another(tmp_path):
    _, run_dir = train(tmp_path, "same")
    accept(run_dir, compose_cfg([*TINY, "threads=1", "device=cpu"]))  # operational keys: same run
    with pytest.raises(FolderRefused, match=r"\(there -> here: optim.lr: 0.001 -> 0.5\)"):
        accept(run_dir, compose_cfg([*TINY, "optim.lr=0.5"]))  # no .hydra/ here: the record's config says


@pytest.mark.parametrize("override,message", [
    ("model.num_classes=5", "model: gives 5 outputs per image"),       # found by the dry run
    ("data.train_size=10000000000000", "data: 10,000,000,000,200 synthetic images need"),
    ("sched.T_max=0", r"sched\.T_max=0 must be an integer >= 1"),      # found by validate
])
def test_values_that_cannot_work_stop_the_run_before_any_training(tmp_path, override, message):
    from ablate.validation import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(tmp_path, "bad", override)
    assert not {"metrics.csv", "checkpoint.pt", "best_model.pth"} & {
        p.name for p in (tmp_path / "bad").iterdir()}


@pytest.mark.slow
def test_a_run_killed_outright_keeps_its_wall_time_and_its_resume_adds_to_it(tmp_path):
    """SIGKILL runs no `finally`: the record's wall time must already be on disk, each epoch's."""
    run_dir = tmp_path / "killed"
    args = [*TINY, "epochs=60", "threads=1", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ((run_dir / "result.json").is_file() and RunRecord.load(run_dir).epochs_run >= 3):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed = RunRecord.load(run_dir)
    assert killed.status == "running" and 3 <= killed.epochs_run < 60
    trained = pd.read_csv(run_dir / "metrics.csv")["seconds"][:killed.epochs_run].sum()
    assert killed.wall_seconds >= trained > 0  # it holds its epochs' training time at least

    run_script("ablate/train.py", *args)  # resumes from its checkpoint
    done = RunRecord.load(run_dir)
    assert done.status == "completed" and done.epochs_run == 60
    resumed = pd.read_csv(run_dir / "metrics.csv")["seconds"][killed.epochs_run:].sum()
    assert done.wall_seconds >= killed.wall_seconds + resumed
