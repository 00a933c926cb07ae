"""Issue 20's attacks, each re-tried as written: what a user sees now."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch import nn

from ablate.data import DataError
from ablate.loop import Callback
from ablate.record import CHECKPOINT_FILE, METRICS_FILE, RESULT_FILE, RunRecord, identity
from ablate.resolvers import job_folder
from ablate.train import run
from ablate.validation import ConfigError, dry_run, validate
from conftest import REPO, TINY, compose_cfg, run_script

QUICK = [*TINY, "model.filters=[4,8,16]", "device=cpu", "save_weights=false", "epochs=2"]


class LateColumn(Callback):
    """Adds a `late` column from epoch 2 on, as a callback that warms up first would."""

    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] >= 2:
            row["late"] = 0.5 * row["epoch"]


def test_a_column_a_callback_adds_after_epoch_1_reaches_metrics_csv(tmp_path):
    cfg = compose_cfg([*QUICK, "+callbacks.late._target_=test_adversarial.LateColumn"])
    assert run(cfg, tmp_path, {}, []).status == "completed"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.columns[-1] == "late"
    assert pd.isna(metrics["late"][0]) and metrics["late"][1] == 1.0


class NumpyCount(Callback):
    """Counts epochs in numpy scalars, as a callback built on numpy would."""

    def __init__(self):
        self.epochs = np.int64(0)

    def on_epoch_end(self, loop, row: dict) -> None:
        self.epochs += 1
        row["counted"] = int(self.epochs)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "mean": np.float32(0.5)}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = np.int64(state["epochs"])


class StopInEpoch2(Callback):
    """Fails at the end of epoch 2, before the checkpoint saves it: the folder resumes after epoch 1."""

    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] == 2:
            raise RuntimeError("stopped in epoch 2")


def stopped_after_epoch_1(run_dir, callbacks=()):
    """A run folder whose checkpoint holds epoch 1 of 2 (with `callbacks`, named like their class)."""
    adds = [f"+callbacks.{c}._target_=test_adversarial.{c}" for c in (*callbacks, "StopInEpoch2")]
    with pytest.raises(RuntimeError, match="stopped in epoch 2"):
        run(compose_cfg([*QUICK, *adds]), run_dir, {}, [])
    return pd.read_csv(run_dir / METRICS_FILE)


def test_a_callback_state_holding_numpy_scalars_resumes_where_it_stopped(tmp_path):
    first = stopped_after_epoch_1(tmp_path, ["NumpyCount"])
    cfg = compose_cfg([*QUICK, "+callbacks.NumpyCount._target_=test_adversarial.NumpyCount"])
    assert run(cfg, tmp_path, {}, []).status == "completed"
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert metrics["seconds"][0] == first["seconds"][0]  # epoch 1 was not trained again
    assert metrics["counted"].tolist() == [1, 2]  # and the callback's count went on from 1


def test_checkpoints_from_a_newer_version_with_one_more_field_still_load(tmp_path):
    stopped_after_epoch_1(tmp_path)  # an unfinished one: its state gains a field
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    ckpt["state"]["from_the_future"] = 1
    torch.save(ckpt, tmp_path / CHECKPOINT_FILE)
    record = run(compose_cfg(QUICK), tmp_path, {}, [])
    assert record.status == "completed" and record.epochs_run == 2
    # the finished one: its record and state gain a field, and result.json is lost
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    ckpt["state"]["from_the_future"] = 1
    ckpt["finished_record"] = json.dumps({**json.loads(ckpt["finished_record"]), "from_the_future": 1})
    torch.save(ckpt, tmp_path / CHECKPOINT_FILE)
    (tmp_path / RESULT_FILE).unlink()
    rebuilt = run(compose_cfg(QUICK), tmp_path, {}, [])
    assert rebuilt == record and RunRecord.load(tmp_path) == record


def test_a_key_nothing_reads_is_refused_in_one_line_naming_the_nearest_known_key(tmp_path):
    proc = run_script("ablate/train.py", *QUICK, "+epoch=1", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: invalid config: nothing reads epoch=1 (did you mean "
                                   "`epochs`?); a label goes in +tag=...")
    assert not (tmp_path / METRICS_FILE).exists()


@pytest.mark.parametrize("overrides,message", [
    (["+optim.lrr=0.1"], "nothing reads optim.lrr=0.1 (did you mean `optim.lr`?)"),
    (["+optim.nesterov=true"], "nothing reads optim.nesterov=True"),  # Adam has no such argument
    (["+callbacks=grad_norm", "+callbacks.grad_norm.every=2"], "nothing reads callbacks.grad_norm.every=2"),
    (["+swa.start=3"], "nothing reads swa.start=3 (did you mean `swa.start_epoch`?)"),
    (["++batchsize=3"], "nothing reads batchsize=3 (did you mean `batch_size`?)"),
])
def test_keys_nothing_reads_are_refused_wherever_they_are_added(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg([*QUICK, *overrides]))


@pytest.mark.parametrize("overrides", [
    ["+tag=baseline"], ["+callbacks=grad_norm"], ["optim=sgd", "+optim.nesterov=true"],
    ["+probe=landscape"], ["logger=tensorboard"], ["+experiment=optimizer_tuned"],
    ["+callbacks.mine._target_=ablate.grad_norm.GradNorm"],
])
def test_what_users_legitimately_add_is_accepted(overrides):
    validate(compose_cfg(overrides))


def test_a_tag_labels_the_run_and_its_folder_and_changes_no_training(tmp_path):
    plain, tagged = compose_cfg(QUICK), compose_cfg([*QUICK, "+tag=baseline_v2"])
    assert identity(OmegaConf.to_container(plain, resolve=True)) != \
        identity(OmegaConf.to_container(tagged, resolve=True))
    assert job_folder(["seed=1", "+tag=baseline_v2"]) == "seed=1,+tag=baseline_v2"
    for name in ("plain", "tagged"):
        (tmp_path / name).mkdir()  # Hydra makes the run folder; here run() is called directly
    runs = [run(cfg, tmp_path / name, {}, []) for cfg, name in ((plain, "plain"), (tagged, "tagged"))]
    assert runs[0].final_test_acc == runs[1].final_test_acc
    a, b = (pd.read_csv(tmp_path / name / METRICS_FILE).drop(columns="seconds")
            for name in ("plain", "tagged"))
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("override,message", [
    ("~seed", "error: invalid config: seed is missing (removed with ~seed?); every run needs it"),
    ("+callbacks.x._target_=ablate.nope.X", "error: invalid config: callbacks.x._target_="
     "'ablate.nope.X' does not import (AttributeError: module 'ablate' has no attribute 'nope')"),
    ("+callbacks.optimizer._target_=ablate.grad_norm.GradNorm",
     "error: invalid config: callbacks.optimizer: the name is taken; call the callback otherwise"),
])
def test_configs_that_cannot_build_are_refused_in_one_line_before_data_and_model(
        tmp_path, monkeypatch, override, message):
    built = []
    monkeypatch.setattr("ablate.compose.build", lambda *args, **kw: built.append(args[1]))
    with pytest.raises(ConfigError) as err:
        run(compose_cfg([*QUICK, override]), tmp_path, {}, [])
    assert f"error: {err.value}" == message and "\n" not in message
    assert built == []  # not the data, not the model


class TinyBN1d(nn.Module):
    """A model with BatchNorm1d, which cannot train on a batch of one image."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.BatchNorm1d(16),
                                 nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


