"""Run folders you can trust: named by what the job is, one config each, one process at a time,
records that survive, and a sweep summary about this sweep only."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ablate.folder import locked
from ablate.record import identity
from ablate.resolvers import job_folder
from ablate.train import run
from conftest import REPO, compose_cfg, run_script

# One epoch on 200 synthetic images: each job trains in about a second on two idle cores.
TINY1 = ["data=synthetic", "data.train_size=200", "data.test_size=100", "epochs=1",
         "model.filters=[8,16,32]"]
NAME = "data=synthetic,data.test_size=100,data.train_size=200,epochs=1,model.filters=[8,16,32]"


def fingerprint(folder) -> dict:
    """Every file under folder (hidden ones included) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def record(run_dir) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def test_a_job_folder_is_named_by_its_overrides_without_operational_ones():
    assert job_folder(["seed=1", "loss=focal", "threads=4", "device=cpu"]) == "loss=focal,seed=1"
    safe = job_folder(["model/activation=elu", "data.root='/my data'"])
    # no '/', quote or space reaches the file system; the changed value brings a hash of the raw ones
    assert safe == "data.root=__my_data_,model_activation=elu-" + safe[-8:]
    assert job_folder([]) == "defaults"
    long = job_folder([f"data.root=/{'x' * 300}", "seed=0"])  # cut, with a hash of the whole
    assert long == f"data.root=_{'x' * 29},seed=0-" + long[-8:] and len(long) == 56
    assert job_folder([f"data.root=/{'x' * 300}y", "seed=0"]) != long
    # and the identity ignores the same keys: a re-run with more threads is the same run
    assert identity({"seed": 0, "threads": 4, "device": "cpu"}) == identity({"seed": 0})


@pytest.mark.slow
def test_extending_a_sweep_trains_only_the_new_job_and_maps_old_ones_by_name(tmp_path):
    sweep = tmp_path / "losses"
    run_script("ablate/train.py", "-m", "loss=ce,focal", *TINY1, f"hydra.sweep.dir={sweep}")
    before = fingerprint(sweep)
    # The case, on another launcher and with threads set: both must map to the same folders.
    proc = run_script("ablate/train.py", "-m", "loss=label_smoothing,ce,focal", *TINY1,
                      "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1",
                      f"hydra.sweep.dir={sweep}")
    assert "3 jobs: 1 completed, 2 skipped" in proc.stdout + proc.stderr
    # The old jobs' artifacts are untouched; their train.log only gains the line saying so, and
    # Hydra's multirun.yaml describes the latest sweep.
    kept = {k: v for k, v in before.items() if not k.endswith(("train.log", "multirun.yaml"))}
    assert {k: v for k, v in fingerprint(sweep).items() if k in kept} == kept
    for loss in ("ce", "focal", "label_smoothing"):
        folder = sweep / f"{NAME.replace('epochs=1,', f'epochs=1,loss={loss},')}"
        assert record(folder)["choices"]["loss"] == loss and record(folder)["status"] == "completed"
    assert not (sweep / ".jobs").exists()


@pytest.mark.slow
def test_a_refused_run_leaves_the_folder_byte_identical_and_names_the_setting(tmp_path):
    run_dir = tmp_path / "run"
    run_script("ablate/train.py", *TINY1, f"hydra.run.dir={run_dir}")
    before = fingerprint(run_dir)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", "train.log", "result.json"} <= set(before)
    proc = run_script("ablate/train.py", *TINY1, "optim.lr=0.5", f"hydra.run.dir={run_dir}",
                      check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "optim.lr: 0.001 -> 0.5" in proc.stderr
    assert fingerprint(run_dir) == before
    # With its record gone, the folder's checkpoint and .hydra/ still say which config it holds.
    (run_dir / "result.json").unlink()
    before = fingerprint(run_dir)
    proc = run_script("ablate/train.py", *TINY1, "loss=focal", f"hydra.run.dir={run_dir}",
                      check=False)
    assert proc.returncode == 1 and "loss._target_: torch.nn.CrossEntropyLoss -> " in proc.stderr
    assert fingerprint(run_dir) == before


@pytest.mark.slow
def test_a_second_process_on_a_folder_in_use_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), *TINY1,
                              f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".hydra" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.01)  # written once the first process holds the folder
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the folder
        second = run_script("ablate/train.py", *TINY1, "loss=focal", f"hydra.run.dir={run_dir}",
                            check=False)
        assert second.returncode == 1
        assert f"is in use by another run (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    done = record(run_dir)
    assert done["status"] == "completed" and done["choices"]["loss"] == "ce"
    assert "loss" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # nothing of the second
    assert not (run_dir / ".lock").exists()


