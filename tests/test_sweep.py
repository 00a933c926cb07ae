"""The user's commands, as typed: multirun sweeps, make_tables, failures, re-runs, interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, TINY, compose_cfg, run_script


def records(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))}


@pytest.mark.slow
def test_loss_sweep_then_tables_gives_a_four_row_table_and_reruns_skip(tmp_path):
    sweep = tmp_path / "losses"
    args = ["-m", "loss=ce,focal,mse,label_smoothing", *TINY, f"hydra.sweep.dir={sweep}"]
    run_script("ablate/train.py", *args)
    recs = records(sweep)
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"completed"}
    assert {r["choices"]["loss"] for r in recs.values()} == {"ce", "focal", "mse", "label_smoothing"}

    out = tmp_path / "tables"
    proc = run_script("analysis/make_tables.py", "--root", str(sweep), "--out", str(out))
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| Loss ")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ce", "focal", "mse", "label_smoothing"]
    assert (out / "tables.md").read_text().count("| ce ") == 1
    assert len(list(out.glob("*.png"))) == 1

    # Re-running the finished sweep trains nothing: the records and metrics stay untouched.
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.csv")}
    start = time.perf_counter()
    proc = run_script("ablate/train.py", *args)
    assert time.perf_counter() - start < 60
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "already completed" in proc.stderr + proc.stdout + "".join(
        p.read_text() for p in sweep.glob("*/train.log"))


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "fail"
    proc = run_script("ablate/train.py", "-m", *TINY, "model.filters=[8,16,32],[4,4,4,4,4,4],[8,16]",
                      f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1  # the sweep finishes, then says a job failed
    assert "2 completed, 1 failed" in proc.stdout + proc.stderr
    recs = records(sweep)
    assert sorted(r["status"] for r in recs.values()) == ["completed", "completed", "failed"]
    failed = next(name for name, r in recs.items() if r["status"] == "failed")
    assert "model.filters=[4,4,4,4,4,4]" in failed and "at most 5" in recs[failed]["error"]
    proc = run_script("analysis/make_tables.py", "--root", str(sweep), "--out", str(tmp_path / "t"))
    # the failed job is listed under the table with its error; it makes no row of its own
    assert "2 variants x 1 seed" in proc.stdout and proc.stdout.count("| 1 completed ") == 2
    assert "| failed " in proc.stdout and "at most 5" in proc.stdout


@pytest.mark.slow
def test_sigterm_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    common = [*TINY, "epochs=4", "data.train_size=1200"]
    run_script("ablate/train.py", *common, f"hydra.run.dir={tmp_path / 'whole'}")

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "ablate/train.py"), *common,
                             f"hydra.run.dir={cut}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stopped = json.loads((cut / "result.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["epochs_run"] < 4

    run_script("ablate/train.py", *common, f"hydra.run.dir={cut}")
    whole = pd.read_csv(tmp_path / "whole" / "metrics.csv").drop(columns="seconds")
    resumed = pd.read_csv(cut / "metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(whole, resumed, check_exact=True)
    assert json.loads((cut / "result.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_adding_seeds_trains_only_the_new_ones_also_through_submitit(tmp_path):
    sweep = tmp_path / "seeds"
    tiny = ["data=synthetic", "data.train_size=200", "data.test_size=100", "epochs=1",
            "model.filters=[8,16,32]"]
    run_script("ablate/train.py", "-m", "seed=0,1", *tiny, f"hydra.sweep.dir={sweep}")
    before = {p: p.read_bytes() for p in sweep.glob("*/*") if p.is_file() and p.name != "train.log"}
    proc = run_script("ablate/train.py", "-m", "hydra/launcher=local", "seed=0,1,2", *tiny,
                      f"hydra.sweep.dir={sweep}")
    assert "3 jobs: 1 completed, 2 skipped" in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in before} == before  # seeds 0 and 1: only their logs grew
    recs = records(sweep)
    assert sorted(recs) == [  # the overrides, sorted by key
        f"data=synthetic,data.test_size=100,data.train_size=200,epochs=1,model.filters=[8,16,32],seed={s}"
        for s in range(3)]
    assert {r["seed"] for r in recs.values()} == {0, 1, 2}
    assert all(r["status"] == "completed" for r in recs.values())
    assert all((sweep / name / ".hydra" / "config.yaml").exists() for name in recs)


def _job(cfg, run_dir):
    """train._run_job as a sweep runs it: what the launcher hands back to the sweeper."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ablate.train import _run_job

    hc = SimpleNamespace(runtime=SimpleNamespace(choices=OmegaConf.create({}), output_dir=str(run_dir)),
                         overrides=SimpleNamespace(task=[]), job=SimpleNamespace(num=0),
                         sweep=SimpleNamespace(dir=str(run_dir.parent)))
    run_dir.mkdir(exist_ok=True)  # Hydra makes it
    return _run_job(cfg, hc, run_dir, in_sweep=True)


def test_the_task_function_returns_validation_accuracy_for_sweepers(tmp_path):
    import math
    import pickle

    from ablate.record import RunRecord

    # fp32 pinned: the check below needs two accuracies that differ, and they are fp32's
    # (precision=auto's bf16 happens to give both 0.53 on this tiny run)
    cfg = compose_cfg([*TINY, "data.val_size=100", "device=cpu", "save_weights=false", "precision=fp32"])
    outcome = _job(cfg, tmp_path / "val")
    record = RunRecord.load(tmp_path / "val")
    assert outcome.status == "completed" and float(outcome) == record.best_val_acc
    assert record.best_val_acc != record.final_test_acc  # (so the check below means something)
    assert outcome + 0 == record.best_val_acc  # a sweeper's arithmetic sees the number
    back = pickle.loads(pickle.dumps(outcome))  # as joblib/submitit workers send it
    assert (back.status, float(back), back.final_test_acc) == ("completed", float(outcome),
                                                               record.final_test_acc)
    again = _job(cfg, tmp_path / "val")  # already done: skipped, same number
    assert again.status == "skipped" and float(again) == float(outcome)

    no_val = _job(compose_cfg([*TINY, "device=cpu", "save_weights=false"]), tmp_path / "no_val")
    assert no_val.status == "completed" and math.isnan(no_val)  # never the test accuracy