def test_a_batch_of_one_that_batchnorm_cannot_train_on_is_caught_before_training(tmp_path):
    cfg = compose_cfg([*QUICK, "batch_size=1"])
    with open_dict(cfg):
        cfg.model = {"_target_": "test_adversarial.TinyBN1d", "num_classes": 10}
    with pytest.raises(ConfigError, match=re.escape(
            "batch_size: a training batch of one image (batch_size=1, 400 training images) fails "
            "in training mode (Expected more than 1 value per channel when training")):
        run(cfg, tmp_path, {}, [])
    assert not (tmp_path / METRICS_FILE).exists()
    cnn = compose_cfg([*QUICK, "batch_size=1"])  # the CNN's BatchNorm2d trains on one image
    dry_run(cnn, *(instantiate(cnn[key]) for key in ("model", "loss", "data")))


def test_a_validation_split_as_large_as_the_training_set_is_a_data_error(tmp_path, image_tree):
    cfg = compose_cfg([*QUICK, "data=cifar10", f"data.root={image_tree}", "data.val_size=40"])
    with pytest.raises(DataError, match=r"^data.val_size=40 leaves no training images: the "
                                        r"training set has 40 \(image folders in "):
        run(cfg, tmp_path, {}, [])


def test_the_checks_before_training_take_bounded_time_whatever_the_epoch_count(tmp_path):
    cfg = compose_cfg([*QUICK, "scale=1e7", "epochs=${scaled:50}"])
    assert cfg.epochs == 500_000_000 and cfg.sched.T_max == 500_000_000
    model, loss_fn, data = (instantiate(cfg[key]) for key in ("model", "loss", "data"))
    start = time.perf_counter()
    dry_run(cfg, model, loss_fn, data)  # stepping 5e8 epochs would take days
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_values_that_sanitize_to_one_name_get_folders_of_their_own(tmp_path):
    proc = run_script("ablate/train.py", "-m", *QUICK, "epochs=1", "+tag=a/b,a_b,'é','ü'",
                      f"hydra.sweep.dir={tmp_path}", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folders = sorted(p.name for p in tmp_path.iterdir() if (p / RESULT_FILE).exists())
    assert len(folders) == 4
    assert sum(f.endswith(",+tag=a_b") for f in folders) == 1  # a safe value keeps its plain name
    assert {RunRecord.load(tmp_path / f).status for f in folders} == {"completed"}
    assert job_folder(["model/activation=elu"]) == "model_activation=elu"  # a group's '/' is ours


SIGNALLER = '''
import os, signal
from ablate.loop import Callback

class SigtermAtStart(Callback):
    def on_fit_start(self, loop):
        os.kill(os.getpid(), signal.SIGTERM)
'''


@pytest.mark.slow
def test_sigterm_before_the_first_epoch_does_not_claim_an_epoch_is_saved(tmp_path):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "HYDRA_FULL_ERROR": "0"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "ablate/train.py"), *QUICK,
                           "+callbacks.stop._target_=signaller.SigtermAtStart",
                           f"hydra.run.dir={out}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 143
    assert "saved" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(f"interrupted by SIGTERM in {out}; no epoch had finished, "
                                        "so there is nothing to resume: re-run to start it")
    record = RunRecord.load(out)
    assert record.status == "interrupted" and record.error.startswith("stopped by SIGTERM; no epoch")