def test_lost_or_damaged_records_are_rebuilt_without_training(tmp_path):
    cfg = compose_cfg(TINY1)
    first = run(cfg, tmp_path, choices={"loss": "ce"}, overrides=[])
    saved, weights = (tmp_path / "result.json").read_text(), (tmp_path / "best_model.pth").stat()
    assert (tmp_path / "checkpoint.pt").stat().st_size < 20_000  # done: no resume state kept
    for damage in ("delete", "truncate", "running"):
        if damage == "delete":
            (tmp_path / "result.json").unlink()
        elif damage == "truncate":
            (tmp_path / "result.json").write_text(saved[:50])
        else:  # written before a crash that came after the run had completed
            (tmp_path / "result.json").write_text(saved.replace('"completed"', '"running"'))
        again = run(compose_cfg(TINY1), tmp_path, choices={"loss": "ce"}, overrides=[])
        assert again == first and (tmp_path / "result.json").read_text() == saved
    assert (tmp_path / "best_model.pth").stat().st_mtime_ns == weights.st_mtime_ns  # not retrained


def test_a_crash_during_swas_finish_is_completed_on_rerun_without_training(tmp_path, monkeypatch):
    from ablate.swa import SWA
    from ablate.train import Interrupted

    def killed(*args, **kwargs):
        raise Interrupted("SIGTERM")

    swa = [*TINY1, "epochs=2", "swa.start_epoch=2", "swa.anneal_epochs=1"]
    (tmp_path / "whole").mkdir(), (tmp_path / "cut").mkdir()
    whole = run(compose_cfg(swa), tmp_path / "whole", choices={}, overrides=[])
    with monkeypatch.context() as patch:
        patch.setattr(SWA, "finish", killed)  # after the last epoch's checkpoint
        with pytest.raises(Interrupted):
            run(compose_cfg(swa), tmp_path / "cut", choices={}, overrides=[])
    assert record(tmp_path / "cut")["status"] == "interrupted"
    metrics = (tmp_path / "cut" / "metrics.csv").stat().st_mtime_ns
    resumed = run(compose_cfg(swa), tmp_path / "cut", choices={}, overrides=[])
    assert resumed.status == "completed" and resumed.epochs_run == 2
    assert resumed.final_test_acc == whole.final_test_acc
    assert resumed.extra["swa_test_acc"] == whole.extra["swa_test_acc"]
    assert (tmp_path / "cut" / "metrics.csv").stat().st_mtime_ns == metrics  # no epoch re-run