class SigintInEpoch2(Callback):
    """The user's first Ctrl-C, at the end of epoch 2, before it is saved."""

    def on_epoch_end(self, loop, row: dict) -> None:
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_ctrl_c_while_the_run_saves_its_record_leaves_it_interrupted(tmp_path, monkeypatch):
    from ablate.train import Interrupted, raise_interrupted as _raise_interrupted

    save = RunRecord.save

    def save_after_a_second_ctrl_c(record, run_dir):
        if record.status == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, just as the record is saved
        save(record, run_dir)

    monkeypatch.setattr(RunRecord, "save", save_after_a_second_ctrl_c)
    cfg = compose_cfg([*QUICK, "+callbacks.stop._target_=test_adversarial.SigintInEpoch2"])
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Interrupted):
            run(cfg, tmp_path, {}, [])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    record = RunRecord.load(tmp_path)
    assert record.status == "interrupted" and record.epochs_run == 1
    assert record.error == "stopped by SIGINT; epoch 1 is saved: re-run the same command to resume"


@pytest.mark.slow
def test_an_offline_sweep_tries_the_download_once_and_says_why_once_per_kind(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the download cannot even make its folder: it fails as offline does
    proc = run_script("ablate/train.py", "-m", *QUICK, "data=cifar10", f"data.root={blocker}/cifar",
                      "seed=0,1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert out.count("downloading the official archive") == 1
    assert out.count("Point data.root at a copy") == 2  # job 0's error, and the summary's
    assert out.count("its download failed earlier in this process") == 3  # jobs 1, 2; one summary line
    assert "failed 2 jobs (" in out


# ----------------------------------------------------------------------------- issue 28: no run starts over

class NumpyState(Callback):
    """A callback built on numpy: a numpy number in its row, a numpy array and number in its state."""

    def __init__(self):
        self.losses = np.zeros(0)

    def on_epoch_end(self, loop, row: dict) -> None:
        self.losses = np.append(self.losses, row["train_loss"])
        row["mean_loss"] = np.float64(self.losses.mean())

    def state_dict(self) -> dict:
        return {"losses": self.losses, "epochs": np.int64(len(self.losses))}

    def load_state_dict(self, state: dict) -> None:
        self.losses = np.asarray(state["losses"])
        assert state["epochs"] == len(self.losses)


class DatedState(Callback):
    """Keeps a date in its state: something no checkpoint read with weights_only=True can hold."""

    def state_dict(self) -> dict:
        import datetime
        return {"since": datetime.date(2026, 1, 1)}


def test_a_numpy_callback_resumes_where_it_stopped_and_its_lost_record_is_rebuilt(tmp_path):
    first = stopped_after_epoch_1(tmp_path, ["NumpyState"])
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # what the resume reads
    state = saved["NumpyState"]  # the numpy number and array, as a Python number and a tensor
    assert state["epochs"] == 1 and state["losses"].tolist() == [first["train_loss"][0]]
    cfg = compose_cfg([*QUICK, "+callbacks.NumpyState._target_=test_adversarial.NumpyState"])
    record = run(cfg, tmp_path, {}, [])
    assert record.status == "completed"
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert metrics["seconds"][0] == first["seconds"][0]  # epoch 1 was not trained again
    # the callback's array went on from epoch 1: epoch 2's mean is over both epochs
    assert metrics["mean_loss"][1] == pytest.approx(metrics["train_loss"].mean())
    (tmp_path / RESULT_FILE).unlink()  # lost after the run completed: rebuilt, nothing trained
    assert run(cfg, tmp_path, {}, []) == record and RunRecord.load(tmp_path) == record
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / METRICS_FILE), metrics)