@pytest.mark.slow
def test_the_sweep_summary_counts_this_sweeps_jobs_only(tmp_path):
    sweep = tmp_path / "s"
    proc = run_script("ablate/train.py", "-m", *TINY1[:-1], "model.filters=[8,16,32],[4,4,4,4,4,4]",
                      f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "2 jobs: 1 completed, 1 failed" in proc.stdout + proc.stderr
    # A clean re-run of the good job is not failed by the other job's stale record ...
    proc = run_script("ablate/train.py", "-m", *TINY1, f"hydra.sweep.dir={sweep}")
    assert "1 job: 1 skipped" in proc.stdout + proc.stderr
    # ... and a job refused its folder is counted as refused, failing the sweep.
    with locked(sweep / NAME):
        proc = run_script("ablate/train.py", "-m", *TINY1, f"hydra.sweep.dir={sweep}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 job: 1 refused" in out and "is in use" in out


def test_holding_a_folder_clears_what_a_killed_writer_left_half_written(tmp_path):
    # a SIGKILL between writing a temporary and renaming it leaves .<name>.<pid>.tmp behind
    (tmp_path / ".metrics.csv.4242.tmp").write_text("epoch,test_acc\n1,0.")
    (tmp_path / ".checkpoint.pt.4242.tmp").write_bytes(b"PK")
    (tmp_path / "metrics.csv").write_text("epoch,test_acc\n1,0.5\n")
    with locked(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "metrics.csv"]


# ----------------------------------------------------------------------------- issue 28

# Fixed settings that sort before `seed` and fill the name's budget (200 characters).
FIXED = [*TINY1, "batch_size=64", "grad_clip=4.5", "l1_lambda=1.0e-07", "optim.weight_decay=1.0e-06",
         "optim.lr=0.0015", "data.val_size=0"]


def test_a_name_that_must_be_cut_keeps_the_swept_keys_first(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "multirun.yaml").write_text(  # Hydra's record of the sweep as typed
        OmegaConf.to_yaml({"hydra": {"overrides": {"task": [*FIXED, "seed=0,1"]}}}))
    root = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": None}}})
    names = [job_folder([*FIXED, f"seed={s}"], _root_=root) for s in (0, 1)]
    for seed, name in zip((0, 1), names):
        assert name.startswith(f"seed={seed},batch_size=64,") and len(name) == 200
    assert names[0][:-9] != names[1][:-9]  # told apart before the hash
    # sorted alone, `seed` fell past the cut: only the hash told the jobs apart
    alone = job_folder([*FIXED, "seed=0"])
    assert "seed=0" not in alone and alone[-8:] == names[0][-8:]  # the hash is of the same overrides
    # a grid of a preset (hydra.sweeper.params) is swept too; a name that fits keeps sorted order
    root = OmegaConf.create({"hydra": {"sweeper": {"params": {"model/activation": "relu,elu"}}}})
    assert job_folder([*FIXED, "model/activation=elu"], _root_=root).startswith("model_activation=elu,")
    assert job_folder(["seed=1", "loss=focal"], _root_=root) == "loss=focal,seed=1"


@pytest.mark.slow
def test_a_sweep_with_long_fixed_settings_keeps_each_jobs_seed_in_its_folder_name(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("ablate/train.py", "-m", *FIXED, "seed=0,1", "save_weights=false", f"hydra.sweep.dir={sweep}")
    names = sorted(p.parent.name for p in sweep.glob("*/result.json"))
    assert [n.split(",")[0] for n in names] == ["seed=0", "seed=1"]


def _tiny_config(*overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_cfg([*TINY1, *overrides]), resolve=True)


@pytest.mark.parametrize("kept_in", ["result.json", "checkpoint.pt", "nowhere"])
def test_a_refusal_names_the_settings_that_differ_from_what_the_folder_keeps(tmp_path, kept_in):
    import torch

    from ablate.folder import FolderRefused, accept

    there = _tiny_config()  # no .hydra/: what the record or the finished checkpoint keeps is compared
    digest = identity(there)
    if kept_in == "checkpoint.pt":  # result.json lost after the run completed
        torch.save({"identity": digest, "state": {"epoch": 1, "rows": []},
                    "finished_record": json.dumps({"config_hash": digest, "config": there})},
                   tmp_path / "checkpoint.pt")
    else:
        (tmp_path / "result.json").write_text(json.dumps(
            {"config_hash": digest, **({"config": there} if kept_in == "result.json" else {})}))
    with pytest.raises(FolderRefused) as err:
        accept(tmp_path, compose_cfg([*TINY1, "optim.lr=0.5", "seed=3"]))
    message = str(err.value)
    if kept_in == "nowhere":  # a record written before records kept their config
        assert ("result.json was made by another config (identity " in message
                and "the folder keeps no copy of its settings to compare" in message)
    else:
        assert "(there -> here: optim.lr: 0.001 -> 0.5; seed: 0 -> 3)" in message
    assert "\n" not in message