@pytest.mark.parametrize("damage", ["garbage", "numpy"])
def test_an_unreadable_checkpoint_is_refused_in_one_line_and_never_trained_over(tmp_path, damage):
    from ablate.folder import FolderRefused, accept

    stopped_after_epoch_1(tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    else:  # as a callback's numpy number made it before checkpoints were made plain
        ckpt = torch.load(path, weights_only=True)
        ckpt["NumpyCount"] = {"epochs": np.int64(1)}
        torch.save(ckpt, path)
    before = path.read_bytes()
    how = f"to start the run over on purpose, delete it (rm '{path}')"
    with pytest.raises(ConfigError) as err:
        run(compose_cfg(QUICK), tmp_path, {}, [])
    why = "no zip archive in it" if damage == "garbage" else "it holds a numpy."  # numpy's module path varies
    assert str(err.value).startswith(f"{path} cannot be read ({why}") and how in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(FolderRefused) as refused:  # what train.py and the launchers ask first
        accept(tmp_path, compose_cfg(QUICK))
    assert str(refused.value) == str(err.value)
    assert path.read_bytes() == before  # kept as it was: not replaced by a new run's epoch 1
    assert pd.read_csv(tmp_path / METRICS_FILE)["epoch"].tolist() == [1]


@pytest.mark.slow
def test_the_entry_point_refuses_an_unreadable_checkpoint_in_one_line(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    proc = run_script("ablate/train.py", *QUICK, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    path = tmp_path / CHECKPOINT_FILE
    assert line == (f"error: {path} cannot be read (no zip archive in it, which torch.save writes: "
                    "cut short or overwritten?); the run is not started over without it: to start "
                    f"the run over on purpose, delete it (rm '{path}')")
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # nothing else written


def test_a_callback_state_no_checkpoint_can_hold_stops_the_run_after_epoch_1_naming_it(tmp_path):
    cfg = compose_cfg([*QUICK, "+callbacks.dated._target_=test_adversarial.DatedState"])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path, {}, [])
    assert str(err.value) == (
        "callback 'dated': its state_dict()['since'] is a datetime.date, which a checkpoint cannot "
        "hold (torch.load(weights_only=True) refuses it, so the run could not resume); give it "
        "numbers, strings, lists, dicts and tensors")
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    record = RunRecord.load(tmp_path)
    assert record.status == "failed" and record.epochs_run == 1 and "callback 'dated'" in record.error


# ----------------------------------------------------------------------------- issue 28: keys without +

@pytest.mark.parametrize("overrides,message", [
    (["epoch=1"], "nothing reads epoch=1 (did you mean `epochs`?); a label goes in +tag=..."),
    (["optim.lrr=0.1"], "nothing reads optim.lrr=0.1 (did you mean `optim.lr`?)"),
    (["model.filter=[8,16]"], "nothing reads model.filter=[8, 16] (did you mean `model.filters`?)"),
    (["sched.step_size=3"],  # cosine, the default, has no step_size
     "nothing reads sched.step_size=3: the sched option chosen has no `step_size`; sched=step has it"),
    (["optim.momentum=0.9"],
     "nothing reads optim.momentum=0.9: the optim option chosen has no `momentum`; optim=sgd and "
     "optim=sign_sgd have it"),
])
def test_a_key_typed_without_plus_gets_what_plus_would_be_told(overrides, message):
    from hydra.errors import ConfigCompositionException

    from ablate.validation import explain_unknown_key

    with pytest.raises(ConfigCompositionException) as err:  # Hydra refuses it while composing
        compose_cfg([*QUICK, *overrides])
    assert explain_unknown_key(err.value) == message
    if "+" not in message and "option chosen" not in message:  # the same words as with a +
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose_cfg([*QUICK, *(f"+{o}" for o in overrides)]))


def test_other_composition_errors_are_left_to_hydra():
    from hydra.errors import ConfigCompositionException

    from ablate.validation import explain_unknown_key

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["+epochs=3"])  # already there: Hydra's own message says what to type
    assert explain_unknown_key(err.value) is None
    assert explain_unknown_key(ValueError("To append to your config use +epoch=1")) is None


ENTRY = """
from ablate.train import main
from ablate.validation import explained_composition_errors

with explained_composition_errors():  # as ablate/train.py's __main__ calls main
    main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["epoch=1"], "nothing reads epoch=1 (did you mean `epochs`?); a label goes in +tag=..."),
    (["-m", "seed=0,1", "sched.step_size=3"],
     "nothing reads sched.step_size=3: the sched option chosen has no `step_size`; sched=step has it"),
])
def test_the_entry_point_says_it_in_one_line(tmp_path, args, message):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(entry), *args, *QUICK, f"hydra.run.dir={tmp_path / 'run'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: invalid config: {message}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["-m", "seed=0,1"]])
def test_device_gpu_is_one_line_alone_and_in_a_sweep(tmp_path, args):
    proc = run_script("ablate/train.py", *args, *QUICK, "device=gpu", f"hydra.run.dir={tmp_path / 'run'}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    error = "invalid config: device='gpu' must be one of auto, cpu, cuda, cuda:N"
    if not args:
        assert proc.stderr.strip() == f"error: {error}"
    else:  # each job's line, and the summary's
        assert (proc.stdout + proc.stderr).count(error) == 3
